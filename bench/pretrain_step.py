"""DeepSpeed engine vs a plain PyTorch loop, and activation checkpointing on vs off.

One process, one rank, the same PretrainModel, synthetic batches on the device (so
the data pipeline is not measured). Prints one JSON object as its last line:

- ``deepspeed_over_plain``: step time of the DeepSpeed ZeRO-2 engine (backward, clip,
  AdamW step) over the plain loop (``loss.backward``, ``clip_grad_norm_``, AdamW).
- ``ckpt_time_ratio`` / ``ckpt_memory_ratio``: activation checkpointing on over off.
  Memory is the activation memory of one training step: on GPUs the allocator peak
  minus the memory held before the forward; on CPU the peak resident set of a fresh
  process running one step minus that of one running the same forward under no_grad
  (weights, framework and the transient activations of one block).

    .venv/bin/python bench/pretrain_step.py --size tiny --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


import torch

from mapet_ds.config import load_config
from mapet_ds.engine.dist import init_distributed
from mapet_ds.engine.ds_config import load_ds_json, resolve_ds_config
from mapet_ds.engine.optim import build_optimizer
from mapet_ds.models.objectives import plan_generator
from mapet_ds.models.pretrain import PretrainModel


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_probe(mode: str, over: list[str]) -> None:
    """Run in a fresh process: one step (or a no_grad forward) and print peak memory in bytes."""
    cfg = load_config(None, over + (["model.grad_checkpointing=true"] if mode == "ckpt" else []))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = PretrainModel(cfg.model, cfg.objective, cfg.tokenizer.vocab_size).to(device).train()
    images, tokens = _batch(cfg, cfg.pretrain.global_batch_size, device, torch.float32)
    plan = model.sample_plan(images.shape[0], device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        if mode == "nograd":
            with torch.no_grad():
                model(images, tokens, plan)
        else:
            model(images, tokens, plan)["loss"].backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated() - base)
    else:
        # VmHWM belongs to this process image; ru_maxrss would inherit the parent's peak
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        print(int(hwm.split()[1]) * 1024)


def _probe(mode: str, over: list[str]) -> int:
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--probe", mode, *over], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _batch(cfg, batch, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, cfg.model.img_size, cfg.model.img_size, generator=g).to(device, dtype)
    tokens = torch.randint(0, cfg.tokenizer.vocab_size, (batch, cfg.model.num_patches), generator=g).to(device)
    return images, tokens


def time_plain(cfg, batch, iters, warmup, device, dtype):
    torch.manual_seed(0)
    model = PretrainModel(cfg.model, cfg.objective, cfg.tokenizer.vocab_size).to(device).train()
    opt = build_optimizer(model, cfg.optim)
    images, tokens = _batch(cfg, batch, device, torch.float32)
    gen = plan_generator(cfg.objective.name, device, 0)
    times = []
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        plan = model.sample_plan(batch, device, gen)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(images, tokens, plan)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_deepspeed(cfg, dist, batch, iters, warmup, ds_path):
    import deepspeed

    torch.manual_seed(0)
    model = PretrainModel(cfg.model, cfg.objective, cfg.tokenizer.vocab_size)
    ds = resolve_ds_config(load_ds_json(ds_path), cfg.pretrain, cfg.optim, 1, dist.device, src=ds_path)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim), config=ds)
    dtype = torch.bfloat16 if ds["bf16"]["enabled"] else torch.float32
    images, tokens = _batch(cfg, batch, dist.device, dtype)
    gen = plan_generator(cfg.objective.name, dist.device, 0)
    times = []
    for i in range(warmup + iters):
        _sync(dist.device)
        t0 = time.perf_counter()
        plan = engine.module.sample_plan(batch, dist.device, gen)
        out = engine(images, tokens, plan)
        engine.backward(out["loss"])
        engine.step()
        _sync(dist.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--probe":
        return memory_probe(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--objective", default="mapet")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ds_config", default=str(Path(__file__).resolve().parents[1] / "ds_configs/zero2.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    dist = init_distributed()
    over = [f"model.size={args.size}", f"model.img_size={args.img_size}", f"objective.name={args.objective}",
            f"pretrain.global_batch_size={args.batch}", "tokenizer.vocab_size=8192"]
    if args.depth:
        over.append(f"model.depth={args.depth}")
    cfg = load_config(None, over)
    dtype = torch.bfloat16 if dist.device.type == "cuda" else torch.float32
    res = {"device": torch.cuda.get_device_name() if dist.device.type == "cuda" else "cpu",
           "size": args.size, "depth": cfg.model.depth, "batch": args.batch, "objective": args.objective,
           "dtype": str(dtype).replace("torch.", "")}
    plain = time_plain(cfg, args.batch, args.iters, args.warmup, dist.device, dtype)
    ds = time_deepspeed(cfg, dist, args.batch, args.iters, args.warmup, args.ds_config)
    ck_cfg = load_config(None, over + ["model.grad_checkpointing=true"])
    plain_ck = time_plain(ck_cfg, args.batch, args.iters, args.warmup, dist.device, dtype)
    if dist.device.type == "cuda":
        act_off, act_on = _probe("plain", over), _probe("ckpt", over)
    else:
        base = _probe("nograd", over)
        act_off, act_on = _probe("plain", over) - base, _probe("ckpt", over) - base
    res.update({
        "plain_step_s": round(plain, 4), "deepspeed_step_s": round(ds, 4),
        "deepspeed_over_plain": round(ds / plain, 3),
        "ckpt_step_s": round(plain_ck, 4), "ckpt_time_ratio": round(plain_ck / plain, 3),
        "activation_mib_off": round(act_off / 2**20, 1), "activation_mib_on": round(act_on / 2**20, 1),
        "ckpt_memory_ratio": round(act_on / max(act_off, 1), 3),
        "images_per_sec_deepspeed": round(args.batch / ds, 2),
    })
    print(json.dumps(res))


if __name__ == "__main__":
    main()
