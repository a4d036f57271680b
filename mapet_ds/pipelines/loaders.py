"""Iterable loaders over the DALI graphs, and the public builder functions.

* ``TrainLoader`` (pre-training, fine-tune train): yields batches forever, the same
  number per epoch on every rank, and can save/restore its exact position.
* ``EvalLoader``: one epoch per ``iter()``, the same number of batches on every rank,
  with a ``valid`` mask so summing over ranks counts every sample exactly once.
* ``TokenizerViewLoader``: one pass over the shard in file-list order, no padding.
"""

from __future__ import annotations

import base64
import json
import math
import os
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from mapet_ds.filelist import FileList, shard_indices
from mapet_ds.pipelines import common as C
from mapet_ds.pipelines import graphs as G
from mapet_ds.pipelines.randaugment import RandAugmentSpec, parse_rand_augment
from mapet_ds.transfer import to_device

STATE_FORMAT = "mapet_ds.pipelines/1"
# A loader state merged from every rank of another world size (``merge_rank_states``).
ELASTIC_FORMAT = "mapet_ds.pipelines/elastic1"
# Signature keys that depend on the world size; the rest must match on an elastic resume.
_LAYOUT_KEYS = ("batch_size", "shard_id", "num_shards")


class EpochPosition:
    """Position of an endless training loader: ``_epoch``, ``_step`` (batches taken in it)
    and ``_epoch_len`` (batches in the current epoch), kept by the subclass."""

    steps_per_epoch: int
    _epoch: int
    _step: int
    _epoch_len: int

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._epoch + (self._step >= self._epoch_len)

    @property
    def step_in_epoch(self) -> int:
        """Index within its epoch of the next batch."""
        return self._step if self._step < self._epoch_len else 0

    @property
    def batches_returned(self) -> int:
        return self._epoch * self.steps_per_epoch + self._step

    def __iter__(self) -> Iterator[dict]:
        return self


