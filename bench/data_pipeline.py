#!/usr/bin/env python
"""Images/s of the DALI eval and pre-training pipelines vs a torchvision + PIL DataLoader
doing the same transform with the same number of CPU threads/workers, in one run.

  eval:      resize shorter side to 248 (bicubic, antialiased), centre crop 224, normalise
  pretrain:  centre square crop, resize to 224 (bicubic), colour jitter 0.4, normalise

Source images: a file list (--data) or, by default, generated JPEGs of ImageNet-like
size (shorter side 320-400 px, procedural shapes on textured backgrounds plus noise).
Each pipeline is warmed up (build, first batches) before the timed passes. On a GPU
machine the DALI "mixed" (nvJPEG) figures are added; the ratio uses DALI CPU mode so
both sides use the same CPU threads. The last line is one JSON object.

    python bench/data_pipeline.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# the demo-image generator lives with the dataset tools in data/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))

from mapet_ds.filelist import read_filelist, write_filelist
from mapet_ds.pipelines import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    eval_loader,
    pretrain_loader,
)


def make_images(out: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs, shorter side 320-400 px, and a file list over them."""
    import make_demo
    import numpy as np

    entries = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        cls = make_demo.CLASSES[i % len(make_demo.CLASSES)]
        img = make_demo.draw_sample(cls, rng, 320)
        rel = f"img_{i:05d}.JPEG"
        img.save(out / rel, format="JPEG", quality=90)
        entries.append((rel, i % len(make_demo.CLASSES)))
    return write_filelist(out / "bench.txt", entries)


# -- torchvision side -------------------------------------------------------------------

class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), i


class _CenterSquare:
    def __call__(self, img):
        from torchvision.transforms import functional as TF

        s = min(img.size)
        return TF.center_crop(img, [s, s])


def torchvision_transform(kind: str, img_size: int, crop_pct: float):
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    if kind == "eval":
        return T.Compose([T.Resize(math.floor(img_size / crop_pct), interpolation=bicubic), T.CenterCrop(img_size),
                          *tail])
    return T.Compose([_CenterSquare(), T.Resize([img_size, img_size], interpolation=bicubic),
                      T.ColorJitter(0.4, 0.4, 0.4), *tail])


def _worker_init(_):
    torch.set_num_threads(1)  # one core per worker, like one DALI thread


def time_torchvision(paths, kind, *, img_size, crop_pct, batch_size, threads, passes) -> float:
    ds = _FileDataset(paths, torchvision_transform(kind, img_size, crop_pct))
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=threads, shuffle=kind != "eval",
                                     drop_last=kind != "eval", persistent_workers=True, worker_init_fn=_worker_init,
                                     prefetch_factor=2)
    for _ in dl:  # warm-up pass: worker start-up, page cache
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(passes):
        for x, _ in dl:
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


# -- DALI side ---------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "mixed":
        torch.cuda.synchronize()


def time_dali(fl, kind, *, img_size, crop_pct, batch_size, threads, passes, device) -> float:
    if kind == "eval":
        loader = eval_loader(fl, img_size=img_size, batch_size=batch_size, shard_id=0, num_shards=1,
                             num_threads=threads, device=device, crop_pct=crop_pct)
        for _ in loader:  # warm-up pass
            pass
        _sync(device)
        n, t0 = 0, time.perf_counter()
        for _ in range(passes):
            for b in loader:
                n += int(b["valid"].sum())
        _sync(device)
        return n / (time.perf_counter() - t0)
    loader = pretrain_loader(fl, img_size=img_size, batch_size=batch_size, shard_id=0, num_shards=1, seed=0,
                             num_threads=threads, device=device, color_jitter=0.4)
    for _ in range(loader.steps_per_epoch):
        next(loader)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    for _ in range(passes * loader.steps_per_epoch):
        n += next(loader)["images"].shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="file list to read (default: generate --num-images JPEGs)")
    ap.add_argument("--num-images", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--crop-pct", type=float, default=224 / 248)
    ap.add_argument("--passes", type=int, default=2, help="timed passes over the images per measurement")
    args = ap.parse_args(argv)

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="mapet_bench_")
        list_path = make_images(Path(tmp.name), args.num_images)
    else:
        list_path = Path(args.data)
    fl = read_filelist(list_path)
    paths = fl.abspaths()
    common = dict(img_size=args.img_size, crop_pct=args.crop_pct, batch_size=args.batch_size, threads=args.threads,
                  passes=args.passes)
    result: dict = {"benchmark": "data_pipeline", "images": len(fl), "threads": args.threads,
                    "batch_size": args.batch_size, "img_size": args.img_size, "cpu_count": os.cpu_count(),
                    "source": "generated 320-400px JPEGs" if args.data is None else str(list_path)}
    for kind in ("eval", "pretrain"):
        dali = time_dali(fl, kind, device="cpu", **common)
        tv = time_torchvision(paths, kind, **common)
        result[f"dali_cpu_{kind}_img_s"] = round(dali, 1)
        result[f"torchvision_{kind}_img_s"] = round(tv, 1)
        result[f"dali_over_torchvision_{kind}"] = round(dali / tv, 2)
        print(f"{kind:9s} DALI cpu {dali:8.1f} img/s   torchvision+PIL {tv:8.1f} img/s   ratio {dali / tv:.2f}",
              flush=True)
        if torch.cuda.is_available():
            mixed = time_dali(fl, kind, device="mixed", **common)
            result[f"dali_mixed_{kind}_img_s"] = round(mixed, 1)
            print(f"{kind:9s} DALI mixed (GPU decode) {mixed:8.1f} img/s", flush=True)
    result["dali_over_torchvision"] = min(result["dali_over_torchvision_eval"],
                                          result["dali_over_torchvision_pretrain"])
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
