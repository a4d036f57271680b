#!/usr/bin/env python
"""Pack a file list (and optionally its token store) into webdataset tar shards for DALI.

Millions of loose JPEGs on a cluster filesystem and a token table that grows with the
dataset do not scale; tar shards read sequentially do, and DALI reads them natively
(``fn.readers.webdataset``). Each sample of a shard holds, under the key
``<sample id, 9 digits>``::

    .jpg / .png / ...   the image bytes exactly as on disk (extension from the real format)
    .cls                class index, int64 little-endian (8 bytes)
    .id                 sample id = line index in the input list, int64 little-endian
    .tok                token row, int16 little-endian [grid*grid]   (with --token-store)

Samples are spread over shards of about ``--shard-size`` bytes in a seeded random order.
Beside each ``shard-000123.tar`` its DALI index ``shard-000123.idx`` (DALI's own
wds2idx); ``manifest.json`` lists shards, counts, classes and the tokenizer (spec,
fingerprint, grid, vocab) that training checks against its recipe.

Every image goes through data/scan.py's check first: truncated, undecodable, CMYK,
wrongly named, DALI-unsupported (32-bit/float TIFF, ...) or oversized (--max-pixels,
--max-bytes) images and anything that is not a regular file never enter a shard (they
are listed in the manifest). Even with --no-check only regular files under --max-bytes
are read.

Resumable: each finished shard is written under a temp name, renamed, then marked done
in ``progress/``; rerunning the same command redoes only unfinished shards. Parallel
over ``--workers`` processes (one shard per task).

    python data/make_shards.py data/train_clean.txt --token-store tokens/train --out shards/train
    python data/make_shards.py data/val.txt --out shards/val --shard-size 256MB
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scan import (  # noqa: E402
    CONVERT,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DROP,
    NotAnImage,
    check_bytes,
    read_image_bytes,
)

from mapet_ds.filelist import FileListError, read_filelist  # noqa: E402
from mapet_ds.pipelines.shardset import (  # noqa: E402
    IMAGE_EXTS,
    MANIFEST,
    MANIFEST_FORMAT,
    ShardSetError,
    shard_name,
)
from mapet_ds.safe_io import (  # noqa: E402
    InputGuard,
    UnsafeWriteError,
    atomic_write_text,
    out_folder,
    print_error,
    remove_own_temps,
    sub_folder,
    temp_file,
)
from mapet_ds.tokenizers.store import TokenStore, TokenStoreError, spec_fingerprint  # noqa: E402

PLAN = "plan.json"
PROGRESS = "progress"
# tar overhead per member (512-byte header + padding to 512) used for the size estimate
_MEMBER_OVERHEAD = 768
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif"}


class ShardMakeError(ValueError):
    """Bad input or an output folder that belongs to something else; one line."""


def parse_size(text: str) -> int:
    """'1GB', '500MB', '1.5G', '123456' -> bytes (powers of 1000, like disk sizes)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"--shard-size {text!r}: expected bytes or e.g. 500MB, 1GB")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[m.group(2).lower()]
    size = int(float(m.group(1)) * mult)
    if size < 1:
        raise argparse.ArgumentTypeError(f"--shard-size {text!r}: must be > 0")
    return size


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


# Names this command writes, and their temporaries (safe_io.temp_file) that a killed run leaves:
# a rerun deletes those and nothing else. Earlier versions named them NAME.tmp<pid>.
_SHARD_FILES = r"shard-\d{6}\.(?:tar|idx)"
_TOP_FILES = rf"{_SHARD_FILES}|{re.escape(PLAN)}|{re.escape(MANIFEST)}"
_MARKERS = r"shard-\d{6}\.json"