class TrainLoader(EpochPosition):
    """Endless training batches from one DALI pipeline; epochs reshuffled from ``seed``.

    Every rank yields ``steps_per_epoch = (len(list) // num_shards) // batch_size``
    batches per epoch (the smallest shard's full batches) so that ranks stay in step;
    the remainder of each rank's reader epoch (a partial, padded batch and, on larger
    shards, maybe one more) is read and dropped before the next epoch starts.

    ``state()`` returns a JSON string: the DALI pipeline checkpoint (reader position and
    every RNG state, taken after the batches already returned, so prefetched batches
    are not lost) plus the epoch/step counters. Building the same loader with
    ``checkpoint=state`` continues with exactly the batches this one would yield next.

    Elastic resume: the state also holds a bitmap of the sample ids this rank returned
    in the current epoch (n/8 bytes; cheaper than the ids and exact whatever DALI's
    internal reshuffle did). ``merge_rank_states`` ORs the bitmaps of all old ranks;
    a loader built from that merged state on another world size first finishes the
    interrupted epoch over the not-yet-used ids only (a DALI reader over that sub-list,
    re-sharded over the new ranks, order and augmentation seeded from (seed, epoch),
    the remainder smaller than one batch per rank dropped as in every epoch), then
    continues with whole-list epochs whose reader is seeded from (seed, epoch).
    """

    def __init__(self, *, kind: str, fl: FileList, batch_size: int, shard_id: int, num_shards: int,
                 mode: str, signature: dict, build: Callable[..., object],
                 outputs: Sequence[str], with_labels: bool, checkpoint: str | bytes | None,
                 prefetch_depth: int = C.PREFETCH_DEPTH):
        self.kind = kind
        self._prefetch_depth = prefetch_depth  # batches DALI may have in flight past the ones returned
        self._list_path = fl.list_path
        self._fl = fl
        self.batch_size = batch_size
        self.shard_id, self.num_shards = shard_id, num_shards
        n = len(fl)
        self.steps_per_epoch = (n // num_shards) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{fl.list_path}: {n} samples over {num_shards} rank(s) give no full batch of {batch_size} "
                f"per rank: lower the batch size or use a larger list"
            )
        self._reader_batches = C.train_reader_batches(n, num_shards, batch_size)
        self._signature = {"kind": kind, "filelist_digest": fl.digest(), "num_samples": n,
                           "batch_size": batch_size, "shard_id": shard_id, "num_shards": num_shards, **signature}
        self._epoch, self._step = 0, 0  # position of the reader: epoch, batches taken in it
        self._fl, self._build, self._seed = fl, build, int(signature.get("seed", 0))
        self._epoch_len = self.steps_per_epoch  # batches of the current epoch (shorter in a tail epoch)
        self._used = np.zeros(n, dtype=bool)  # sample ids this rank returned in the current epoch
        self._tail_base: np.ndarray | None = None  # tail epoch: ids used before it (bool [n])
        self._tail_ids: torch.Tensor | None = None  # tail epoch: reader label -> sample id
        self._reseed_epoch: int | None = None  # whole-list reader seeded from (seed, this epoch)
        self.elastic_info: dict | None = None
        dali_ckpt = None
        if checkpoint is not None:
            dali_ckpt = self._load_state(checkpoint)
        self._device = C.torch_device(mode)
        self._outputs = tuple(outputs)
        self._labels = torch.tensor(fl.labels, dtype=torch.int64) if with_labels else None
        self._pipe = self._make_pipe(dali_ckpt)

    def _derived_seed(self, what: int, epoch: int) -> int:
        return (self._seed * 1_000_003 + (epoch + 1) * 7_919 + what * 104_729) % (2**31 - 1)

    def _make_pipe(self, dali_ckpt: bytes | None):
        if self._tail_base is not None:
            ids = np.flatnonzero(~self._tail_base)
            self._tail_ids = torch.from_numpy(ids).to(torch.int64)
            fl = self._fl
            sub = FileList(fl.list_path, fl.root, [fl.paths[i] for i in ids], [fl.labels[i] for i in ids], fl.classes)
            self._epoch_len = (len(ids) // self.num_shards) // self.batch_size
            self._reader_batches = C.train_reader_batches(len(ids), self.num_shards, self.batch_size)
            return self._build(dali_ckpt, fl=sub, seed=self._derived_seed(1, self._epoch))
        self._tail_ids = None
        self._epoch_len = self.steps_per_epoch
        self._reader_batches = C.train_reader_batches(len(self._fl), self.num_shards, self.batch_size)
        if self._reseed_epoch is not None:
            return self._build(dali_ckpt, seed=self._derived_seed(2, self._reseed_epoch))
        return self._build(dali_ckpt)

    # -- iteration --------------------------------------------------------------------
    def __next__(self) -> dict:
        if self._step >= self._epoch_len:
            if self._tail_base is not None:
                # the epoch begun on another world size is done: whole-list epochs from here
                self._tail_base, self._pipe = None, None
                self._reseed_epoch = self._epoch + 1
                self._epoch, self._step = self._epoch + 1, 0
                self._pipe = self._make_pipe(None)
            else:
                # Drop the rest of this rank's reader epoch so the next epoch starts fresh.
                for _ in range(self._reader_batches - self._step):
                    C.run_pipeline(self._pipe, self._list_path, self._locate)
                self._epoch, self._step = self._epoch + 1, 0
            self._used[:] = False
        tensors = C.dali_to_torch(C.run_pipeline(self._pipe, self._list_path, self._locate), self._device)
        self._step += 1
        batch = dict(zip(self._outputs, tensors))
        batch["sample_ids"] = batch["sample_ids"].reshape(-1).to(torch.int64)
        if self._tail_ids is not None:  # the tail reader's label indexes the sub-list
            batch["sample_ids"] = self._tail_ids[batch["sample_ids"]]
        self._used[batch["sample_ids"].numpy()] = True
        if self._labels is not None:
            batch["labels"] = to_device(self._labels[batch["sample_ids"]], self._device)
        return batch

    def _locate(self, cause: str) -> str | None:
        """Name the failing sample: in epoch 0 of a reader seeded with ``seed`` its order is the
        seed's permutation; otherwise (later epochs, elastic tails) the header scan finds it."""
        candidates = None
        if self._epoch == 0 and self._tail_base is None and self._reseed_epoch is None:
            n, B = len(self._fl), self.batch_size
            part = shard_indices(n, self.shard_id, self.num_shards)
            shard = np.random.default_rng(int(self._signature["seed"])).permutation(n)[part.start:part.stop]
            candidates = shard[self._step * B:(self._step + 1 + self._prefetch_depth) * B]
        return C.locate_failure(self._fl, cause, candidates)

    # -- checkpointing ------------------------------------------------------------------
    def state(self) -> str:
        """JSON string: DALI checkpoint + counters + what the loader was built for."""
        return json.dumps({"format": STATE_FORMAT, **self._signature, "epoch": self._epoch, "step": self._step,
                           "dali": dali_checkpoint_text(self._pipe), "epoch_len": self._epoch_len,
                           "used": _pack(self._used), "reseed_epoch": self._reseed_epoch,
                           "tail_base": None if self._tail_base is None else _pack(self._tail_base)})

    def _load_state(self, checkpoint: str | bytes) -> bytes:
        st = parse_state(checkpoint, self._signature, self.kind, "file list", (STATE_FORMAT, ELASTIC_FORMAT),
                         layout_free=lambda st: st["format"] == ELASTIC_FORMAT)
        elastic = st["format"] == ELASTIC_FORMAT
        self._epoch, self._step = int(st["epoch"]), int(st["step"])
        n = len(self._used)
        if "used" in st:
            self._used = _unpack(st["used"], n)
        if elastic:  # a fresh reader on this world size (see the class docstring)
            self._step = 0
            used = self._used
            unseen = n - int(used.sum())
            tail_steps = (unseen // self.num_shards) // self.batch_size
            if st["finished"] or tail_steps == 0:
                self._epoch += 1
                self._reseed_epoch = self._epoch
                self._used = np.zeros(n, dtype=bool)
                unseen, tail_steps = 0, 0
            else:
                self._tail_base = used.copy()
            self.elastic_info = {"epoch": self._epoch, "unseen": unseen, "tail_batches": tail_steps,
                                 "dropped": unseen - tail_steps * self.batch_size * self.num_shards}
            return None
        self._reseed_epoch = st.get("reseed_epoch")
        if st.get("tail_base") is not None:
            self._tail_base = _unpack(st["tail_base"], n)
        return base64.b64decode(st["dali"])


def _locate_in_shard(loader, cause: str) -> str | None:
    """Eval / tokenizer-view readers read their shard in list order: the failing batch is
    one of the ``PREFETCH_DEPTH + 1`` after those already taken."""
    B = loader.batch_size
    window = loader.sample_ids[loader._taken * B:(loader._taken + 1 + C.PREFETCH_DEPTH) * B]
    return C.locate_failure(loader._fl, cause, window)


def merge_rank_states(states: Sequence[str]) -> str:
    """The loader states of every rank of a run -> one state any world size can resume from.

    The ranks step in lockstep, so they agree on epoch and position; the union of their
    used-id bitmaps is what the interrupted epoch has already consumed.
    """
    sts = [json.loads(s) for s in states]
    if sts and str(sts[0].get("kind", "")).endswith("_shards"):
        # a shard reader's position is inside DALI's shuffle buffer: which samples it used is not recorded
        raise ValueError(f"a run on shards (data.train_shards) resumes only on the world size it was saved with: "
                         f"start it on {len(sts)} rank(s)")
    if not sts or any(st.get("format") != STATE_FORMAT or "used" not in st for st in sts):
        raise ValueError("loader states of this checkpoint predate elastic resume (no used-sample record): "
                         "resume it on the world size it was saved with")
    first = sts[0]
    if any((st["epoch"], st["step"]) != (first["epoch"], first["step"]) for st in sts):
        raise ValueError("loader states of the ranks disagree on the epoch position: the checkpoint is inconsistent")
    n = int(first["num_samples"])
    used = np.zeros(n, dtype=bool)
    for st in sts:
        used |= _unpack(st["used"], n)
        if st.get("tail_base") is not None:
            used |= _unpack(st["tail_base"], n)
    merged = {k: v for k, v in first.items() if k not in ("dali", "used", "tail_base", "reseed_epoch")}
    merged.update(format=ELASTIC_FORMAT, used=_pack(used), finished=int(first["step"]) >= int(first["epoch_len"]))
    return json.dumps(merged)


def _pack(mask: np.ndarray) -> str:
    return base64.b64encode(np.packbits(mask).tobytes()).decode("ascii")


def _unpack(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), count=n).astype(bool)


def _jsonable(v):
    return json.loads(json.dumps(v))


def dali_checkpoint_text(pipe) -> str:
    """A built pipeline's DALI checkpoint (reader position, RNG states) as base64 text."""
    dali = pipe.checkpoint()
    if isinstance(dali, str):
        dali = dali.encode("latin-1")
    return base64.b64encode(dali).decode("ascii")


def parse_state(checkpoint: str | bytes, signature: dict, kind: str, source: str, formats: Sequence[str],
                layout_free: Callable[[dict], bool] = lambda st: False) -> dict:
    """A train loader's saved state, refused in one line unless it is one of ``formats`` and
    matches ``signature`` (what the loader is built for; the world-size keys are skipped
    when ``layout_free(state)``). ``source``: "file list" or "shards", for the message."""
    try:
        st = json.loads(checkpoint)
        assert st.get("format") in formats
    except (ValueError, AssertionError, TypeError):
        raise ValueError(f"checkpoint is not a {STATE_FORMAT} loader state (pass what loader.state() returned)") \
            from None
    skip = _LAYOUT_KEYS if layout_free(st) else ()
    diff = [f"{k}: saved {st.get(k)!r}, now {v!r}" for k, v in signature.items()
            if _jsonable(st.get(k)) != _jsonable(v) and k not in skip]
    if diff:
        raise ValueError(f"{kind} loader checkpoint does not match this loader ({'; '.join(diff)}): "
                         f"resume with the same {source}, batch size, world size and augmentation settings")
    return st


class EvalLoader:
    """One epoch of eval batches per ``iter()``; ``len()`` batches on every rank.

    Each batch: images float32 [B,3,S,S], labels int64 [B], sample_ids int64 [B] (CPU),
    valid bool [B]. Every rank runs ``ceil(ceil(n / num_shards) / B)`` batches (so
    collectives inside the eval step cannot deadlock): the reader pads this rank's last
    batch by repeating its last sample, and smaller shards get extra copies of their
    last batch. Padding rows have valid=False and repeat a real sample id and label, so
    indexing with them is safe; sum only valid rows.
    """

    def __init__(self, *, fl: FileList, batch_size: int, shard_id: int, num_shards: int, mode: str,
                 build: Callable[[], object], image_shape: tuple[int, ...]):
        n = len(fl)
        self._list_path = fl.list_path
        self._fl = fl
        self.batch_size = batch_size
        self.sample_ids = shard_indices(n, shard_id, num_shards)
        self.num_batches = math.ceil(math.ceil(n / num_shards) / batch_size)
        self._reader_batches = math.ceil(len(self.sample_ids) / batch_size)
        self._device = C.torch_device(mode)
        self._labels = torch.tensor(fl.labels, dtype=torch.int64)
        self._image_shape = image_shape
        # An empty shard (more ranks than samples) has nothing to read: no pipeline,
        # all-padding batches keep this rank in step with the others.
        self._pipe = build() if len(self.sample_ids) > 0 else None
        self._taken = 0  # reader batches taken in the current pass

    def __len__(self) -> int:
        return self.num_batches

    def _locate(self, cause: str) -> str | None:
        return _locate_in_shard(self, cause)

    def __iter__(self) -> Iterator[dict]:
        # An earlier pass stopped early: finish its reader epoch so this one starts at the top.
        while 0 < self._taken < self._reader_batches:
            C.run_pipeline(self._pipe, self._list_path, self._locate)
            self._taken += 1
        self._taken = 0
        last = None
        for i in range(self.num_batches):
            if i >= self._reader_batches:
                yield self._padding_batch(last)
                continue
            images, ids = C.dali_to_torch(C.run_pipeline(self._pipe, self._list_path, self._locate), self._device)
            self._taken += 1
            ids = ids.reshape(-1).to(torch.int64)
            pos = torch.arange(i * self.batch_size, (i + 1) * self.batch_size)
            last = {"images": images, "labels": to_device(self._labels[ids], self._device), "sample_ids": ids,
                    "valid": to_device(pos < len(self.sample_ids), self._device)}
            yield last
        self._taken = 0

    def _padding_batch(self, last: dict | None) -> dict:
        B = self.batch_size
        if last is None:
            batch = {"images": torch.zeros((B, *self._image_shape), device=self._device),
                     "labels": torch.zeros(B, dtype=torch.int64, device=self._device),
                     "sample_ids": torch.zeros(B, dtype=torch.int64)}
        else:
            batch = {k: v.clone() for k, v in last.items() if k != "valid"}
        batch["valid"] = torch.zeros(B, dtype=torch.bool, device=self._device)
        return batch


class TokenizerViewLoader:
    """Each sample of the shard once, in file-list order, in batches of ``batch_size``
    (the last one smaller). Batches: images uint8 [B,3,size,size], sample_ids int64 [B] (CPU)."""

    def __init__(self, *, fl: FileList, batch_size: int, shard_id: int, num_shards: int, mode: str,
                 build: Callable[[], object]):
        self._list_path = fl.list_path
        self._fl = fl
        self.batch_size = batch_size
        self.sample_ids = shard_indices(len(fl), shard_id, num_shards)
        self._reader_batches = math.ceil(len(self.sample_ids) / batch_size)
        self._device = C.torch_device(mode)
        self._pipe = build() if len(self.sample_ids) > 0 else None
        self._taken = 0

    def __len__(self) -> int:
        return self._reader_batches

    def _locate(self, cause: str) -> str | None:
        return _locate_in_shard(self, cause)

    def __iter__(self) -> Iterator[dict]:
        # An earlier pass stopped early: finish its reader epoch so this one starts at the top.
        while 0 < self._taken < self._reader_batches:
            C.run_pipeline(self._pipe, self._list_path, self._locate)
            self._taken += 1
        self._taken = 0
        n = len(self.sample_ids)
        for i in range(self._reader_batches):
            images, ids = C.dali_to_torch(C.run_pipeline(self._pipe, self._list_path, self._locate), self._device)
            self._taken += 1
            keep = min(self.batch_size, n - i * self.batch_size)  # drop the reader's padding
            yield {"images": images[:keep], "sample_ids": ids.reshape(-1)[:keep].to(torch.int64)}
        self._taken = 0


# ---------------------------------------------------------------------------------------
# Public builders (plain keyword arguments; the config layer maps onto them).
# ---------------------------------------------------------------------------------------

def tokenizer_view_loader(filelist: str | os.PathLike | FileList, *, size: int, batch_size: int, shard_id: int = 0,
                          num_shards: int = 1, num_threads: int = 2, device: str = "auto") -> TokenizerViewLoader:
    """The images exactly as the offline tokenizer must see them.

    Centre square crop (side = shorter side), resized to ``size`` (bicubic, antialiased),
    no augmentation. Yields dicts {"images": uint8 [B,3,size,size] RGB (not normalised),
    on the GPU in mixed mode; "sample_ids": int64 [B] on the CPU}, covering each sample
    of the shard exactly once in file-list order.
    """
    fl, mode = _prepare(filelist, batch_size, shard_id, num_shards, device)
    return TokenizerViewLoader(
        fl=fl, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, mode=mode,
        build=lambda: G.build_tokenizer_view(fl, size=size, batch_size=batch_size, shard_id=shard_id,
                                             num_shards=num_shards, num_threads=num_threads, mode=mode))


def pretrain_loader(filelist: str | os.PathLike | FileList, *, img_size: int, batch_size: int, shard_id: int,
                    num_shards: int, seed: int, num_threads: int = 2, device: str = "auto",
                    color_jitter: float = 0.4, mean: Sequence[float] = C.IMAGENET_DEFAULT_MEAN,
                    std: Sequence[float] = C.IMAGENET_DEFAULT_STD, tokenizer_view_size: int | None = None,
                    random_resized_crop: bool = False, checkpoint: str | bytes | None = None,
                    prefetch_queue_depth: int = 2) -> TrainLoader:
    """Pre-training batches, forever. Each: {"images": float32 [B,3,S,S] normalised,
    "sample_ids": int64 [B] (CPU), "tok_images": uint8 [B,3,T,T] if tokenizer_view_size}.

    Default view: the tokenizer's centre square crop + colour jitter (brightness,
    contrast, saturation ``color_jitter``), no flip. ``random_resized_crop``: RRC +
    flip, identical for both views. ``tok_images`` carry the same jitter as ``images``.
    ``prefetch_queue_depth``: batches DALI prepares ahead (not part of the resume state).
    """
    fl, mode = _prepare(filelist, batch_size, shard_id, num_shards, device)
    kw = pretrain_view(img_size=img_size, color_jitter=color_jitter, mean=mean, std=std,
                       tokenizer_view_size=tokenizer_view_size, random_resized_crop=random_resized_crop)
    return TrainLoader(
        kind="pretrain", fl=fl, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, mode=mode,
        signature={"seed": seed, **kw}, outputs=G.pretrain_outputs(bool(tokenizer_view_size)), with_labels=False,
        checkpoint=checkpoint, prefetch_depth=prefetch_queue_depth,
        build=lambda ck, fl=fl, seed=seed: G.build_pretrain(
            fl, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed, num_threads=num_threads,
            mode=mode, checkpoint=ck, prefetch_queue_depth=prefetch_queue_depth, **kw))


def finetune_train_loader(filelist: str | os.PathLike | FileList, *, img_size: int, batch_size: int, shard_id: int,
                          num_shards: int, seed: int, num_threads: int = 2, device: str = "auto",
                          scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                          hflip: float = 0.5, rand_augment: str | None = "rand-m9-mstd0.5",
                          mean: Sequence[float] = C.IMAGENET_DEFAULT_MEAN,
                          std: Sequence[float] = C.IMAGENET_DEFAULT_STD,
                          checkpoint: str | bytes | None = None, interpolation: str = "bicubic",
                          prefetch_queue_depth: int = 2) -> TrainLoader:
    """Fine-tuning batches, forever. Each: {"images": float32 [B,3,S,S] normalised,
    "labels": int64 [B] class index, "sample_ids": int64 [B] (CPU)}.

    Random resized crop (``scale``, ``ratio``, resized with ``interpolation`` as timm's
    ``RandomResizedCropAndInterpolation``: bicubic by default), horizontal flip (prob ``hflip``),
    timm-style RandAugment string or None; mixup/cutmix/erasing belong to the step.
    """
    fl, mode = _prepare(filelist, batch_size, shard_id, num_shards, device)
    kw, ra = finetune_view(img_size=img_size, scale=scale, ratio=ratio, hflip=hflip, mean=mean, std=std,
                           interpolation=interpolation, rand_augment=rand_augment)
    return TrainLoader(
        kind="finetune_train", fl=fl, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, mode=mode,
        signature={"seed": seed, "rand_augment": rand_augment, **kw}, outputs=G.FINETUNE_OUTPUTS, with_labels=True,
        checkpoint=checkpoint, prefetch_depth=prefetch_queue_depth,
        build=lambda ck, fl=fl, seed=seed: G.build_finetune_train(
            fl, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed, num_threads=num_threads,
            mode=mode, rand_augment=ra, checkpoint=ck, prefetch_queue_depth=prefetch_queue_depth, **kw))


def eval_loader(filelist: str | os.PathLike | FileList, *, img_size: int, batch_size: int, shard_id: int,
                num_shards: int, num_threads: int = 2, device: str = "auto", crop_pct: float = 224 / 248,
                interpolation: str = "bicubic", mean: Sequence[float] = C.IMAGENET_DEFAULT_MEAN,
                std: Sequence[float] = C.IMAGENET_DEFAULT_STD) -> EvalLoader:
    """Eval batches: resize shorter side to ``floor(img_size / crop_pct)`` (antialiased),
    centre crop ``img_size``, normalise — timm's eval transform. Each batch: images float32
    [B,3,S,S], labels int64 [B], sample_ids int64 [B] (CPU), valid bool [B]."""
    fl, mode = _prepare(filelist, batch_size, shard_id, num_shards, device)
    scale_size = eval_scale_size(img_size, crop_pct)
    return EvalLoader(
        fl=fl, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, mode=mode,
        image_shape=(3, img_size, img_size),
        build=lambda: G.build_eval(fl, img_size=img_size, batch_size=batch_size, shard_id=shard_id,
                                   num_shards=num_shards, num_threads=num_threads, mode=mode, scale_size=scale_size,
                                   interpolation=interpolation, mean=mean, std=std))


# Checked view arguments, shared with the shard builders (pipelines/shards.py).

def pretrain_view(*, img_size: int, color_jitter: float, mean: Sequence[float], std: Sequence[float],
                  tokenizer_view_size: int | None, random_resized_crop: bool) -> dict:
    """``build_pretrain``'s view keywords (also the loader's signature), checked."""
    if color_jitter < 0:
        raise ValueError(f"color_jitter={color_jitter}: must be >= 0")
    return dict(img_size=img_size, color_jitter=color_jitter, mean=list(mean), std=list(std),
                tokenizer_view_size=tokenizer_view_size, random_resized_crop=random_resized_crop)


def finetune_view(*, img_size: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                  mean: Sequence[float], std: Sequence[float], interpolation: str,
                  rand_augment: str | None) -> tuple[dict, RandAugmentSpec | None]:
    """``build_finetune_train``'s view keywords (also the loader's signature), checked, and
    the parsed RandAugment string."""
    ra = parse_rand_augment(rand_augment) if rand_augment else None
    if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"scale={tuple(scale)}, ratio={tuple(ratio)}: need 0 < lo <= hi (scale hi <= 1)")
    return dict(img_size=img_size, scale=list(scale), ratio=list(ratio), hflip=hflip, mean=list(mean),
                std=list(std), interpolation=interpolation), ra


def eval_scale_size(img_size: int, crop_pct: float) -> int:
    """Shorter side before the centre crop (timm: ``floor(img_size / crop_pct)``)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct}: must be in (0, 1]")
    return math.floor(img_size / crop_pct)


def _prepare(filelist, batch_size: int, shard_id: int, num_shards: int, device: str) -> tuple[FileList, str]:
    mode = C.checked_mode(batch_size, shard_id, num_shards, device)
    return C.load_filelist(filelist), mode
