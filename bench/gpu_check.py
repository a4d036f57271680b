#!/usr/bin/env python
"""One command that proves the GPU path of mapet_ds:  python bench/gpu_check.py

On a CUDA machine (sized for one H100/H200, about 8 minutes) it runs, each part under
its own time budget:

  dali     DALI "mixed" decode, pre-training and eval views, img/s on generated
           ImageNet-like JPEGs vs a torchvision+PIL DataLoader on every CPU core
  step     ViT-B/16 224 bf16 through the real DeepSpeed ZeRO-2 engine (build_trainer,
           data.synthetic=true): img/s and MFU for mapet / pet / mim x attention
           sdpa / flex (mim is single-stream: sdpa only), batch as large as fits
  ckpt     activation checkpointing off / on: peak memory and step time (mapet)
  kmeans   faiss k-means seconds/iteration, GPU (k=8192, 1M x 768) vs CPU on a slice
  clip     CLIP RN50x64 tokenizer assign img/s at 448 px (open_clip, random weights)
  resume   demo dataset -> tokens -> launch/pretrain.py (~100 steps), SIGKILL mid-run,
           automatic resume; max |loss difference| after the resume vs an uninterrupted run
  compile  the step configurations again with model.compile=true, plus mapet/flex compiled
           with activation checkpointing (last: compile time makes it the part most likely
           to hit the budget)

Without CUDA the same code paths run at tiny sizes (a CPU smoke, < 2 minutes).
A part whose library is missing (DALI, deepspeed, faiss, open_clip, pydantic) or that
does not fit the remaining time is reported as skipped with the reason, not failed.
A part whose own code is missing (``mapet_ds`` does not import) fails. ``ok`` is true when
every part ran or was skipped and none failed. It runs from a plain checkout (no install).

After every part one JSON line with the results so far (``"complete": false``) is printed;
on SIGTERM, or at ``--stop-after`` seconds, the running part is marked ``stopped`` and the
table and JSON line are printed before exiting (143 / 142), so a timeout loses nothing that
finished. The last line is always the newest JSON object.

    python bench/gpu_check.py [--budget 480] [--stop-after 570] [--parts step,kmeans] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A plain checkout is enough: the repository root (mapet_ds) and bench/ (data_pipeline) go
# first on sys.path, so an air-gapped node needs no `pip install -e .` and an older
# installed mapet_ds never shadows the code being checked.
for _p in (REPO / "bench", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

PARTS = ("dali", "step", "ckpt", "kmeans", "clip", "resume", "compile")

# Sizes: GPU = the acceptance sizes; CPU = the same code paths, tiny.
GPU_SIZES = dict(
    dali_images=512, dali_batch=128, dali_passes=2,
    model=["model.size=base", "model.img_size=224", "model.patch_size=16"], vocab=8192, batches=[256, 128, 64, 32],
    warmup=5, steps=10,
    kmeans=(1_000_000, 768, 8192), kmeans_niter=5, kmeans_cpu_slice=50_000,
    clip=("RN50x64", 448, 32, 5),
    resume=dict(per_class=40, size=80, batch=64, steps=100, save_every=40, kill_at=70),
)
CPU_SIZES = dict(
    dali_images=16, dali_batch=8, dali_passes=1,
    model=["model.size=null", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.img_size=32",
           "model.patch_size=8", "model.drop_path=0.0"], vocab=64, batches=[4],
    warmup=2, steps=3,
    kmeans=(4000, 32, 64), kmeans_niter=5, kmeans_cpu_slice=4000,
    clip=("tiny-rn448", 448, 2, 1),
    resume=dict(per_class=2, size=40, batch=4, steps=6, save_every=2, kill_at=5),
)
# rough lower bounds (s) a part needs to be worth starting
GPU_MIN = dict(dali=30, step=60, ckpt=30, kmeans=30, clip=40, resume=120, compile=90)
CPU_MIN = dict(dali=8, step=10, ckpt=5, kmeans=2, clip=5, resume=40, compile=45)


class Skip(Exception):
    """A part (or configuration) that cannot run here; the message says why."""


def need(*modules: str) -> None:
    """Skip unless every module imports (looked up without importing the heavy ones)."""
    names = {"nvidia.dali": "DALI (nvidia-dali)", "deepspeed": "deepspeed", "faiss": "faiss",
             "open_clip": "open_clip (open_clip_torch)", "pydantic": "pydantic", "torchvision": "torchvision",
             "timm": "timm"}
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise Skip(f"{names.get(m, m)} not installed")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Clock:
    def __init__(self, budget: float):
        self.t0 = time.perf_counter()
        self.budget = budget

    @property
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)


# ---------------------------------------------------------------------------------------
# dali

def part_dali(S: dict, work: Path, clock: Clock) -> dict:
    need("nvidia.dali", "torchvision", "pydantic")
    import data_pipeline as DP

    from mapet_ds.filelist import read_filelist

    d = work / "dali"
    d.mkdir()
    fl = read_filelist(DP.make_images(d, S["dali_images"]))
    threads = os.cpu_count() if CUDA else 2
    common = dict(img_size=224 if CUDA else 64, crop_pct=224 / 248, batch_size=S["dali_batch"], threads=threads,
                  passes=S["dali_passes"])
    mode = "mixed" if CUDA else "cpu"
    out = {"images": len(fl), "decode": mode, "loader_workers": threads}
    for kind in ("pretrain", "eval"):
        dali = DP.time_dali(fl, kind, device=mode, **common)
        tv = DP.time_torchvision(fl.abspaths(), kind, **common)
        out[f"dali_{kind}_img_s"] = round(dali, 1)
        out[f"torchvision_{kind}_img_s"] = round(tv, 1)
        out[f"dali_over_torchvision_{kind}"] = round(dali / tv, 2)
    out["summary"] = (f"{mode}: pretrain {out['dali_pretrain_img_s']} img/s ({out['dali_over_torchvision_pretrain']}x "
                      f"torchvision), eval {out['dali_eval_img_s']} img/s ({out['dali_over_torchvision_eval']}x)")
    return out


# ---------------------------------------------------------------------------------------
# step / ckpt / compile: the DeepSpeed engine in this process (a one-process world)

_DIST = None


def _dist():
    global _DIST
    if _DIST is None:
        from mapet_ds.engine.dist import init_distributed

        _DIST = init_distributed()
    return _DIST


def run_engine(S: dict, work: Path, *, objective: str, attention: str = "sdpa", compile_: bool = False,
               ckpt: bool = False, batch: int) -> dict:
    """build_trainer(data.synthetic=true) and time ``steps`` optimizer steps after ``warmup``."""
    import warnings

    from mapet_ds.config import load_config
    from mapet_ds.engine.pretrain import build_trainer

    dist = _dist()
    out_dir = work / f"engine_{objective}_{attention}_{int(compile_)}_{int(ckpt)}_{batch}"
    over = S["model"] + [
        f"model.attention={attention}", f"model.compile={str(compile_).lower()}",
        f"model.grad_checkpointing={str(ckpt).lower()}", f"objective.name={objective}",
        f"tokenizer.vocab_size={S['vocab']}", "tokenizer.kind=pixel_kmeans", "data.synthetic=true",
        "data.synthetic_samples=1000", f"pretrain.global_batch_size={batch}", f"pretrain.output_dir={out_dir}",
        "pretrain.resume=none", f"pretrain.max_steps={S['warmup'] + S['steps']}", "optim.warmup_steps=2",
    ]
    if objective == "mim" and not CUDA:
        over += ["objective.mask_patches=6", "objective.min_block_patches=2"]
    cfg = load_config(None, over)
    tr = build_trainer(cfg, str(REPO / "ds_configs/zero2.json"), dist)
    try:
        times, t_first = [], None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex on CPU: "no FlexAttention backward" / "without torch.compile"
            for i in range(S["warmup"] + S["steps"]):
                if i == S["warmup"] and CUDA:
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = time.perf_counter()
                tr.schedule.apply(i, tr.engine.optimizer.param_groups)
                out = tr.micro_step(tr.engine, next(tr.loader))
                tr.engine.backward(out["loss"])
                tr.engine.step()
                sync()
                dt = time.perf_counter() - t0
                if i == 0:
                    t_first = dt
                if i >= S["warmup"]:
                    times.append(dt)
        step_s = statistics.median(times)
        ips = batch / step_s
        res = {"batch": batch, "step_s": round(step_s, 4), "img_s": round(ips, 1), "first_step_s": round(t_first, 2),
               "loss": round(float(out["loss"]), 4), "precision": tr.precision,
               "gflops_per_image": round(tr.flops_per_image / 1e9, 4), "_flops": tr.flops_per_image}
        if tr.peak_tflops:
            res["mfu"] = round(3 * tr.flops_per_image * ips / (tr.peak_tflops * 1e12), 4)
        if CUDA:
            res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return res
    finally:
        tr.logger.close()
        del tr
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        shutil.rmtree(out_dir, ignore_errors=True)


def _fit_batch(S: dict, work: Path) -> tuple[int, dict]:
    """The largest batch of S['batches'] that trains mapet (the widest rows) without running out of
    memory, and that mapet/sdpa run's figures."""
    for b in S["batches"]:
        try:
            return b, run_engine(S, work, objective="mapet", batch=b)
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
    raise RuntimeError(f"out of memory at every batch of {S['batches']}")


