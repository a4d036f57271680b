#!/usr/bin/env python
"""Shards vs loose files for pre-training: loader img/s, and per-rank memory vs dataset size.

1. Throughput: the pre-training loader (centre square crop, resize 224, colour jitter,
   normalise; CPU DALI, same threads) over the same generated JPEGs (shorter side
   320-400 px) as loose files + token store and as tar shards carrying the tokens.
   Each loader is warmed up (build, first batch) before the timed passes.
2. Memory: one fresh process per (source, size) builds what one rank of an 8-rank
   pre-training job builds (rank 0 of 8) and runs a few batches; its peak RSS (and peak
   CUDA memory on a GPU machine) is reported. Loose files: the file list, its existence
   check and the token table on the device, as engine/pretrain.py does. Shards: the
   webdataset reader alone (tokens arrive with the images). The synthetic datasets of
   10k / 100k / 1M samples reuse a few real images' bytes under many keys: the file list
   repeats paths, the shard index repeats (offset, size) entries of one small tar; the
   point is how memory scales, not the pixels.

    python bench/shards.py                       # both parts, a few minutes on 2 cores
    python bench/shards.py --sizes 10000,100000  # smaller memory part

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
sys.path.insert(0, str(REPO / "bench"))

GRID, VOCAB = 14, 8192
PER_TAR = 10_000


def make_store(path: Path, fl, seed: int = 0):
    """A complete token store of random rows for ``fl`` (what `launch/tokens.py assign` leaves)."""
    from mapet_ds.tokenizers.store import TokenStore

    store = TokenStore.create(path, fl, GRID, VOCAB, {"kind": "bench_random", "seed": seed}, chunk_size=len(fl))
    rows = np.random.default_rng(seed).integers(0, VOCAB, size=(len(fl), GRID * GRID), dtype=np.int16)
    store.write_chunk(0, rows)
    store.finalise()
    return store


def time_loader(make, n: int, batch_size: int, passes: int) -> float:
    """img/s over ``passes`` epochs of ``n`` images after one warm-up batch."""
    loader = make()
    next(loader)
    steps = passes * (n // batch_size)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(loader)
    return steps * batch_size / (time.perf_counter() - t0)


def throughput(tmp: Path, a) -> dict:
    from data_pipeline import make_images
    from make_shards import make_shards

    from mapet_ds.filelist import read_filelist
    from mapet_ds.pipelines import pretrain_loader
    from mapet_ds.pipelines.shards import pretrain_shard_loader

    img_dir = tmp / "images"
    img_dir.mkdir()
    fl = read_filelist(make_images(img_dir, a.num_images))
    make_store(tmp / "tokens", fl)
    make_shards(fl.list_path, tmp / "shards", token_store=tmp / "tokens", shard_size=2_000_000,
                workers=a.threads, progress=False)
    kw = dict(img_size=224, batch_size=a.batch_size, shard_id=0, num_shards=1, seed=0, num_threads=a.threads,
              device="cpu")
    res = {}
    for _ in range(a.repeats):  # alternate, keep the best of each: the box is shared
        for name, make in (("files", lambda: pretrain_loader(fl, **kw)),
                           ("shards", lambda: pretrain_shard_loader(tmp / "shards", **kw))):
            res[name] = max(res.get(name, 0.0), time_loader(make, len(fl), a.batch_size, a.passes))
    return {"files_img_s": round(res["files"], 1), "shards_img_s": round(res["shards"], 1),
            "shards_over_files": round(res["shards"] / res["files"], 3)}


# -- memory: synthetic datasets ---------------------------------------------------------

def make_synthetic(tmp: Path, src_list: Path, n: int) -> tuple[Path, Path]:
    """A file list + token store of ``n`` samples, and a shard set of ``n`` samples, both
    reusing the bytes of the first 64 images of ``src_list``."""
    from mapet_ds.filelist import read_filelist, write_filelist
    from mapet_ds.pipelines.shards import MANIFEST, MANIFEST_FORMAT

    src = read_filelist(src_list)
    k = min(64, len(src))
    d = tmp / f"syn_{n}"
    d.mkdir()
    # loose files: the list repeats the same k files (absolute paths under one root)
    fl_path = write_filelist(d / "list.txt", ((os.path.relpath(src.abspath(i % k), d), 0) for i in range(n)))
    make_store(d / "tokens", read_filelist(fl_path))
    # shards: one tar of k samples; the index lists n samples over their (offset, size) entries
    tar_path = d / "synthetic.tar"
    toks = np.zeros(GRID * GRID, dtype="<i2").tobytes()
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(k):
            for ext, data in (("jpg", Path(src.abspath(i)).read_bytes()), ("id", np.int64(i).astype("<i8").tobytes()),
                              ("cls", np.int64(0).astype("<i8").tobytes()), ("tok", toks)):
                ti = tarfile.TarInfo(f"{i:09d}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    with tarfile.open(tar_path) as tar:
        members = list(tar)
    # per sample of the tar: its components as (ext, data offset, size)
    comps = [[(m.name.split(".", 1)[1], m.offset_data, m.size) for m in members[4 * i:4 * i + 4]] for i in range(k)]
    # index files of PER_TAR samples each (a 1 GB shard of ImageNet holds ~9k images), all
    # pointing into the one small tar
    shards = []
    for t, start in enumerate(range(0, n, PER_TAR)):
        count = min(PER_TAR, n - start)
        with open(d / f"synthetic_{t:06d}.idx", "w") as f:
            f.write(f"v1.2 {count}\n")
            for j in range(start, start + count):
                f.write(" ".join(f"{ext} {off} {size} {j:09d}.{ext}" for ext, off, size in comps[j % k]) + "\n")
        shards.append({"tar": tar_path.name, "idx": f"synthetic_{t:06d}.idx", "count": count})
    manifest = {"format": MANIFEST_FORMAT, "num_samples": n, "num_classes": 1, "classes": None, "digest": f"syn{n}",
                "tokenizer": {"spec": {"kind": "bench_random"}, "fingerprint": "0" * 64, "grid": GRID, "vocab": VOCAB},
                "shards": shards}
    (d / MANIFEST).write_text(json.dumps(manifest))
    return fl_path, d


def child(kind: str, path: str, batch_size: int, threads: int) -> None:
    """One rank (0 of 8): build the data side of pre-training, run 4 batches, print peak memory."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = dict(img_size=224, batch_size=batch_size, shard_id=0, num_shards=8, seed=0, num_threads=threads)
    if kind == "files":
        from mapet_ds.filelist import read_filelist
        from mapet_ds.pipelines import pretrain_loader
        from mapet_ds.tokenizers.store import TokenStore

        fl = read_filelist(path)
        table = TokenStore.open(Path(path).parent / "tokens", filelist=fl, grid=GRID).as_tensor(device)
        loader = pretrain_loader(fl, **kw)
        for _ in range(4):
            tokens = table[next(loader)["sample_ids"].to(device)].long()
    else:
        from mapet_ds.pipelines.shards import pretrain_shard_loader

        loader = pretrain_shard_loader(path, **kw)
        for _ in range(4):
            tokens = next(loader)["tokens"].to(device).long()
    assert tokens.shape == (batch_size, GRID * GRID)
    cuda = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    rss = int(status["VmRSS"].split()[0]) / 1024  # held now, after the batches (KiB -> MiB)
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec
    peak = int(status["VmHWM"].split()[0]) / 1024
    print(json.dumps({"rss_mib": round(rss, 1), "peak_rss_mib": round(peak, 1), "peak_cuda_mib": cuda and round(cuda, 1)}))


