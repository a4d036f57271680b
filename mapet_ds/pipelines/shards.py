"""Webdataset tar shards (data/make_shards.py) read through DALI's webdataset reader.

A shard set is a folder of ``shard-NNNNNN.tar`` + DALI ``.idx`` files and a
``manifest.json``. Each sample carries its image bytes, class index (``.cls``), original
sample id (``.id``) and, when made with a token store, its token row (``.tok``): labels
and tokens come out of the reader with the image, so nothing the size of the dataset is
held in host or GPU memory.

The graphs are the file-list graphs (mapet_ds.pipelines.graphs) with this reader in
place of the file reader; the loaders are the file-list loaders' logic:

* training: every epoch the tars are put in a new order (one seed, the same on every
  rank) and the samples split contiguously over ranks as DALI's ``shard_id``/
  ``num_shards`` would, so each sample is used once per epoch; a rank's reader gets only
  the tars of its part (memory per rank ~ dataset / ranks, see ``rank_tars``) and
  shuffles them in DALI's buffer. The webdataset reader supports DALI pipeline
  checkpointing, so ``state()`` (epoch, step, DALI checkpoint) resumes exactly.
* eval: this rank's contiguous part of the stored order, padded; a ``valid`` mask marks
  the padding so summing over ranks counts every sample once.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import tempfile
import weakref
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from mapet_ds.filelist import shard_indices
from mapet_ds.pipelines import common as C
from mapet_ds.pipelines import graphs as G
from mapet_ds.pipelines.loaders import (
    STATE_FORMAT,
    EpochPosition,
    dali_checkpoint_text,
    eval_scale_size,
    finetune_view,
    parse_state,
    pretrain_view,
)
from mapet_ds.transfer import to_device

# the shard-set format and its checks live in shardset.py; re-exported here
from mapet_ds.pipelines.shardset import (  # noqa: E402,F401
    FIX,
    IMAGE_EXTS,
    MANIFEST,
    MANIFEST_FORMAT,
    ShardSet,
    ShardSetError,
    check_tokens,
    open_shards,
    shard_name,
)


def rank_tars(ss: ShardSet, order: Sequence[int], shard_id: int, num_shards: int, tmp_dir: str,
              tag: str) -> tuple[list[str], list[str]]:
    """The tars (and index files) holding this rank's samples when the tars are read in ``order``.

    The samples of the tars in ``order`` are split over ranks contiguously, as DALI's own
    ``shard_id``/``num_shards`` would (``shard_indices``). We do the split ourselves so that
    a rank's reader only parses the index of its own tars: DALI's sharding parses every
    index on every rank (~600 bytes of host memory per sample and rank, measured in
    bench/shards.py). The two tars cut by the rank's range get a trimmed copy of their
    index in ``tmp_dir`` (DALI reads exactly the samples an index lists).
    """
    lo_hi = shard_indices(len(ss), shard_id, num_shards)
    lo, hi = lo_hi.start, lo_hi.stop
    entries = ss.manifest["shards"]
    paths, idxs, start = [], [], 0
    for t in order:
        count = int(entries[t]["count"])
        a, b = max(lo, start), min(hi, start + count)
        if a < b:
            paths.append(ss.tars[t])
            if (a, b) == (start, start + count):
                idxs.append(ss.indexes[t])
            else:
                with open(ss.indexes[t], encoding="utf-8") as f:
                    lines = f.read().splitlines()[1:]
                part = os.path.join(tmp_dir, f"{tag}_{t:06d}.idx")
                with open(part, "w", encoding="utf-8") as f:
                    f.write(f"v1.2 {b - a}\n" + "".join(ln + "\n" for ln in lines[a - start:b - start]))
                idxs.append(part)
        start += count
    return paths, idxs


def webdataset_reader(paths: list[str], indexes: list[str], *, shuffle: bool, tokens: bool):
    """DALI webdataset reader over one rank's tars -> (encoded image, sample id int64 [1],
    label int64 [1][, tokens int16 [cells]]); ``shuffle``: a shuffle buffer of ``initial_fill``."""
    from nvidia.dali import fn, types

    ext = [";".join(IMAGE_EXTS), "id", "cls"] + (["tok"] if tokens else [])
    dtypes = [types.UINT8, types.INT64, types.INT64] + ([types.INT16] if tokens else [])
    return tuple(fn.readers.webdataset(
        name=C.READER_NAME, paths=paths, index_paths=indexes, ext=ext, dtypes=dtypes,
        missing_component_behavior="error", pad_last_batch=True, random_shuffle=shuffle, stick_to_shard=True))


def epoch_order(num_tars: int, seed: int, epoch: int) -> list[int]:
    """Tar order of a training epoch: the same on every rank, new every epoch."""
    return [int(t) for t in np.random.default_rng([abs(int(seed)), int(epoch)]).permutation(num_tars)]


class ShardTrainLoader(EpochPosition):
    """Endless training batches over a shard set; TrainLoader's contract (``steps_per_epoch``,
    ``epoch``, ``state()``/``checkpoint=``), labels and tokens from the shards.

    Batches: the graph's outputs, plus "labels" int64 [B] (on the image device) and, with
    tokens, "tokens" int16 [B, grid*grid] (CPU). Every epoch the tars are put in a new order
    (one seed, every rank) and this rank reads its contiguous part of the samples through a
    fresh pipeline over only those tars, shuffled in DALI's buffer. ``state()`` holds the
    epoch, the step in it and the DALI checkpoint of the epoch's pipeline (reader position
    and RNG states), so a rebuilt loader continues exactly.
    """

    def __init__(self, *, kind: str, ss: ShardSet, batch_size: int, shard_id: int, num_shards: int, mode: str,
                 seed: int, signature: dict, build: Callable, outputs: Sequence[str],
                 checkpoint: str | bytes | None):
        self.kind = kind
        self._ss = ss
        self.batch_size = batch_size
        self.shard_id, self.num_shards, self._seed = shard_id, num_shards, seed
        n = len(ss)
        self.steps_per_epoch = (n // num_shards) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"shard set {ss.path}: {n} samples over {num_shards} rank(s) give no full batch of "
                             f"{batch_size} per rank: lower the batch size")
        self._signature = {"kind": kind, "shards_digest": ss.digest(), "num_samples": n, "batch_size": batch_size,
                           "shard_id": shard_id, "num_shards": num_shards, "seed": seed, **signature}
        self._build, self._outputs = build, tuple(outputs)
        self._device = C.torch_device(mode)
        self._tmp = tempfile.mkdtemp(prefix="mapet_shards_")
        weakref.finalize(self, shutil.rmtree, self._tmp, True)
        self._epoch, self._step, self._epoch_len = 0, 0, self.steps_per_epoch
        dali = self._load_state(checkpoint) if checkpoint is not None else None
        self._pipe = self._epoch_pipeline(self._epoch, dali)

    def _epoch_pipeline(self, epoch: int, dali: bytes | None):
        paths, idxs = rank_tars(self._ss, epoch_order(len(self._ss.tars), self._seed, epoch), self.shard_id,
                                self.num_shards, self._tmp, f"e{epoch}")
        self._tars = paths  # where the locator looks for the sample a failure came from
        # augmentation streams: distinct per epoch (and per rank, inside the graph builder)
        return self._build(paths, idxs, C.rank_seed(self._seed, epoch, salt=3), dali)

    def __next__(self) -> dict:
        if self._step >= self.steps_per_epoch:
            self._pipe = None  # free the old epoch's buffers before building the next
            self._epoch, self._step = self._epoch + 1, 0
            self._pipe = self._epoch_pipeline(self._epoch, None)
        tensors = C.dali_to_torch(C.run_pipeline(self._pipe, self._ss.path, lambda _: C.locate_in_tars(self._tars),
                                                 C.shards_hint(self._ss.path)), self._device)
        self._step += 1
        batch = dict(zip(self._outputs, tensors))
        batch["sample_ids"] = batch["sample_ids"].reshape(-1)
        batch["labels"] = to_device(batch["labels"].reshape(-1), self._device)
        return batch

    def state(self) -> str:
        """JSON string: DALI checkpoint of this epoch's pipeline + epoch/step + what the loader was built for."""
        return json.dumps({"format": STATE_FORMAT, **self._signature, "epoch": self._epoch, "step": self._step,
                           "dali": dali_checkpoint_text(self._pipe)})

    def _load_state(self, checkpoint: str | bytes) -> bytes:
        st = parse_state(checkpoint, self._signature, self.kind, "shards", (STATE_FORMAT,))
        self._epoch, self._step = int(st["epoch"]), int(st["step"])
        return base64.b64decode(st["dali"])