_BATCH = None


def _configs(compile_: bool) -> list[tuple[str, str, bool]]:
    """(objective, attention, activation checkpointing). Compiled, mapet/flex also runs with
    checkpointing: flex + torch.compile + non-reentrant recomputation is the fragile upstream
    combination (the flex kernel re-traced inside a recomputed, compiled block)."""
    out = [(o, a, False) for o in ("mapet", "pet") for a in ("sdpa", "flex")] + [("mim", "sdpa", False)]
    return out + ([("mapet", "flex", True)] if compile_ else [])


def _engine_sweep(S: dict, work: Path, clock: Clock, compile_: bool, reserve: float) -> dict:
    global _BATCH
    need("pydantic", "deepspeed", "timm")
    first = {}
    if _BATCH is None and CUDA:
        _BATCH, first["mapet/sdpa"] = _fit_batch(S, work)
    _BATCH = _BATCH or S["batches"][0]
    out: dict = {"batch": _BATCH, "configs": {}, "skipped": {}}
    if not CUDA:
        out["note"] = ("CPU: flex trains through its mask_mod evaluated densely with sdpa (torch has no "
                       "FlexAttention backward on the CPU); flex/sdpa times here are not the GPU kernel's")
    for objective, attention, ckpt in _configs(compile_):
        name = f"{objective}/{attention}" + ("/compiled" if compile_ else "") + ("+ckpt" if ckpt else "")
        if name in first:
            out["configs"][name] = first[name]
            continue
        if clock.left < reserve:
            out["skipped"][name] = f"time budget ({clock.left:.0f}s left, {reserve:.0f}s kept for later parts)"
            continue
        out["configs"][name] = run_engine(S, work, objective=objective, attention=attention, compile_=compile_,
                                          ckpt=ckpt, batch=_BATCH)
    c = out["configs"]
    suffix = "/compiled" if compile_ else ""
    for o in ("mapet", "pet"):
        a, b = c.get(f"{o}/sdpa{suffix}"), c.get(f"{o}/flex{suffix}")
        if a and b:
            out[f"{o}_flex_over_sdpa_time"] = round(b["step_s"] / a["step_s"], 3)

    if "mapet/flex/compiled+ckpt" in c and "mapet/flex/compiled" in c:  # same seed, same plans: same first losses
        out["flex_compiled_ckpt_loss_diff"] = round(
            abs(c["mapet/flex/compiled+ckpt"]["loss"] - c["mapet/flex/compiled"]["loss"]), 6)
    if f"mapet/sdpa{suffix}" in c and f"mim/sdpa{suffix}" in c:
        m, i = c[f"mapet/sdpa{suffix}"], c[f"mim/sdpa{suffix}"]
        t = m["step_s"] / i["step_s"]
        f = m["_flops"] / i["_flops"]
        out["mapet_over_mim_time"], out["mapet_over_mim_flops"] = round(t, 3), round(f, 3)
        out["mapet_over_mim_overhead"] = round(t / f, 3)
    for v in c.values():
        v.pop("_flops", None)
    best = max(c.items(), key=lambda kv: kv[1]["img_s"]) if c else None
    bits = [f"{k} {v['img_s']} img/s" + (f" MFU {v['mfu']:.1%}" if "mfu" in v else "") for k, v in c.items()]
    out["summary"] = "; ".join(bits) + (f" | best {best[0]}" if best else "")
    if out["skipped"]:
        out["summary"] += f" | {len(out['skipped'])} config(s) skipped (time)"
    return out