def _remove_stale_temps(out: Path) -> None:
    remove_own_temps(out, _TOP_FILES)
    remove_own_temps(out / PROGRESS, _MARKERS)
    for folder, names in ((out, _TOP_FILES), (out / PROGRESS, _MARKERS)):  # the old NAME.tmp<pid> names
        for e in os.scandir(folder):
            if re.fullmatch(rf"(?:{names})\.tmp\d+", e.name) and not e.is_dir(follow_symlinks=False):
                os.unlink(e.path)


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata: the same input gives byte-identical shards
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tar.addfile(ti, io.BytesIO(data))


def _image_ext(path: str, fmt: str | None) -> str:
    if fmt in _FORMAT_EXT:
        return _FORMAT_EXT[fmt]
    ext = Path(path).suffix.lower().lstrip(".")
    ext = {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext)
    return ext if ext in IMAGE_EXTS else "jpg"


def write_shard(job: dict) -> dict:
    """Write shard ``job['index']``: tar + DALI index under temp names, renamed, then the
    progress marker. -> the marker record (count, bytes, dropped images)."""
    out = Path(job["out"])
    name = shard_name(job["index"])
    tar_path, idx_path = out / f"{name}.tar", out / f"{name}.idx"
    tokens = None
    if job["token_store"]:
        tokens = TokenStore.open(job["token_store"]).tokens  # memory-mapped: only this shard's rows are read
    dropped, count = [], 0
    tmp_tar, tmp_idx = temp_file(tar_path), temp_file(idx_path)  # exclusive, random names: never a link
    try:
        with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sid, rel, label in zip(job["ids"], job["paths"], job["labels"]):
                fmt = None
                try:  # a regular file under the size cap (a FIFO would hang the packer)
                    data = read_image_bytes(os.path.join(job["root"], rel), job["max_bytes"])
                except NotAnImage as e:
                    dropped.append({"sample_id": sid, "path": rel, "issues": [e.issue], "detail": e.detail})
                    continue
                if job["check"]:
                    info = check_bytes(data, rel, job["min_size"], job["max_pixels"])
                    bad = [i for i in info["issues"] if i in DROP or i in CONVERT]
                    if bad:
                        dropped.append({"sample_id": sid, "path": rel, "issues": bad, "detail": info["detail"]})
                        continue
                    fmt = info["format"]
                key = f"{sid:09d}"
                _member(tar, f"{key}.{_image_ext(rel, fmt)}", data)
                _member(tar, f"{key}.cls", np.int64(label).astype("<i8").tobytes())
                _member(tar, f"{key}.id", np.int64(sid).astype("<i8").tobytes())
                if tokens is not None:
                    _member(tar, f"{key}.tok", np.asarray(tokens[sid], dtype="<i2").tobytes())
                count += 1
        size = 0
        if count:
            write_index(tmp_tar, tmp_idx)
            os.replace(tmp_idx, idx_path)
            size = tmp_tar.stat().st_size
            os.replace(tmp_tar, tar_path)
        # else every image of this shard was broken: no tar, the marker says so
    finally:
        for tmp in (tmp_tar, tmp_idx):
            if os.path.lexists(tmp):
                os.unlink(tmp)
    record = {"index": job["index"], "tar": tar_path.name if count else None, "idx": idx_path.name if count else None,
              "count": count, "bytes": size, "dropped": dropped}
    _write_json(out / PROGRESS / f"{name}.json", record)
    return record


def write_index(tar_path: Path, idx_path: Path) -> None:
    """DALI's index of a tar: DALI's own wds2idx (shipped with the DALI wheel) when importable;
    else the same "v1.2" format written here from Python's tarfile (all files of one sample
    are consecutive, as write_shard puts them)."""
    try:
        from wds2idx import IndexCreator
    except ImportError:
        IndexCreator = None
    if IndexCreator is not None:
        with IndexCreator(str(tar_path), str(idx_path), verbose=False) as ic:
            ic.create_index()
        return
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            base, _, ext = m.name.partition(".")
            if base != last:
                samples.append([])
                last = base
            samples[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    with open(idx_path, "w", encoding="utf-8") as f:
        f.write(f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples))


