"""Segmentation throughput: ViT + UperNet train step and sliding-window inference at 512x512,
and the DALI image+mask training pipeline, with peak memory.

Prints one JSON object as its last line: train_img_per_s (forward + backward + AdamW step,
median of ``--iters``), eval_img_per_s (one 512x683 image = 2 sliding windows of 512,
stride 341, no flip), pipeline_img_per_s (DALI pair pipeline: decode, rescale, crop, flip,
photometric, pad; ``--pipeline-images`` generated 683x512 JPEG/PNG pairs), peak memory
(GPU max allocated or CPU max RSS, GiB) and the model's parameter count.

    .venv/bin/python bench/segment_step.py --size small --batch 2 --iters 3
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mapet_ds.config import ModelConfig, SegmentConfig
from mapet_ds.engine.metrics import max_memory_gib
from mapet_ds.models.segmentation import build_segmenter


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(size: str, crop: int, batch: int, iters: int, device, decoder_channels: int) -> dict:
    torch.manual_seed(0)
    seg = SegmentConfig(crop_size=crop, decoder_channels=decoder_channels)
    model = build_segmenter(ModelConfig(size=size, patch_size=16, img_size=224, drop_path=0.1), seg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, crop, crop, device=device)
    y = torch.randint(0, seg.num_classes, (batch, crop, crop), device=device)
    times = []
    for i in range(iters + 1):
        _sync(device)
        t0 = time.perf_counter()
        logits, aux = model(x)
        loss = F.cross_entropy(F.interpolate(logits, size=(crop, crop), mode="bilinear"), y) + \
            0.4 * F.cross_entropy(F.interpolate(aux, size=(crop, crop), mode="bilinear"), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    from mapet_ds.engine.seg_eval import slide_logits

    img = torch.randn(1, 3, crop, crop * 4 // 3, device=device)
    model.eval()
    ev = []
    for i in range(2):
        _sync(device)
        t0 = time.perf_counter()
        slide_logits(model, img, crop, crop * 2 // 3)
        _sync(device)
        ev.append(time.perf_counter() - t0)
    return {"train_img_per_s": batch / statistics.median(times), "eval_img_per_s": 1.0 / min(ev),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def bench_pipeline(n: int, crop: int, batch: int, threads: int, cat_max_ratio: float) -> float:
    from PIL import Image

    from mapet_ds.pipelines.segmentation import read_seglist, seg_train_loader

    tmp = Path(tempfile.mkdtemp(prefix="segbench"))
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (512, 683, 3), dtype=np.uint8)).save(tmp / f"{i}.jpg", quality=90)
        Image.fromarray(rng.integers(0, 151, (512, 683), dtype=np.uint8), mode="L").save(tmp / f"{i}.png")
        lines.append(f"{i}.jpg\t{i}.png\n")
    (tmp / "list.txt").write_text("".join(lines))
    loader = seg_train_loader(read_seglist(tmp / "list.txt"), crop=crop, img_scale=(2048, 512), ratio_range=(0.5, 2.0),
                              hflip=0.5, photometric=True, reduce_zero_label=True, ignore_index=255, batch_size=batch,
                              shard_id=0, num_shards=1, seed=0, num_threads=threads, cat_max_ratio=cat_max_ratio)
    try:
        next(loader)
        steps = max(1, n // batch - 1)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(loader)
        return steps * batch / (time.perf_counter() - t0)
    finally:
        del loader
        shutil.rmtree(tmp, ignore_errors=True)  # the folder mkdtemp made above


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--decoder-channels", type=int, default=512, help="UperNet channels (recipes: 384/512/768)")
    ap.add_argument("--pipeline-images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads")
    ap.add_argument("--cat-max-ratio", type=float, default=0.75,
                    help="crop re-draw ratio of the timed pipeline (recipes: 0.75); 1.0 is also timed")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "size": args.size, "crop": args.crop, "batch": args.batch, "torch_threads": torch.get_num_threads()}
    out.update(bench_model(args.size, args.crop, args.batch, args.iters, device, args.decoder_channels))
    out["pipeline_img_per_s"] = bench_pipeline(args.pipeline_images, args.crop, args.batch, args.threads,
                                               args.cat_max_ratio)
    out["pipeline_img_per_s_uniform_crop"] = bench_pipeline(args.pipeline_images, args.crop, args.batch,
                                                            args.threads, 1.0)
    out["cat_max_ratio"] = args.cat_max_ratio
    out["peak_memory_gib"] = max_memory_gib(device)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}))


if __name__ == "__main__":
    main()