def part_step(S, work, clock):
    return _engine_sweep(S, work, clock, compile_=False, reserve=_reserve_after("step", clock))


def part_compile(S, work, clock):
    if not CUDA and clock.left < CPU_MIN["compile"]:
        raise Skip("time budget")
    if not CUDA:  # one compiled graph costs ~40-60 s of C++ build on a small CPU box: one config
        global _BATCH
        need("pydantic", "deepspeed", "timm")
        _BATCH = _BATCH or S["batches"][0]
        eager = run_engine(S, work, objective="mapet", batch=_BATCH)
        comp = run_engine(S, work, objective="mapet", compile_=True, ckpt=True, batch=_BATCH)
        eager.pop("_flops"), comp.pop("_flops")
        return {"configs": {"mapet/sdpa": eager, "mapet/sdpa/compiled+ckpt": comp},
                "skipped": {"others": "CPU smoke compiles one configuration (inductor C++ build time); "
                                      "mapet/flex/compiled+ckpt runs on CUDA only (flex has no CPU kernel)"},
                "loss_diff_vs_eager": round(abs(comp["loss"] - eager["loss"]), 6),
                "summary": f"mapet/sdpa compiled+ckpt loss {comp['loss']} vs eager {eager['loss']}, "
                           f"first step {comp['first_step_s']}s (compile)"}
    return _engine_sweep(S, work, clock, compile_=True, reserve=60)  # ~ one config's compile + steps


