"""Token store: the offline targets, one row of grid*grid token ids per image.

Layout of a store directory::

    meta.json        file-list digest, num images, grid, vocab, tokenizer spec, tokenizer
                     view (crop kind, size, interpolation), chunking, completeness
    tokens.npy       int16 [num_images, grid*grid], row = sample id (memory-mapped)
    progress/        chunk_000123.json markers of finished chunks (while assigning)

Training opens it against its file list and model config (``TokenStore.open``) and
reads rows by sample id. ``assign_tokens`` fills it in chunks that survive a kill and
can be shared between ranks.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from mapet_ds.filelist import FileList
from mapet_ds.safe_io import atomic_write, atomic_write_text, remove_own_temps, sub_folder

MAX_VOCAB = 32767
FORMAT = "mapet_ds.token_store/1"
FIX = "re-run `launch/tokens.py assign` for this file list and tokenizer into a new --out"
# Stores written before meta.json recorded the view were all made through the tokenizer-view loader,
# and before it recorded ``crop_anchor`` the centre square's odd margins were rounded half-to-even.
LEGACY_VIEW = {"crop": "center_square", "interpolation": "bicubic"}
LEGACY_ANCHOR = "half_even"


class TokenStoreError(ValueError):
    """A token store is missing, incomplete, or does not match the data/model it is used with."""


def _write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1), fsync=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class TokenStore:
    """int16 token table [num_images, grid*grid] on disk plus its metadata."""

    META, TOKENS, PROGRESS = "meta.json", "tokens.npy", "progress"

    def __init__(self, path: str, meta: dict[str, Any]):
        self.path = os.fspath(path)
        self.meta = meta
        try:
            self.tokens = np.load(os.path.join(self.path, self.TOKENS), mmap_mode="r")  # int16 [N, cells]
        except (OSError, ValueError) as e:
            raise TokenStoreError(f"token store {self.path}: {self.TOKENS} is missing or unreadable ({e}); {FIX}") from None
        if self.tokens.shape != (self.num_images, self.grid * self.grid) or self.tokens.dtype != np.int16:
            raise TokenStoreError(
                f"token store {self.path}: {self.TOKENS} is {self.tokens.dtype} {self.tokens.shape}, meta.json says "
                f"int16 ({self.num_images}, {self.grid * self.grid}): the store is damaged, {FIX}"
            )

    # ---- metadata -----------------------------------------------------------------
    num_images = property(lambda self: int(self.meta["num_images"]))
    grid = property(lambda self: int(self.meta["grid"]))
    vocab = property(lambda self: int(self.meta["vocab"]))
    spec = property(lambda self: self.meta["spec"])
    chunk_size = property(lambda self: int(self.meta["chunk_size"]))
    num_chunks = property(lambda self: -(-self.num_images // self.chunk_size))

    def __len__(self) -> int:
        return self.num_images

    def chunk_range(self, c: int) -> range:
        return range(c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_images))

    def done_chunks(self) -> set[int]:
        """Chunks whose rows are written and flushed (all of them once finalised)."""
        if self.meta.get("complete"):
            return set(range(self.num_chunks))
        return {c for c in _marker_chunks(os.path.join(self.path, self.PROGRESS)) if c < self.num_chunks}

    @property
    def complete(self) -> bool:
        return len(self.done_chunks()) == self.num_chunks

    def complete_rows(self) -> np.ndarray:
        """bool [num_images]: rows whose chunk is finished."""
        mask = np.zeros(self.num_images, dtype=bool)
        for c in self.done_chunks():
            r = self.chunk_range(c)
            mask[r.start : r.stop] = True
        return mask

    # ---- creation and opening ------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        filelist: FileList,
        grid: int,
        vocab: int,
        spec: dict[str, Any],
        *,
        chunk_size: int = 4096,
        view: dict[str, Any] | None = None,
    ) -> "TokenStore":
        """Make an empty store (rows filled with -1) for ``filelist``; replaces any old one."""
        path = os.fspath(path)
        if vocab > MAX_VOCAB or vocab < 1:
            raise TokenStoreError(f"vocab {vocab} does not fit the int16 token store (1..{MAX_VOCAB}): use k <= {MAX_VOCAB}")
        if grid < 1 or chunk_size < 1:
            raise TokenStoreError(f"grid ({grid}) and chunk_size ({chunk_size}) must be >= 1")
        progress = sub_folder(path, cls.PROGRESS)  # its real path stays inside the store
        for c in _marker_chunks(progress):  # an older store's markers; only names this code writes
            os.remove(os.path.join(progress, _marker_name(c)))
        remove_own_temps(progress, _MARKER_RE)
        remove_own_temps(path, rf"{re.escape(cls.META)}|{re.escape(cls.TOKENS)}")
        if os.path.exists(os.path.join(path, cls.META)):
            os.remove(os.path.join(path, cls.META))
        n, cells = len(filelist), grid * grid
        def fill(tmp) -> None:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(n, cells))
            for i in range(0, n, 65536):  # -1 marks rows not written yet
                arr[i : i + 65536] = -1
            arr.flush()
            del arr

        atomic_write(os.path.join(path, cls.TOKENS), fill)
        meta = {
            "format": FORMAT,
            "filelist": os.path.abspath(filelist.list_path),
            "digest": filelist.digest(),
            "num_images": n,
            "grid": int(grid),
            "vocab": int(vocab),
            "spec": spec,
            "view": view,
            "chunk_size": int(chunk_size),
            "complete": False,
            "rows_complete": 0,
            "created": _now(),
        }
        _write_json(os.path.join(path, cls.META), meta)
        return cls(path, meta)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        filelist: FileList | None = None,
        grid: int | None = None,
        vocab: int | None = None,
        view: dict[str, Any] | None = None,
        pixel_norm: str | None = None,
        allow_incomplete: bool = False,
    ) -> "TokenStore":
        """Open a store, checking it against the file list / model / training view it will be used with.

        ``view`` (e.g. ``pipelines.graphs.pretrain_view_spec(...)``): each of its keys must
        equal the tokenizer view recorded at assign time, else the tokens belong to other
        pixels than the patches they would train. ``pixel_norm`` (tokenizer.pixel_norm):
        the pixel tokenizer's normalisation the store must have been made with.
        """
        path = os.fspath(path)
        meta_path = os.path.join(path, cls.META)
        if not os.path.isfile(meta_path):
            raise TokenStoreError(f"no token store at {path} (no {cls.META}): make it with `launch/tokens.py assign --out {path}`")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise TokenStoreError(f"token store {path}: {cls.META} is unreadable ({e}); {FIX}") from None
        if meta.get("format") != FORMAT:
            raise TokenStoreError(f"{path} is not a mapet_ds token store (format {meta.get('format')!r}); {FIX}")
        if filelist is not None:
            if meta["num_images"] != len(filelist):
                raise TokenStoreError(
                    f"token store {path} has {meta['num_images']} rows but file list {filelist.list_path} has "
                    f"{len(filelist)} images; {FIX}"
                )
            if meta["digest"] != filelist.digest():
                raise TokenStoreError(
                    f"token store {path} was made for other images (file list {meta['filelist']}, digest "
                    f"{meta['digest'][:12]}) than {filelist.list_path} (digest {filelist.digest()[:12]}); {FIX}"
                )
        if grid is not None and meta["grid"] != grid:
            raise TokenStoreError(
                f"token store {path} has a {meta['grid']}x{meta['grid']} token grid but the model's patch grid is "
                f"{grid}x{grid}; {FIX} with a tokenizer at that grid"
            )
        if vocab is not None and meta["vocab"] != vocab:
            raise TokenStoreError(
                f"token store {path} has vocab {meta['vocab']} but the model predicts {vocab} classes: set the "
                f"model's vocab to {meta['vocab']}, or {FIX}"
            )
        if view is not None:
            view_mismatch(f"token store {path}", meta, view, FIX, TokenStoreError)
        if pixel_norm is not None:
            from mapet_ds.tokenizers.features import pixel_norm_of

            have = pixel_norm_of((meta.get("spec") or {}).get("extractor") or {})
            if have != pixel_norm:
                made = f"pixel_norm={have}" if have else "a non-pixel tokenizer"
                raise TokenStoreError(
                    f"token store {path} was made with {made} but tokenizer.pixel_norm={pixel_norm}: fit a codebook "
                    f"with `launch/tokens.py fit --pixel-norm {pixel_norm}` and assign it to a new store, or set "
                    f"tokenizer.pixel_norm={have or 'null'}"
                )
        store = cls(path, meta)
        if not allow_incomplete and not store.complete:
            done = int(store.complete_rows().sum())
            raise TokenStoreError(
                f"token store {path} is incomplete ({done} of {store.num_images} rows): re-run the same "
                f"`launch/tokens.py assign` command to finish it (finished chunks are kept)"
            )
        return store

    # ---- reading ---------------------------------------------------------------------
    def rows(self, sample_ids) -> torch.Tensor:
        """sample_ids: int [B] (tensor, array or list) -> int64 tensor [B, grid*grid] on the CPU."""
        ids = sample_ids.detach().cpu().numpy() if isinstance(sample_ids, torch.Tensor) else np.asarray(sample_ids)
        ids = ids.astype(np.int64, copy=False).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_images):
            bad = ids[(ids < 0) | (ids >= self.num_images)][0]
            raise TokenStoreError(f"sample id {bad} is outside token store {self.path} (0..{self.num_images - 1})")
        return torch.from_numpy(np.asarray(self.tokens[ids], dtype=np.int64))

    def as_tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The whole table as int16 [N, grid*grid] on ``device``: index it with the batch's
        sample ids there and call ``.long()`` (2 bytes per token: ImageNet-1k is ~0.5 GB)."""
        return torch.from_numpy(np.array(self.tokens, dtype=np.int16, copy=True)).to(device)

    # ---- writing (used by assign_tokens) -----------------------------------------------
    def write_chunk(self, c: int, tokens: np.ndarray) -> None:
        """Write chunk ``c``'s rows (int [len(chunk), cells]), make them durable, then mark it done.

        os.pwrite of the exact byte range (not a shared writable memmap): ranks on other
        nodes writing neighbouring chunks of one file on a network filesystem never
        rewrite each other's pages.
        """
        r = self.chunk_range(c)
        data = np.ascontiguousarray(tokens, dtype=np.int16)
        if data.shape != (len(r), self.grid * self.grid):
            raise TokenStoreError(f"chunk {c}: expected tokens {(len(r), self.grid * self.grid)}, got {data.shape}")
        if data.min() < 0 or data.max() >= self.vocab:
            raise TokenStoreError(f"chunk {c}: token ids outside 0..{self.vocab - 1}")
        row_bytes = self.grid * self.grid * 2
        fd = os.open(os.path.join(self.path, self.TOKENS), os.O_WRONLY)
        try:
            os.pwrite(fd, data.tobytes(), self.tokens.offset + r.start * row_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        _write_marker(self, c, {"chunk": c, "start": r.start, "stop": r.stop, "sha1": hashlib.sha1(data.tobytes()).hexdigest()})

    def finalise(self) -> bool:
        """Record completeness in meta.json once every chunk is done; True when complete.

        Idempotent: every rank that sees all chunks done may call it.
        """
        if not self.complete:
            return False
        if not self.meta.get("complete"):
            if int(np.asarray(self.tokens.min())) < 0:
                raise TokenStoreError(f"token store {self.path}: all chunks are marked done but some rows are unwritten; {FIX}")
            self.meta.update(complete=True, rows_complete=self.num_images, finished=_now())
            _write_json(os.path.join(self.path, self.META), self.meta)
        return True


def view_mismatch(where: str, meta: dict, view: dict[str, Any], fix: str, error: type[Exception]) -> None:
    """Raise ``error`` (one line) when the tokenizer view recorded in ``meta`` differs from
    the training ``view``; ``where`` names the store or shard set, ``fix`` how to remake it."""
    stored = dict(meta.get("view") or LEGACY_VIEW)
    if stored.get("crop") == "center_square":
        stored.setdefault("crop_anchor", LEGACY_ANCHOR)
    if stored.get("crop_anchor") == LEGACY_ANCHOR and view.get("crop_anchor") not in (None, LEGACY_ANCHOR):
        # Refused rather than accepted: on images with an odd margin the old square is 1 px off.
        raise error(
            f"{where} was made with the old centre-square rounding (odd margins half-to-even; mapet_ds now floors "
            f"them as timm's RandomResizedCrop does, so some images would be 1 px off their tokens): {fix}")
    diff = [f"{k} {stored.get(k)!r} vs {v!r}" for k, v in view.items() if stored.get(k) != v]
    if diff:
        raise error(
            f"{where} holds tokens of another view than training uses ({', '.join(diff)}): every target "
            f"would belong to other pixels than its patch; train on the store's view (data.random_resized_crop=false "
            f"for a centre_square store) or {fix} from the training view"
        )


_MARKER_RE = r"chunk_\d{6,}\.json"


def _marker_name(c: int) -> str:
    return f"chunk_{c:06d}.json"


def _marker_chunks(progress: str | os.PathLike) -> set[int]:
    """Chunks marked done in ``progress``: the folder is listed, not globbed (a glob over the
    user's --out would read, or delete, another folder's markers when it holds ``[``)."""
    try:
        names = os.listdir(progress)
    except FileNotFoundError:
        return set()
    return {int(n[6:-5]) for n in names if re.fullmatch(_MARKER_RE, n)}


def _write_marker(store: TokenStore, c: int, record: dict) -> None:
    """Atomically mark chunk ``c`` finished (a separate function so tests can crash here)."""
    _write_json(os.path.join(store.path, TokenStore.PROGRESS, _marker_name(c)), record)


def iterate_images(
    filelist: FileList,
    ids: np.ndarray | None,
    size: int,
    *,
    batch_size: int = 64,
    num_threads: int = 2,
    device: str = "auto",
    loader: Callable | None = None,
    progress: bool = True,
    desc: str = "images",
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (global sample ids int64 [B], images uint8 [B, 3, size, size]) for ``ids``
    (sorted; None = all), in list order, each once, through the tokenizer-view loader.

    A subset is read as a sub-list (same root): the loader's sample ids are positions
    in that sub-list, mapped back to the full list's ids here.
    """
    from tqdm.auto import tqdm

    if loader is None:
        from mapet_ds.pipelines import tokenizer_view_loader as loader
    n = len(filelist)
    whole = ids is None or (len(ids) == n and np.array_equal(ids, np.arange(n)))
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return
    sub = filelist
    if not whole:
        # Same root and list path (for messages); the loader reads the in-memory paths.
        sub = FileList(filelist.list_path, filelist.root, [filelist.paths[i] for i in ids],
                       [filelist.labels[i] for i in ids], filelist.classes,
                       lines=None if filelist.lines is None else [filelist.lines[i] for i in ids])
    seen = 0
    bar = tqdm(total=len(ids), desc=desc, unit="img", disable=not progress, smoothing=0.1)
    for batch in loader(sub, size=size, batch_size=batch_size, shard_id=0, num_shards=1, num_threads=num_threads, device=device):
        local = batch["sample_ids"]
        local = (local.cpu().numpy() if isinstance(local, torch.Tensor) else np.asarray(local)).astype(np.int64).reshape(-1)
        seen += len(local)
        bar.update(len(local))
        yield ids[local], batch["images"]
    bar.close()
    if seen != len(ids):
        raise TokenStoreError(f"the image loader yielded {seen} images for {len(ids)} requested ({filelist.list_path})")


def loader_device(model) -> str:
    """Decode where the extractor/tokenizer runs: DALI "mixed" (GPU) when it is on CUDA, else "cpu"."""
    if model.device.type == "cuda":
        torch.cuda.set_device(model.device)  # DALI decodes on the current device
        return "mixed"
    return "cpu"


def _identity(spec: Any) -> Any:
    """A tokenizer spec without file locations: moving the codebook or weights is no change."""
    if isinstance(spec, dict):
        return {k: _identity(v) for k, v in spec.items() if k != "path"}
    if isinstance(spec, list):
        return [_identity(v) for v in spec]
    return spec


def _wait_for(path: str, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not os.path.isfile(path):
        if time.monotonic() - t0 > timeout:
            raise TokenStoreError(f"waited {timeout:.0f}s for {what} ({path}): did rank 0 fail? check its log")
        time.sleep(1.0)


def assign_tokens(
    filelist: FileList,
    tokenizer,
    out: str | os.PathLike,
    *,
    batch_size: int = 64,
    chunk_size: int = 4096,
    rank: int = 0,
    world_size: int = 1,
    num_threads: int = 2,
    loader: Callable | None = None,
    progress: bool = True,
    wait_timeout: float = 1800.0,
    view: dict[str, Any] | None = None,
) -> TokenStore:
    """Tokenise every image of ``filelist`` into the store at ``out``; resumable and sharded.

    tokenizer: ``KMeansTokenizer(extractor, codebook)`` or a VQ-KD / dVAE encoder (any
    object with input_size, grid, vocab_size, device, spec(), tokenize(uint8 [B,3,S,S])
    -> int [B, grid*grid]).

    Chunk c (rows [c*chunk_size, (c+1)*chunk_size)) belongs to rank c % world_size; a rank
    skips chunks already marked done, so a rerun after a kill only does the rest, and a
    rerun with another world size still covers every chunk once. Rank 0 creates the store,
    the others wait for it. Whichever rank sees every chunk done finalises meta.json.
    ``view`` (default: the tokenizer-view loader's, ``pipelines.graphs.tokenizer_view_spec``)
    is recorded in meta.json and checked by ``TokenStore.open(view=...)`` at training time.
    """
    if view is None:
        from mapet_ds.pipelines.graphs import tokenizer_view_spec

        view = tokenizer_view_spec(tokenizer.input_size)
    out = os.fspath(out)
    spec, grid, vocab = tokenizer.spec(), int(tokenizer.grid), int(tokenizer.vocab_size)
    meta_path = os.path.join(out, TokenStore.META)
    if rank != 0:
        _wait_for(meta_path, wait_timeout, "rank 0 to create the token store")
    if os.path.isfile(meta_path):  # resuming (or another rank's fresh store)
        store = TokenStore.open(out, filelist=filelist, grid=grid, vocab=vocab, view=view, allow_incomplete=True)
        if json.dumps(_identity(store.spec), sort_keys=True) != json.dumps(_identity(spec), sort_keys=True):
            raise TokenStoreError(
                f"token store {out} was written with another tokenizer ({_short(store.spec)}) than this one "
                f"({_short(spec)}): delete {out} or choose another --out"
            )
        if world_size == 1:  # no other rank can be writing: a killed run's marker temps go
            remove_own_temps(os.path.join(out, TokenStore.PROGRESS), _MARKER_RE)
    else:
        store = TokenStore.create(out, filelist, grid, vocab, spec, chunk_size=chunk_size, view=view)
    done = store.done_chunks()
    mine = [c for c in range(store.num_chunks) if c % world_size == rank and c not in done]
    if mine:
        ids = np.concatenate([np.arange(store.chunk_range(c).start, store.chunk_range(c).stop) for c in mine])
        cells = grid * grid
        pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # chunk -> (tokens, filled mask)
        stream = iterate_images(
            filelist, ids, tokenizer.input_size, batch_size=batch_size, num_threads=num_threads,
            device=loader_device(tokenizer), loader=loader, progress=progress, desc=f"assign rank {rank}/{world_size}",
        )
        for gids, images in stream:
            toks = tokenizer.tokenize(images).cpu().numpy().reshape(len(gids), cells)
            for c in np.unique(gids // store.chunk_size):
                r = store.chunk_range(int(c))
                buf, filled = pending.setdefault(int(c), (np.full((len(r), cells), -1, np.int16), np.zeros(len(r), bool)))
                sel = (gids // store.chunk_size) == c
                buf[gids[sel] - r.start] = toks[sel]
                filled[gids[sel] - r.start] = True
                if filled.all():
                    store.write_chunk(int(c), buf)
                    del pending[int(c)]
        if pending:
            raise TokenStoreError(f"rank {rank}: chunks {sorted(pending)} were left incomplete by the image loader")
    store.finalise()
    return store


def _short(spec: dict) -> str:
    """A few words naming a tokenizer spec for error messages."""
    cb = (spec.get("codebook") or {}).get("centroids_sha256") or spec.get("weights_sha256") or ""
    from mapet_ds.tokenizers.features import pixel_norm_of

    norm = pixel_norm_of(spec.get("extractor") or {})
    kind = f"{spec.get('kind')}, pixel_norm={norm}" if norm else str(spec.get("kind"))
    return f"{kind}, {cb[:12]}" if cb else kind


def spec_fingerprint(spec: dict) -> str:
    """sha256 of a tokenizer spec without file locations: what the tokens were made with.

    Shards carry it in their manifest; a recipe can pin it (``tokenizer.fingerprint``).
    """
    return hashlib.sha256(json.dumps(_identity(spec), sort_keys=True).encode()).hexdigest()