class ShardEvalLoader:
    """One epoch of eval batches per ``iter()`` (EvalLoader's contract): ``len()`` batches on
    every rank, images float32 [B,3,S,S], labels int64 [B], sample_ids int64 [B] (CPU),
    valid bool [B]; padding rows repeat a real sample and have valid=False. A rank reads
    its contiguous part of the stored order (only its tars)."""

    def __init__(self, *, ss: ShardSet, batch_size: int, shard_id: int, num_shards: int, mode: str, build,
                 image_shape: tuple[int, ...]):
        n = len(ss)
        self._path = ss.path
        self.batch_size = batch_size
        self.num_local = len(shard_indices(n, shard_id, num_shards))
        self.num_batches = math.ceil(math.ceil(n / num_shards) / batch_size)
        self._reader_batches = math.ceil(self.num_local / batch_size)
        self._device = C.torch_device(mode)
        self._image_shape = image_shape
        self._tmp = tempfile.mkdtemp(prefix="mapet_shards_")
        weakref.finalize(self, shutil.rmtree, self._tmp, True)
        # an empty part (more ranks than samples): nothing to read, this rank only pads
        self._pipe = None
        self._tars: list[str] = []
        if self.num_local > 0:
            self._tars, idxs = rank_tars(ss, range(len(ss.tars)), shard_id, num_shards, self._tmp, "eval")
            self._pipe = build(self._tars, idxs)
        self._taken = 0

    def _run(self):
        return C.run_pipeline(self._pipe, self._path, lambda _: C.locate_in_tars(self._tars), C.shards_hint(self._path))

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        while 0 < self._taken < self._reader_batches:  # an earlier pass stopped early
            self._run()
            self._taken += 1
        self._taken = 0
        last = None
        B = self.batch_size
        for i in range(self.num_batches):
            if i >= self._reader_batches:
                if last is None:
                    last = {"images": torch.zeros((B, *self._image_shape), device=self._device),
                            "labels": torch.zeros(B, dtype=torch.int64, device=self._device),
                            "sample_ids": torch.zeros(B, dtype=torch.int64)}
                yield {**{k: v.clone() for k, v in last.items() if k != "valid"},
                       "valid": torch.zeros(B, dtype=torch.bool, device=self._device)}
                continue
            images, ids, labels = C.dali_to_torch(self._run(), self._device)
            self._taken += 1
            pos = torch.arange(i * B, (i + 1) * B)
            last = {"images": images, "labels": to_device(labels.reshape(-1), self._device),
                    "sample_ids": ids.reshape(-1), "valid": to_device(pos < self.num_local, self._device)}
            yield last
        self._taken = 0