def part_ckpt(S, work, clock):
    need("pydantic", "deepspeed", "timm")
    b = _BATCH or S["batches"][-1 if not CUDA else 1]
    off = run_engine(S, work, objective="mapet", batch=b)
    on = run_engine(S, work, objective="mapet", ckpt=True, batch=b)
    off.pop("_flops"), on.pop("_flops")
    out = {"batch": b, "off": off, "on": on, "time_ratio": round(on["step_s"] / off["step_s"], 3)}
    if CUDA:
        out["memory_ratio"] = round(on["peak_mem_gib"] / off["peak_mem_gib"], 3)
        out["summary"] = (f"batch {b}: ckpt on {on['peak_mem_gib']} GiB vs off {off['peak_mem_gib']} GiB, "
                          f"time x{out['time_ratio']}")
    else:
        out["summary"] = f"batch {b}: time x{out['time_ratio']} (peak memory: GPU only; bench/pretrain_step.py on CPU)"
    return out


# ---------------------------------------------------------------------------------------
# kmeans

def part_kmeans(S, work, clock):
    need("faiss", "pydantic")
    import numpy as np

    from mapet_ds.tokenizers.codebook import faiss_num_gpus, fit_codebook

    n, d, k = S["kmeans"]
    rng = np.random.default_rng(0)
    out: dict = {"d": d, "k": k, "niter": S["kmeans_niter"], "nredo": 1}

    def per_iter(x, gpu) -> float:
        # one restart (nredo=1): fit_codebook's default nredo=5 runs niter iterations five times
        _, st = fit_codebook(x, k, niter=S["kmeans_niter"], nredo=1,
                             max_points_per_centroid=max(1, -(-len(x) // k)), use_gpu=gpu, return_stats=True)
        timed.append(len(st["iterations"]))
        return st["seconds"] / S["kmeans_niter"]

    timed: list[int] = []  # faiss iteration records per timed fit: niter with one restart

    if CUDA and faiss_num_gpus() > 0:
        x = rng.standard_normal((n, d), dtype=np.float32)
        out["gpu_n"], out["gpu_s_per_iter"] = n, round(per_iter(x, True), 4)
    else:
        out["gpu_skipped"] = "no CUDA" if not CUDA else "this faiss build has no GPU support (faiss-cpu)"
        x = None
    m = S["kmeans_cpu_slice"]
    xs = x[:m] if x is not None else rng.standard_normal((m, d), dtype=np.float32)
    out["cpu_n"], out["cpu_s_per_iter"] = m, round(per_iter(xs, False), 4)
    out["iterations_per_fit"] = timed
    if "gpu_s_per_iter" in out:  # per point: k-means cost is linear in n at fixed k, d
        out["gpu_speedup_per_point"] = round(out["cpu_s_per_iter"] / m / (out["gpu_s_per_iter"] / n), 1)
        out["summary"] = (f"GPU {n}x{d} k={k}: {out['gpu_s_per_iter']} s/iter; CPU {m} pts {out['cpu_s_per_iter']} "
                          f"s/iter ({out['gpu_speedup_per_point']}x per point)")
    else:
        out["summary"] = f"CPU {m}x{d} k={k}: {out['cpu_s_per_iter']} s/iter; GPU: {out['gpu_skipped']}"
    return out


# ---------------------------------------------------------------------------------------
# clip

def part_clip(S, work, clock):
    need("open_clip", "faiss", "pydantic")
    import numpy as np
    import open_clip

    from mapet_ds.tokenizers import ClipExtractor, Codebook, KMeansTokenizer

    name, px, batch, iters = S["clip"]
    if not CUDA:  # RN50x64's layout at 448 px, narrow (as tests/test_tokenizers_kmeans.py does)
        cdir = work / "clipcfg"
        cdir.mkdir()
        text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
        vision = {"image_size": 448, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None}
        (cdir / f"{name}.json").write_text(json.dumps({"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}))
        open_clip.add_model_config(str(cdir))
    torch.manual_seed(0)
    ext = ClipExtractor(name, None, input_size=px, grid=14)  # pretrained=None: random weights, no download
    k = 8192 if CUDA else 64
    cents = np.random.default_rng(0).standard_normal((k, ext.dim), dtype=np.float32)
    tok = KMeansTokenizer(ext, Codebook(cents))
    images = torch.randint(0, 256, (batch, 3, px, px), dtype=torch.uint8, device=ext.device)
    tok.tokenize(images)  # warm-up (cudnn autotune, faiss index)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        ids = tok.tokenize(images)
    sync()
    ips = batch * iters / (time.perf_counter() - t0)
    return {"model": name, "px": px, "batch": batch, "k": k, "dim": ext.dim, "amp": ext.amp,
            "ids_shape": list(ids.shape), "img_s": round(ips, 1),
            "summary": f"{name} @ {px}px ({ext.amp}) + k={k} assign: {ips:.1f} img/s"}


# ---------------------------------------------------------------------------------------
# resume: subprocesses of the real command-line tools

def _run(args, cwd, env=None, timeout=600, check=True):
    full = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # this process's own world
        full.pop(k, None)
    full["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    child = subprocess.Popen([str(a) for a in args], cwd=cwd, env=full, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _CHILDREN.append(child)  # a stop of gpu_check kills it (see _on_stop)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise
    finally:
        _CHILDREN.remove(child)
    p = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    if check and p.returncode != 0:
        tail = (p.stdout + p.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(map(str, args[:3]))} exited {p.returncode}: {' | '.join(tail)}")
    return p


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def part_resume(S, work, clock):
    need("nvidia.dali", "deepspeed", "faiss", "pydantic")
    R = S["resume"]
    ws = work / "resume"
    ws.mkdir()
    py = [sys.executable] + (["-S"] if sys.flags.no_site else [])  # the tools run in this Python's environment
    img, patch = (64, 8) if CUDA else (32, 8)
    _run([*py, REPO / "data/make_demo.py", "--out", "data", "--num-train-per-class", R["per_class"],
          "--num-val-per-class", 1, "--size", R["size"]], ws)
    _run([*py, REPO / "launch/tokens.py", "fit", "--filelist", "data/train.txt", "--extractor", "pixel",
          "--img-size", img, "--patch-size", patch, "--k", 64, "--niter", 5, "--out", "codebook.pt"], ws)
    _run([*py, REPO / "launch/tokens.py", "assign", "--filelist", "data/train.txt", "--codebook", "codebook.pt",
          "--out", "tokens"], ws)
    model = ("model: {size: null, embed_dim: 128, depth: 6, num_heads: 4, img_size: 64, patch_size: 8}" if CUDA else
             "model: {size: null, embed_dim: 32, depth: 2, num_heads: 2, img_size: 32, patch_size: 8}")
    (ws / "pretrain.yaml").write_text(
        model + "\n"
        "tokenizer: {kind: pixel_kmeans, vocab_size: 64, token_store: tokens}\n"
        "objective: {name: mapet}\n"
        "data: {train_list: data/train.txt, num_threads: 2}\n"
        "optim: {lr: 1.5e-3, warmup_steps: 5, min_lr: 1.0e-5}\n"
        f"pretrain: {{global_batch_size: {R['batch']}, max_steps: {R['steps']}, log_every: 10, "
        f"save_every: {R['save_every']}, keep_last: 1}}\n")
    launcher = [*py, REPO / "launch/pretrain.py"]
    ds = shutil.which("deepspeed")
    if CUDA and ds:
        launcher = [ds, "--num_gpus", "1", "--master_port", str(_free_port()), REPO / "launch/pretrain.py"]
    base = [*launcher, "--config", "pretrain.yaml"]
    t0 = time.perf_counter()
    _run([*base, "pretrain.output_dir=runs/full"], ws)
    t_full = time.perf_counter() - t0
    killed = _run([*base, "pretrain.output_dir=runs/kill"], ws, env={"MAPET_FAULT": f"step:{R['kill_at']}"},
                  check=False)
    if killed.returncode == 0:
        raise RuntimeError(f"the run meant to be killed at step {R['kill_at']} finished normally")
    resumed = _run([*base, "pretrain.output_dir=runs/kill"], ws)
    tag = [ln for ln in resumed.stdout.splitlines() if "resumed from" in ln]
    if not tag:
        raise RuntimeError("the rerun did not resume from a checkpoint: " + resumed.stdout.strip()[-200:])
    full, res = _losses(ws / "runs/full"), _losses(ws / "runs/kill")
    resume_step = (R["kill_at"] // R["save_every"]) * R["save_every"]
    after = [s for s in full if s > resume_step]
    if not after or any(s not in res for s in after):
        raise RuntimeError(f"resumed run lacks losses for steps {sorted(set(after) - set(res))}")
    diff = max(abs(full[s] - res[s]) for s in after)
    return {"steps": R["steps"], "killed_at": R["kill_at"], "resumed_from_step": resume_step,
            "kill_returncode": killed.returncode, "launcher": "deepspeed" if launcher[0] == ds else "python",
            "uninterrupted_run_s": round(t_full, 1), "max_loss_diff_after_resume": diff,
            "final_loss": round(full[R["steps"]], 4),
            "summary": f"SIGKILL at step {R['kill_at']}, resumed from {resume_step}: max |loss diff| over "
                       f"{len(after)} steps = {diff:.3g}"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------

FUNCS = dict(dali=part_dali, step=part_step, ckpt=part_ckpt, kmeans=part_kmeans, clip=part_clip, resume=part_resume,
             compile=part_compile)


def _reserve_after(part: str, clock: Clock) -> float:
    mins = GPU_MIN if CUDA else CPU_MIN
    later = PARTS[PARTS.index(part) + 1:]
    return sum(mins[p] for p in later if p in _SELECTED and p != "compile")


_SELECTED: tuple[str, ...] = PARTS


def classify(err: BaseException) -> dict:
    """A part's exception as a result row. A third-party module that is not installed (also
    one missing deep inside a library's own imports) is a ``skipped`` part with the module's
    name; anything else, a missing ``mapet_ds`` module included, is ``failed``: the code
    under test (or the install it runs on) broke."""
    if isinstance(err, Skip):
        return {"status": "skipped", "reason": str(err)}
    if isinstance(err, ModuleNotFoundError) and err.name and err.name.split(".")[0] != "mapet_ds":
        return {"status": "skipped", "reason": f"{err.name} not installed (ModuleNotFoundError)"}
    return {"status": "failed", "reason": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}


class Report:
    """The results so far. ``emit`` prints the table and the JSON line; it runs after every
    part (a running result, ``"complete": false``), at the end, and from the SIGTERM /
    SIGALRM handler, so a run stopped by a scheduler or a node-side ``timeout`` still leaves
    every finished part on stdout (the last JSON line is always the newest state)."""

    def __init__(self, device: str, clock: Clock):
        self.device, self.clock = device, clock
        self.results: dict = {}
        self.current: tuple[str, float] | None = None  # (part, start time) while one runs

    def payload(self, complete: bool) -> dict:
        results = dict(self.results)
        if self.current is not None:
            name, t0 = self.current
            results[name] = {"status": "stopped", "reason": "process stopped while this part ran",
                             "seconds": round(time.perf_counter() - t0, 3)}
        ok = complete and not any(r["status"] == "failed" for r in results.values())
        return {"benchmark": "gpu_check", "ok": ok, "complete": complete, "cuda": CUDA, "device": self.device,
                "torch": torch.__version__, "seconds": round(time.perf_counter() - self.clock.t0, 1),
                "code": str(REPO), "parts": results}

    def render(self, complete: bool, table: bool = True) -> tuple[str, dict]:
        out = self.payload(complete)
        lines = []
        if table:
            lines.append(f"{'part':8s} {'status':8s} {'time':>7s}  result")
            for name, r in out["parts"].items():
                lines.append(f"{name:8s} {r['status']:8s} {r['seconds']:6.1f}s  "
                             f"{r.get('summary', r.get('reason', ''))}")
        return "\n".join(lines + [json.dumps(out)]) + "\n", out

    def emit(self, complete: bool, table: bool = True) -> dict:
        text, out = self.render(complete, table)
        print(text, end="", flush=True)
        return out


_CHILDREN: list[subprocess.Popen] = []  # the resume part's running tools, stopped with us


def _on_stop(report: Report, work: Path | None):
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.setitimer(signal.ITIMER_REAL, 0)
        for child in _CHILDREN:
            with contextlib.suppress(OSError):
                child.kill()
        why = "SIGTERM" if signum == signal.SIGTERM else "the hard time limit (--stop-after)"
        text, _ = report.render(complete=False)
        # Straight to the file descriptor: the signal may have arrived inside a print, and
        # the buffered stdout refuses a reentrant write. What it still held is dropped by
        # os._exit, so the JSON written here stays the last line.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        data = f"\ngpu_check stopped by {why}\n{text}".encode()
        while data:
            data = data[os.write(sys.stdout.fileno(), data):]
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        # no interpreter teardown: NCCL/DeepSpeed/DALI exit hooks can hang on a half-run part
        os._exit(128 + signum)

    return handler


def main(argv=None) -> int:
    global _SELECTED
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (default 480 GPU, 110 CPU)")
    ap.add_argument("--stop-after", type=float, default=None,
                    help="hard limit (s): stop the running part and print what finished (default budget + 90)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {','.join(PARTS)}")
    ap.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one)")
    args = ap.parse_args(argv)
    _SELECTED = tuple(p for p in PARTS if p in args.parts.split(","))
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    S = GPU_SIZES if CUDA else CPU_SIZES
    mins = GPU_MIN if CUDA else CPU_MIN
    clock = Clock(args.budget or (480 if CUDA else 110))
    if not CUDA:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.keep or tempfile.mkdtemp(prefix="mapet_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if CUDA else (platform.processor() or platform.machine() or "cpu")
    report = Report(device, clock)
    handler = _on_stop(report, None if args.keep else work)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, args.stop_after or clock.budget + 90)
    print(f"gpu_check on {device} ({'CUDA' if CUDA else 'CPU smoke, tiny sizes'}), budget {clock.budget:.0f}s",
          flush=True)
    for name in _SELECTED:
        t0 = time.perf_counter()
        if clock.left < mins[name]:
            row = {"status": "skipped", "reason": f"time budget ({clock.left:.0f}s left)"}
        else:
            report.current = (name, t0)
            print(f"  {name:8s} running  ({clock.left:.0f}s of the budget left)", flush=True)
            try:
                row = {"status": "ok", **FUNCS[name](S, work, clock)}
            except Exception as e:  # one line in the table; the traceback on stderr
                row = classify(e)
                if row["status"] == "failed":
                    traceback.print_exc(file=sys.stderr)
        row["seconds"] = round(time.perf_counter() - t0, 3)  # ms: a light part on a quiet box takes < 0.05 s
        report.results[name], report.current = row, None
        print(f"  {name:8s} {row['status']:8s} {row['seconds']:6.1f}s  {row.get('summary', row.get('reason', ''))}",
              flush=True)
        report.emit(complete=False, table=False)  # the running result: survives a later stop
    signal.setitimer(signal.ITIMER_REAL, 0)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    out = report.emit(complete=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
