"""Which sample broke a DALI pipeline: DALI's decoder errors name no file (``nvImageCodec
failure: '#4'``), so after a failure the loaders ask DALI itself, file by file, in the order
the reader reads them, and name the first file (list line) or shard sample it cannot decode.
"""

from __future__ import annotations

import io
import os
import re
import stat
import time
from typing import Iterable, Sequence

from mapet_ds.filelist import FileList
from mapet_ds.images import DaliProbe, dali_takes


def _read_capped(path: str, max_bytes: int = 256 * 2**20) -> bytes | str:
    """A regular file's bytes, else why not (a FIFO must not block the diagnosis)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size == 0:
            return "empty file"
        if st.st_size > max_bytes:
            return f"{st.st_size} bytes, too large to check"
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:  # never blocks on a FIFO
            return f.read(max_bytes)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"


def describe_undecodable(data: bytes, dali_error: str) -> str:
    """Why DALI refused ``data``, in PIL's words when PIL knows it (format and mode)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format, img.mode
    except Exception:  # noqa: BLE001 - PIL cannot even identify it
        return "not an image"
    return f"DALI cannot decode it ({fmt} in PIL mode {mode}: {dali_error})"


def find_broken(fl: FileList, sample_ids: Iterable[int], *, decode: bool = True,
                budget_s: float = 30.0) -> str | None:
    """``<list>:<line>: <path>: <what is wrong>`` for the first of ``sample_ids`` (in the order
    given) that is not a regular file, is empty or unreadable, or (with ``decode``) that DALI's
    CPU decoder fails on; else None, also when ``budget_s`` runs out.

    Runs only after a pipeline has failed: DALI's decoder errors do not say which sample.
    ``decode=False`` reads headers only (PIL: an image in a format and mode DALI takes), for
    long candidate lists.
    """
    from PIL import Image

    probe = DaliProbe() if decode else None
    t0 = time.monotonic()
    for i in sample_ids:
        path = fl.abspath(int(i))
        if decode:
            data = _read_capped(path)
            if isinstance(data, str):
                return f"{fl.where(int(i))}: {data}"
            err = probe.error(data)
            if err is not None:
                return f"{fl.where(int(i))}: {describe_undecodable(data, err)}"
        else:
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):
                    return f"{fl.where(int(i))}: not a regular file"
                if os.path.getsize(path) == 0:
                    return f"{fl.where(int(i))}: empty file"
                with Image.open(path) as img:
                    fmt, mode = img.format, img.mode
            except Exception as e:  # noqa: BLE001 - any failure here is the answer we are looking for
                what = "not an image" if type(e).__name__ == "UnidentifiedImageError" else f"cannot be read ({e})"
                return f"{fl.where(int(i))}: {what}"
            if not dali_takes(fmt, mode):
                return f"{fl.where(int(i))}: DALI cannot decode it ({fmt} in PIL mode {mode})"
        if time.monotonic() - t0 > budget_s:
            return None
    return None


def locate_failure(fl: FileList, cause: str, candidates: Sequence[int] | None) -> str | None:
    """Name the list line behind a pipeline failure ``cause`` (DALI's message).

    The reader names the file it cannot map; for decoder failures the ``candidates`` (sample
    ids possibly in flight, in the order the reader reads them) are decoded one by one with
    DALI's CPU decoder and the first that fails is named; without candidates, or when none
    fails, the whole list's headers are checked.
    """
    m = re.search(r"File mapping failed: (.+)$", cause)
    if m:
        rel = os.path.normpath(os.path.relpath(m.group(1).strip(), fl.root))
        index = {os.path.normpath(p): i for i, p in enumerate(fl.paths)}
        if rel in index:
            return find_broken(fl, [index[rel]]) or f"{fl.where(index[rel])}: cannot be read"
    found = None
    if candidates is not None:
        candidates = [int(i) for i in candidates]
        # DALI's CPU decoder took them all (the GPU decoder may be stricter): PIL's full decode next
        found = find_broken(fl, candidates) or _pil_broken(fl, candidates)
    return found or find_broken(fl, range(len(fl)), decode=False)


def _pil_broken(fl: FileList, sample_ids: Sequence[int], budget_s: float = 30.0) -> str | None:
    """The first of ``sample_ids`` that PIL cannot decode (truncated, corrupt), else None."""
    from PIL import Image

    t0 = time.monotonic()
    for i in sample_ids:
        data = _read_capped(fl.abspath(i))
        if isinstance(data, str):
            return f"{fl.where(i)}: {data}"
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as e:  # noqa: BLE001 - any failure here is the answer we are looking for
            return f"{fl.where(i)}: cannot be decoded ({e})"
        if time.monotonic() - t0 > budget_s:
            return None
    return None


def shards_hint(path) -> str:
    """How to find the broken samples of a shard set (appended to shard-loader errors)."""
    return (f"run data/scan.py --shards {path} to list its broken samples, then make the shards again with "
            f"data/make_shards.py (its image check on, i.e. without --no-check)")


def locate_in_tars(tars: Sequence[str], budget_s: float = 60.0) -> str | None:
    """``<tar>: sample <key> (<member>, sample id N): <what>`` for the first image member of
    ``tars`` (in order) that DALI's CPU decoder fails on, else None (also when ``budget_s``
    runs out)."""
    import tarfile

    from mapet_ds.pipelines.shardset import IMAGE_EXTS

    probe = DaliProbe()
    t0 = time.monotonic()
    for tar_path in tars:
        try:
            with tarfile.open(tar_path) as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if not m.isfile() or ext not in IMAGE_EXTS:
                        continue
                    data = tar.extractfile(m).read()
                    err = probe.error(data)
                    if err is not None:
                        sid = f", sample id {int(key)}" if key.isdigit() else ""
                        return f"{tar_path}: sample {key} ({m.name}{sid}): {describe_undecodable(data, err)}"
                    if time.monotonic() - t0 > budget_s:
                        return None
        except (OSError, tarfile.TarError) as e:
            return f"{tar_path}: cannot be read ({e})"
    return None
