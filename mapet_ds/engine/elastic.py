"""Elastic resume: continue a run on another world size or ZeRO stage (0 <-> 2).

Same world size and stage keep the exact path (``checkpoint.load``). Otherwise:

1. The newest complete checkpoint is converted once to DeepSpeed's *universal* format,
   next to it (``<tag>/universal/``, built in ``universal.tmp/`` and renamed when its own
   ``complete.json`` is written, so a kill during conversion is harmless and a second
   resume reuses it). ZeRO-1/2 (and bf16) checkpoints go through DeepSpeed's
   ``ds_to_universal``; a fp32 ZeRO-0 checkpoint already holds the whole AdamW state in
   its model-states file, which we write out in the same per-parameter layout.
2. Engines whose optimizer DeepSpeed can load universal checkpoints into (ZeRO >= 1,
   bf16) are built with ``"checkpoint": {"load_universal": true}`` and load it.
   DeepSpeed 0.19.8 has no universal loading for a fp32 ZeRO-0 engine (it skips the
   module load and then calls ``update_lp_params`` on the plain torch optimizer), so
   there we read the per-parameter ``fp32`` / ``exp_avg`` / ``exp_avg_sq`` / ``step``
   files of the universal folder into the module and torch's AdamW state ourselves:
   reading DeepSpeed's format, no partitioning involved (ZeRO-0 holds everything).
3. Data position: the old ranks' loader states are merged (``merge_rank_states``) and
   the interrupted epoch continues over its not-yet-used sample ids; per-rank RNG
   streams are re-derived from (seed, rank, step).
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from mapet_ds.config import ConfigError, TrainConfig
from mapet_ds.engine import checkpoint as ckpt
from mapet_ds.engine.dist import barrier

UNIVERSAL = "universal"


def saved_layout(tag_dir: Path) -> dict:
    """World size and ZeRO stage a checkpoint was written with (from its marker)."""
    marker = json.loads((tag_dir / ckpt.MARKER).read_text(encoding="utf-8"))
    world = int(marker.get("world_size", 1))
    stage = marker.get("zero_stage")
    if stage is None:  # written before the stage was recorded: DeepSpeed keeps its config in the model states
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=False)
        stage = (sd.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    return {"world_size": world, "zero_stage": int(stage), "micro_batch": marker.get("micro_batch")}


def rebatch(train: TrainConfig, world_size: int, saved: dict, section: str) -> TrainConfig:
    """The recipe's global batch on ``world_size`` ranks: keep the largest micro batch that is
    not above the recipe's (or the checkpoint's) and divides the per-rank share; accumulate the rest."""
    g = train.global_batch_size
    if g % world_size:
        raise ConfigError(
            f"{section}.global_batch_size={g} cannot be split over {world_size} ranks (the checkpoint was written "
            f"on {saved['world_size']}): resume on a world size that divides {g}"
        )
    per_rank = g // world_size
    cap = train.micro_batch_size or saved.get("micro_batch") or per_rank
    micro = max(d for d in range(1, min(cap, per_rank) + 1) if per_rank % d == 0)
    return train.model_copy(update={"micro_batch_size": micro, "grad_accum": per_rank // micro})


def needs_universal(tag_dir: Path, zero_stage: int, precision: str) -> bool:
    """fp32 ZeRO-0 -> fp32 ZeRO-0 needs no conversion: the checkpoint holds the whole state."""
    sharded = bool(glob.glob(os.path.join(glob.escape(str(tag_dir)), "*optim_states.pt")))
    return sharded or zero_stage >= 1 or precision != "fp32"


def deepspeed_loads_universal(zero_stage: int, precision: str) -> bool:
    """Engines with a ZeRO or bf16 optimizer implement ``load_hp_checkpoint_state_from_checkpoint_dir``."""
    return zero_stage >= 1 or precision == "bf16"


class ElasticResume:
    """One elastic resume: detected before the engine is built, loaded right after it."""

    def __init__(self, tag_dir: Path, saved: dict, world_size: int, zero_stage: int, train: TrainConfig,
                 section: str):
        self.tag_dir, self.saved, self.world_size, self.zero_stage = tag_dir, saved, world_size, zero_stage
        self.section = section
        self.train = rebatch(train, world_size, saved, section)  # the config the DeepSpeed batch comes from
        self.mode: Optional[str] = None  # None: DeepSpeed's own load; "deepspeed" / "own": universal folder
        self.how = ""

    @classmethod
    def detect(cls, tag_dir: Optional[Path], ds_json: dict, train: TrainConfig, world_size: int,
               section: str) -> Optional["ElasticResume"]:
        """An ElasticResume when ``tag_dir`` was written on another world size or ZeRO stage, else None."""
        if tag_dir is None:
            return None
        saved = saved_layout(tag_dir)
        stage = int((ds_json.get("zero_optimization") or {}).get("stage", 0))
        if (saved["world_size"], saved["zero_stage"]) == (world_size, stage):
            return None
        return cls(tag_dir, saved, world_size, stage, train, section)

    def engine_config(self, ds: dict, precision: str) -> dict:
        """The resolved DeepSpeed config, with ``load_universal`` where DeepSpeed does the loading."""
        if needs_universal(self.tag_dir, self.zero_stage, precision):
            self.mode = "deepspeed" if deepspeed_loads_universal(self.zero_stage, precision) else "own"
            if precision == "fp16" and self.mode == "own":
                raise ConfigError(f"{self.section}: an elastic resume into fp16 ZeRO-0 is not supported; use ZeRO-2")
        if self.mode == "deepspeed":
            ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
        return ds

    def load(self, engine, rank: int) -> tuple[dict, Optional[str]]:
        """Weights + optimizer into ``engine``; returns (client state, merged loader state)."""
        tag = self.tag_dir
        # refuses old states before converting
        loader_state = merged_loader_state(tag, self.saved["world_size"], self.world_size, rank)
        if self.mode is None:  # fp32 ZeRO-0 both sides: DeepSpeed's own load is world-size free
            _, client = engine.load_checkpoint(str(tag.parent), tag=tag.name, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
            self.how = "ZeRO-0 checkpoint"
        else:
            uni = universal_dir(tag, rank)
            if self.mode == "deepspeed":
                _, client = engine.load_checkpoint(str(tag), tag=uni.name, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
            else:  # module + client state from the checkpoint, fp32 weights and moments from the universal folder
                _, client = engine.load_checkpoint(str(tag.parent), tag=tag.name, load_optimizer_states=False,
                                                   load_lr_scheduler_states=False, load_module_only=True)
                load_universal_into_plain(engine, uni)
            self.how = "universal checkpoint"
        return client or {}, loader_state

    def summary(self, step: int, loader) -> str:
        return summary(step, self.world_size, self.saved, self.zero_stage, self.how, loader)


# -- conversion ---------------------------------------------------------------------------
def universal_dir(tag_dir: Path, rank: int) -> Path:
    """``<tag>/universal``, converted once by rank 0 (collective: every rank calls it)."""
    out = tag_dir / UNIVERSAL
    if rank == 0 and not (out / ckpt.MARKER).is_file():
        t0 = time.perf_counter()
        tmp = tag_dir / (UNIVERSAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a conversion killed midway
        if glob.glob(os.path.join(glob.escape(str(tag_dir)), "*optim_states.pt")):
            _ds_to_universal(tag_dir, tmp)
        else:
            _plain_to_universal(tag_dir, tmp)
        ckpt.fault_point("universal", 0)
        marker = {"source": tag_dir.name, "seconds": round(time.perf_counter() - t0, 2),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / ckpt.MARKER).write_text(json.dumps(marker), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier()
    return out


def _ds_to_universal(tag_dir: Path, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    # One worker: conversion runs inside a training rank, where forking a process pool
    # next to the process group is not safe; it is I/O bound anyway (bench/elastic_resume.py).
    args = SimpleNamespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    # main() points <tag>/latest_universal at the temporary name; we address the folder directly
    Path(tag_dir / "latest_universal").unlink(missing_ok=True)


def _plain_to_universal(tag_dir: Path, out: Path) -> None:
    """fp32 ZeRO-0 checkpoint (module + torch AdamW state in mp_rank_00) -> universal layout."""
    import deepspeed

    src = tag_dir / "mp_rank_00_model_states.pt"
    sd = torch.load(src, map_location="cpu", weights_only=False)
    module, opt = sd["module"], sd.get("optimizer")
    if not opt or "param_groups" not in opt:
        raise ValueError(f"{src} holds no optimizer state: cannot resume it on another ZeRO stage")
    zero = out / "zero"
    groups = []
    for group in opt["param_groups"]:
        names = group.get("param_names")
        if names is None:
            raise ValueError(f"{src}: optimizer groups carry no parameter names (written by an older mapet_ds)")
        for idx, name in zip(group["params"], names):
            st = opt["state"].get(idx, {})
            fp32 = module[name].float()
            d = zero / name
            d.mkdir(parents=True, exist_ok=True)
            torch.save({"param": fp32}, d / "fp32.pt")
            for key in ("exp_avg", "exp_avg_sq"):  # a parameter that never had a gradient has no state
                torch.save({"param": st.get(key, torch.zeros_like(fp32)).float()}, d / f"{key}.pt")
            torch.save(st.get("step", torch.tensor(0.0)), d / "step.pt")
        groups.append({k: v for k, v in group.items()})
    torch.save({"param_groups": groups, "ds_version": deepspeed.__version__}, zero / "optimizer_state.pt")
    shutil.copy2(src, out / src.name)


# -- loading ------------------------------------------------------------------------------
def load_universal_into_plain(engine, uni: Path) -> None:
    """fp32 ZeRO-0 engine: weights and AdamW moments from the universal folder (see module doc)."""
    opt = engine.optimizer
    opt = getattr(opt, "optimizer", opt)
    names = {p: n for n, p in engine.module.named_parameters()}
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                d = uni / "zero" / names[p]
                p.copy_(torch.load(d / "fp32.pt", map_location="cpu", weights_only=False)["param"].view_as(p))
                step = torch.load(d / "step.pt", map_location="cpu", weights_only=False)
                state = opt.state[p]
                state["step"] = adamw_step_tensor(float(step), p, group)
                for key in ("exp_avg", "exp_avg_sq"):
                    t = torch.load(d / f"{key}.pt", map_location="cpu", weights_only=False)["param"]
                    state[key] = t.view_as(p).to(p.device, p.dtype).clone()


def adamw_step_tensor(step: float, p: torch.Tensor, group: dict) -> torch.Tensor:
    """AdamW's ``step`` laid out as torch's own ``Optimizer.load_state_dict`` lays it out.

    Fused and capturable AdamW keep it as a float32 tensor on the parameter's device (the
    fused kernel reads it there: a CPU step next to CUDA parameters fails); the other
    implementations keep it on the CPU in torch's default scalar dtype.
    """
    if group.get("fused") or group.get("capturable"):
        return torch.tensor(step, dtype=torch.float32, device=p.device)
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(step, dtype=dtype)


def merged_loader_state(tag_dir: Path, old_world: int, new_world: int, rank: int) -> Optional[str]:
    """All old ranks' loader states merged for a new world size (None: nothing to keep, e.g. synthetic).

    A shard-set loader on the same world size (only the ZeRO stage changed) keeps its own state.
    """
    from mapet_ds.pipelines.loaders import STATE_FORMAT, merge_rank_states

    states = []
    for r in range(old_world):
        f = tag_dir / f"rank{r:05d}.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: checkpoint {tag_dir} is damaged")
        states.append(torch.load(f, map_location="cpu", weights_only=False)["loader"])
    if f'"format": "{STATE_FORMAT}"' not in states[0]:
        return None
    if old_world == new_world and str(json.loads(states[0]).get("kind", "")).endswith("_shards"):
        return states[rank]
    return merge_rank_states(states)


def reseed(seed: int, rank: int, step: int, generator: torch.Generator) -> None:
    """Per-rank RNG streams after an elastic resume: fresh, deterministic in (seed, rank, step)."""
    s = (seed * 1_000_003 + step * 7_919 + rank) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    generator.manual_seed(s + 1)


def summary(step: int, world: int, saved: dict, stage: int, how: str, loader) -> str:
    """``resumed from step 600 on 4 ranks (was 8): universal checkpoint, epoch 3 continues with ...``"""
    was = []
    if saved["world_size"] != world:
        was.append(f"was {saved['world_size']}")
    if saved["zero_stage"] != stage:
        was.append(f"ZeRO {saved['zero_stage']} -> {stage}")
    text = f"resumed from step {step} on {world} rank{'s' if world > 1 else ''} ({', '.join(was)}): {how}"
    info = getattr(loader, "elastic_info", None)
    if info is not None:
        if info["unseen"]:
            text += f", epoch {info['epoch']} continues with {info['unseen']:,} unseen samples"
            if info["dropped"]:
                text += f" ({info['dropped']} left over, fewer than one batch per rank)"
        else:
            text += f", epoch {info['epoch']} starts"
    return text


def dump_state(engine, path: str, step: int, lr: float, rank: int) -> None:
    """Debug (MAPET_DEBUG_RESUME_STATE=<file>): full fp32 weights, AdamW moments, step and lr
    right after a resume, gathered over ranks (collective), written by rank 0."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"step": step, "lr": lr, "params": {}}
    zero = engine.zero_optimization()
    opt = engine.optimizer
    opt = getattr(opt, "optimizer", opt) if not zero else opt
    for name, p in engine.module.named_parameters():
        if zero:
            full = {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                    "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        else:
            st = opt.state[p]
            full = {"fp32": p.detach().float(), "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
        out["params"][name] = {k: v.detach().cpu().clone() for k, v in full.items()}
    inner = getattr(opt, "optimizer", opt)  # ZeRO: the torch AdamW over the flat partitions
    steps = {float(st["step"]) for st in inner.state.values() if "step" in st}
    out["adam_step"] = steps.pop() if len(steps) == 1 else sorted(steps)
    if rank == 0:
        ckpt._atomic_torch_save(out, Path(path))
    barrier()