def memory(tmp: Path, a) -> dict:
    from data_pipeline import make_images

    img_dir = tmp / "mem_images"
    img_dir.mkdir()
    src = make_images(img_dir, 64)
    out = {}
    for n in a.sizes:
        fl_path, shard_dir = make_synthetic(tmp, src, n)
        for kind, path in (("files", fl_path), ("shards", shard_dir)):
            proc = subprocess.run([sys.executable, __file__, "--child", kind, str(path), "--batch-size",
                                   str(a.batch_size), "--threads", str(a.threads)],
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
            if proc.returncode != 0:
                raise SystemExit(f"{kind} n={n} failed:\n{proc.stderr[-2000:]}")
            out[f"{kind}_{n}"] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"[memory] {kind:6s} n={n:>9,}: {out[f'{kind}_{n}']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=256, help="throughput part: generated images")
    ap.add_argument("--threads", type=int, default=2, help="DALI threads")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--passes", type=int, default=2, help="timed epochs per throughput measurement")
    ap.add_argument("--repeats", type=int, default=2, help="alternating throughput measurements (best kept)")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="memory part: synthetic dataset sizes")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], a.child[1], a.batch_size, a.threads)
        return 0
    a.sizes = [int(s) for s in a.sizes.split(",") if s]
    result = {"bench": "shards", "threads": a.threads, "batch_size": a.batch_size}
    with tempfile.TemporaryDirectory(prefix="mapet_shards_bench_") as tmp:
        if not a.skip_throughput:
            result.update(throughput(Path(tmp), a))
            print(f"[throughput] {result}", flush=True)
        result["memory"] = memory(Path(tmp), a)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