# ---------------------------------------------------------------------------------------
# Public builders: the file-list builders' keyword arguments, a shard folder instead of a list.
# ---------------------------------------------------------------------------------------

def pretrain_shard_loader(shards: str | os.PathLike | ShardSet, *, img_size: int, batch_size: int, shard_id: int,
                          num_shards: int, seed: int, num_threads: int = 2, device: str = "auto",
                          color_jitter: float = 0.4, mean: Sequence[float] = C.IMAGENET_DEFAULT_MEAN,
                          std: Sequence[float] = C.IMAGENET_DEFAULT_STD, tokenizer_view_size: int | None = None,
                          random_resized_crop: bool = False, tokens: bool = True,
                          checkpoint: str | bytes | None = None, prefetch_queue_depth: int = 2) -> ShardTrainLoader:
    """pretrain_loader over shards. Batches: images, sample_ids, labels, [tok_images],
    and with ``tokens`` "tokens" int16 [B, grid*grid] straight from the shards."""
    ss, mode = _prepare(shards, batch_size, shard_id, num_shards, device)
    if tokens and ss.tokenizer is None:
        raise ShardSetError(f"shard set {ss.path} carries no tokens: make it with data/make_shards.py --token-store")
    kw = pretrain_view(img_size=img_size, color_jitter=color_jitter, mean=mean, std=std,
                       tokenizer_view_size=tokenizer_view_size, random_resized_crop=random_resized_crop)
    outputs = G.pretrain_outputs(bool(tokenizer_view_size)) + ("labels",) + (("tokens",) if tokens else ())
    return ShardTrainLoader(
        kind="pretrain_shards", ss=ss, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, mode=mode,
        seed=seed, signature={"tokens": tokens, **kw}, outputs=outputs, checkpoint=checkpoint,
        build=lambda paths, idxs, epoch_seed, ck: G.build_pretrain(
            None, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, seed=epoch_seed,
            num_threads=num_threads, mode=mode, checkpoint=ck, prefetch_queue_depth=prefetch_queue_depth, **kw,
            reader=lambda: webdataset_reader(paths, idxs, shuffle=True, tokens=tokens)))


