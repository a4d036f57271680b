"""Forward+backward step time of mapet, pet and mim on the same backbone and batch.

Prints one JSON object as its last line: per-objective step times (median of
``--iters`` after ``--warmup``), analytic FLOP ratios (mapet/mim, pet/mim) and
``overhead`` = time ratio / FLOP ratio (1.0 = no cost beyond the arithmetic).

    .venv/bin/python bench/model_step.py --size small --depth 4 --batch 8
    .venv/bin/python bench/model_step.py --compare-attention   # + model.attention flex vs sdpa (mapet, pet)

``--compare-attention`` adds ``{kind}_flex_over_sdpa_train`` (forward+backward; on the CPU
flex trains through its mask_mod evaluated densely, torch having no CPU FlexAttention
backward) and ``{kind}_flex_over_sdpa_forward`` (no_grad forward: the FlexAttention kernel
itself, eager on the CPU, compiled on CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from mapet_ds.config import ModelConfig, ObjectiveConfig
from mapet_ds.models.flops import pretrain_forward_flops
from mapet_ds.models.objectives import plan_generator
from mapet_ds.models.pretrain import PretrainModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_objective(name, model_cfg, batch, vocab, iters, warmup, device, dtype, train=True):
    torch.manual_seed(0)
    model = PretrainModel(model_cfg, ObjectiveConfig(name=name), vocab).to(device).train()
    images = torch.randn(batch, 3, model_cfg.img_size, model_cfg.img_size, device=device)
    tokens = torch.randint(0, vocab, (batch, model_cfg.num_patches), device=device)
    gen = plan_generator(name, device, 0)
    times = []
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        plan = model.sample_plan(batch, device, gen)  # part of the step (mim: drawn on the host, one copy)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), \
                torch.set_grad_enabled(train):
            out = model(images, tokens, plan)
        if train:
            out["loss"].backward()
            model.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "base", "large"])
    ap.add_argument("--depth", type=int, default=4, help="blocks (fewer than the full model keeps CPU runs short)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare-attention", action="store_true", help="also time model.attention=flex vs sdpa")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig(size=args.size, depth=args.depth, img_size=args.img_size, drop_path=0.1)
    n = cfg.num_patches
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "size": args.size, "depth": args.depth, "batch": args.batch, "img_size": args.img_size,
              "dtype": str(dtype).replace("torch.", "")}
    flops = {}
    for name in ("mim", "pet", "mapet"):
        m = ObjectiveConfig(name=name).num_predicted(n)
        flops[name] = pretrain_forward_flops(cfg, name, m, args.vocab)
        result[f"{name}_step_s"] = round(time_objective(name, cfg, args.batch, args.vocab, args.iters,
                                                        args.warmup, device, dtype), 4)
    for name in ("mapet", "pet"):
        t = result[f"{name}_step_s"] / result["mim_step_s"]
        f = flops[name].total / flops["mim"].total
        result[f"{name}_over_mim_time"] = round(t, 3)
        result[f"{name}_over_mim_flops"] = round(f, 3)
        result[f"{name}_over_mim_linear_flops"] = round(flops[name].linear / flops["mim"].linear, 3)
        result[f"{name}_overhead"] = round(t / f, 3)
    result["overhead"] = result["mapet_overhead"]
    if args.compare_attention:
        import warnings

        warnings.simplefilter("ignore")  # CPU flex: dense-training and "without torch.compile" notes
        for name in ("mapet", "pet"):
            for train in (True, False):
                t = {att: time_objective(name, cfg.model_copy(update={"attention": att}), args.batch, args.vocab,
                                         args.iters, args.warmup, device, dtype, train=train)
                     for att in ("sdpa", "flex")}
                tag = "train" if train else "forward"
                result[f"{name}_{tag}_sdpa_s"], result[f"{name}_{tag}_flex_s"] = round(t["sdpa"], 4), round(t["flex"], 4)
                result[f"{name}_flex_over_sdpa_{tag}"] = round(t["flex"] / t["sdpa"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