def _plan(fl, shard_size: int, token_bytes: int, seed: int) -> int:
    """Samples per shard from the mean size of up to 2000 (seeded) files: no stat of every file."""
    pick = np.random.default_rng(seed + 1).choice(len(fl), size=min(len(fl), 2000), replace=False)
    sizes = []
    for i in pick:
        try:
            sizes.append(os.path.getsize(fl.abspath(int(i))))
        except OSError:
            pass
    mean = (float(np.mean(sizes)) if sizes else 1.0) + token_bytes + 4 * _MEMBER_OVERHEAD
    return max(1, int(shard_size // mean))


def make_shards(filelist, out, *, root=None, token_store=None, shard_size: int = 10**9, seed: int = 0,
                workers: int | None = None, check: bool = True, min_size: int = 32, progress: bool = True,
                max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Pack ``filelist`` into shards under ``out``; returns the manifest (also written)."""
    fl = read_filelist(filelist, root)
    out = Path(out)
    store = None
    if token_store is not None:
        store = TokenStore.open(token_store, filelist=fl)  # same images, complete
    guard = InputGuard().add(fl.list_path, "the file list").add(fl.list_path.parent / "classes.txt",
                                                                "the class names of the list")
    guard.add(token_store, "the token store").add_files(fl.abspaths(), "an image of the list")
    out_folder(out, guard, create=False)
    if out.is_dir() and any(out.iterdir()) and not (out / PLAN).is_file():
        raise ShardMakeError(f"--out {out} is not empty and holds no {PLAN} of make_shards: choose an empty folder")
    out_folder(out, guard)
    guard.check_folder(out, [PLAN, MANIFEST, PROGRESS])
    sub_folder(out, PROGRESS)

    order = np.random.default_rng(seed).permutation(len(fl))
    token_bytes = 2 * store.grid * store.grid if store is not None else 0
    plan = {
        "format": MANIFEST_FORMAT, "filelist": str(Path(fl.list_path).resolve()), "digest": fl.digest(),
        "num_files": len(fl), "seed": seed, "shard_size": shard_size, "check": check, "min_size": min_size,
        # the caps only when set (plans written before they existed stay resumable)
        **({"max_pixels": max_pixels, "max_bytes": max_bytes}
           if check and (max_pixels, max_bytes) != (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES) else {}),
        "tokenizer_fingerprint": spec_fingerprint(store.spec) if store is not None else None,
    }
    if (out / PLAN).is_file():
        old = json.loads((out / PLAN).read_text(encoding="utf-8"))
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in plan.items() if k != "filelist" and old.get(k) != v]
        if diff:
            raise ShardMakeError(f"--out {out} holds shards made with other settings ({'; '.join(diff)}): rerun the "
                                 f"same command to finish them, or choose another --out")
        plan["samples_per_shard"] = old["samples_per_shard"]
    else:
        plan["samples_per_shard"] = _plan(fl, shard_size, token_bytes, seed)
        _write_json(out / PLAN, plan)
    sps = plan["samples_per_shard"]
    num = math.ceil(len(fl) / sps)

    _remove_stale_temps(out)  # a killed run's partial shards and markers; nothing else
    records: dict[int, dict] = {}
    todo = []
    for k in range(num):
        for ext in ("tar", "idx"):
            guard.check(out / f"{shard_name(k)}.{ext}")
        marker = out / PROGRESS / f"{shard_name(k)}.json"
        if marker.is_file():
            rec = json.loads(marker.read_text(encoding="utf-8"))
            if rec["count"] == 0 or ((out / rec["tar"]).is_file() and (out / rec["idx"]).is_file()):
                records[k] = rec
                continue
        ids = [int(i) for i in order[k * sps:(k + 1) * sps]]
        todo.append({"index": k, "out": str(out), "root": str(fl.root), "ids": ids,
                     "paths": [fl.paths[i] for i in ids], "labels": [fl.labels[i] for i in ids],
                     "token_store": os.path.abspath(token_store) if store is not None else None,
                     "check": check, "min_size": min_size, "max_pixels": max_pixels, "max_bytes": max_bytes})
    workers = workers if workers is not None else (os.cpu_count() or 1)
    with tqdm(total=num, initial=num - len(todo), desc=f"shards {out.name}", unit="shard",
              disable=not progress) as bar:
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                records[job["index"]] = write_shard(job)
                bar.update()
        else:
            with ProcessPoolExecutor(min(workers, len(todo))) as ex:
                for fut in as_completed([ex.submit(write_shard, job) for job in todo]):
                    rec = fut.result()
                    records[rec["index"]] = rec
                    bar.update()

    shards = [records[k] for k in range(num) if records[k]["count"]]
    if not shards:
        raise ShardMakeError(f"{fl.list_path}: every image failed the scan's check; nothing to shard")
    dropped = [d for k in range(num) for d in records[k]["dropped"]]
    tokenizer = None
    if store is not None:
        tokenizer = {"spec": store.spec, "fingerprint": spec_fingerprint(store.spec), "grid": store.grid,
                     "vocab": store.vocab, "store": os.path.abspath(token_store), "view": store.meta.get("view")}
    manifest = {
        "format": MANIFEST_FORMAT,
        "filelist": plan["filelist"],
        "filelist_digest": fl.digest(),
        "num_samples": sum(s["count"] for s in shards),
        "num_dropped": len(dropped),
        "num_classes": fl.num_classes,
        "classes": fl.classes,
        "seed": seed,
        "shard_size": shard_size,
        "components": {"image": "/".join(IMAGE_EXTS), "cls": "int64 LE", "id": "int64 LE",
                       **({"tok": f"int16 LE [{store.grid * store.grid}]"} if store is not None else {})},
        "tokenizer": tokenizer,
        "shards": [{"tar": s["tar"], "idx": s["idx"], "count": s["count"], "bytes": s["bytes"]} for s in shards],
        "dropped": dropped,
    }
    manifest["digest"] = hashlib.sha256(json.dumps([manifest["filelist_digest"], seed, shard_size, manifest["shards"],
                                                    tokenizer and tokenizer["fingerprint"]]).encode()).hexdigest()
    _write_json(out / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("filelist", help="file list to pack (mapet_ds format; ideally data/scan.py's clean list)")
    ap.add_argument("--out", required=True, help="folder for the shards, their indexes and manifest.json")
    ap.add_argument("--root", default=None, help="image root (default: the list's folder)")
    ap.add_argument("--token-store", default=None, help="token store of this list (launch/tokens.py assign): "
                                                        "its rows travel in the shards as .tok")
    ap.add_argument("--shard-size", type=parse_size, default=10**9, help="bytes per shard, e.g. 1GB (default)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    ap.add_argument("--min-size", type=int, default=32, help="the scan's tiny-image threshold (reported only)")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help="the scan's decompression-bomb cap (width x height); larger images are dropped")
    ap.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="files larger than this are dropped")
    ap.add_argument("--no-check", action="store_true", help="skip the per-image decode check (list already scanned)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        m = make_shards(args.filelist, args.out, root=args.root, token_store=args.token_store,
                        shard_size=args.shard_size, seed=args.seed, workers=args.workers, check=not args.no_check,
                        min_size=args.min_size, progress=not args.no_progress, max_pixels=args.max_pixels,
                        max_bytes=args.max_bytes)
    except (FileListError, TokenStoreError, ShardMakeError, ShardSetError, UnsafeWriteError) as e:
        print_error(e)
        return 2
    tok = f", tokens {m['tokenizer']['fingerprint'][:12]}" if m["tokenizer"] else ", no tokens"
    print(f"{m['num_samples']} samples in {len(m['shards'])} shard(s) under {args.out} ({m['num_dropped']} dropped by "
          f"the check{tok}); manifest {Path(args.out) / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