def finetune_shard_loader(shards: str | os.PathLike | ShardSet, *, img_size: int, batch_size: int, shard_id: int,
                          num_shards: int, seed: int, num_threads: int = 2, device: str = "auto",
                          scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                          hflip: float = 0.5, rand_augment: str | None = "rand-m9-mstd0.5",
                          mean: Sequence[float] = C.IMAGENET_DEFAULT_MEAN,
                          std: Sequence[float] = C.IMAGENET_DEFAULT_STD,
                          checkpoint: str | bytes | None = None, interpolation: str = "bicubic",
                          prefetch_queue_depth: int = 2) -> ShardTrainLoader:
    """finetune_train_loader over shards; labels come from the shards."""
    ss, mode = _prepare(shards, batch_size, shard_id, num_shards, device)
    kw, ra = finetune_view(img_size=img_size, scale=scale, ratio=ratio, hflip=hflip, mean=mean, std=std,
                           interpolation=interpolation, rand_augment=rand_augment)
    return ShardTrainLoader(
        kind="finetune_train_shards", ss=ss, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards,
        mode=mode, seed=seed, signature={"rand_augment": rand_augment, **kw},
        outputs=G.FINETUNE_OUTPUTS + ("labels",), checkpoint=checkpoint,
        build=lambda paths, idxs, epoch_seed, ck: G.build_finetune_train(
            None, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, seed=epoch_seed,
            num_threads=num_threads, mode=mode, rand_augment=ra, checkpoint=ck,
            prefetch_queue_depth=prefetch_queue_depth, **kw,
            reader=lambda: webdataset_reader(paths, idxs, shuffle=True, tokens=False)))


def eval_shard_loader(shards: str | os.PathLike | ShardSet, *, img_size: int, batch_size: int, shard_id: int,
                      num_shards: int, num_threads: int = 2, device: str = "auto", crop_pct: float = 224 / 248,
                      interpolation: str = "bicubic", mean: Sequence[float] = C.IMAGENET_DEFAULT_MEAN,
                      std: Sequence[float] = C.IMAGENET_DEFAULT_STD) -> ShardEvalLoader:
    """eval_loader over shards (timm's eval transform; valid mask over the padding)."""
    ss, mode = _prepare(shards, batch_size, shard_id, num_shards, device)
    scale_size = eval_scale_size(img_size, crop_pct)
    return ShardEvalLoader(
        ss=ss, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, mode=mode,
        image_shape=(3, img_size, img_size),
        build=lambda paths, idxs: G.build_eval(
            None, img_size=img_size, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards,
            num_threads=num_threads, mode=mode, scale_size=scale_size, interpolation=interpolation, mean=mean,
            std=std,
            reader=lambda: webdataset_reader(paths, idxs, shuffle=False, tokens=False)))


def _prepare(shards, batch_size: int, shard_id: int, num_shards: int, device: str) -> tuple[ShardSet, str]:
    mode = C.checked_mode(batch_size, shard_id, num_shards, device)
    return open_shards(shards), mode
