"""DeepSpeed JSON: fill ``"auto"`` values from our config and refuse contradictions.

Our pydantic config is the source of truth for batch sizes, precision and clipping;
the DeepSpeed JSON chooses the engine (ZeRO stage, offload, bucket sizes). Where both
give a number they must agree; a contradiction names both sources.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from mapet_ds.config import ConfigError, OptimConfig, TrainConfig

DEFAULT_DS_CONFIG = str(Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json")


def load_ds_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist (see ds_configs/)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    return data


def _is_auto(v: Any) -> bool:
    return v is None or v == "auto"


def _num(ds: dict, key: str, src: str) -> int | None:
    v = ds.get(key)
    if _is_auto(v):
        return None
    if not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{src}: {key}={v!r} must be a positive integer or \"auto\"")
    return v


def resolve_precision(train: TrainConfig, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it, fp32 elsewhere."""
    p = train.precision
    if p == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if device.type == "cpu" and p == "fp16":
        raise ConfigError("precision='fp16' is not supported on CPU by DeepSpeed; use 'fp32' or 'auto'")
    return p


def resolve_ds_config(
    ds: dict,
    train: TrainConfig,
    optim: OptimConfig,
    world_size: int,
    device: torch.device,
    *,
    src: str = "ds_config",
    section: str = "pretrain",
) -> dict:
    """Return a complete DeepSpeed config dict; raise ConfigError on contradictions."""
    ds = copy.deepcopy(ds)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"{src}: remove the \"{key}\" section: mapet_ds builds AdamW and the warmup+cosine "
                f"schedule from the optim.* config (one source of truth)"
            )
    g = train.global_batch_size
    ours_micro, ours_accum = train.micro_batch_size, train.grad_accum
    ds_global = _num(ds, "train_batch_size", src)
    ds_micro = _num(ds, "train_micro_batch_size_per_gpu", src)
    ds_accum = _num(ds, "gradient_accumulation_steps", src)
    if ds_global is not None and ds_global != g:
        raise ConfigError(
            f"{src}: train_batch_size={ds_global} but {section}.global_batch_size={g}; "
            f"set one of them to \"auto\" or make them equal"
        )
    for name, ours, theirs, ds_key in (
        ("micro_batch_size", ours_micro, ds_micro, "train_micro_batch_size_per_gpu"),
        ("grad_accum", ours_accum, ds_accum, "gradient_accumulation_steps"),
    ):
        if ours is not None and theirs is not None and ours != theirs:
            raise ConfigError(f"{src}: {ds_key}={theirs} but {section}.{name}={ours}; make them equal or use \"auto\"")
    micro = ours_micro or ds_micro
    accum = ours_accum or ds_accum
    if micro is None and accum is None:
        accum = 1
    if micro is None:
        micro = g // (accum * world_size)
    if accum is None:
        accum = g // (micro * world_size)
    if micro <= 0 or accum <= 0 or micro * accum * world_size != g:
        raise ConfigError(
            f"micro batch {micro} x grad accumulation {accum} x world size {world_size} = "
            f"{max(micro, 0) * max(accum, 0) * world_size} != {section}.global_batch_size={g} "
            f"({src} and {section}.*): choose sizes whose product is the global batch"
        )
    ds["train_batch_size"] = g
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum

    precision = resolve_precision(train, device)
    fp16_on = ds.get("fp16", {}).get("enabled")
    bf16_on = ds.get("bf16", {}).get("enabled")
    if fp16_on is True and bf16_on is True:
        raise ConfigError(f"{src}: fp16.enabled and bf16.enabled are both true; enable at most one (or \"auto\")")
    for name, flag in (("fp16", fp16_on), ("bf16", bf16_on)):
        if flag is True and precision != name:
            raise ConfigError(
                f"{src}: {name}.enabled=true but {section}.precision resolves to {precision!r} on this "
                f"{device.type} machine; set {name}.enabled to \"auto\" or {section}.precision={name}"
            )
        if flag is False and precision == name:
            raise ConfigError(f"{src}: {name}.enabled=false but {section}.precision={name}; make them agree")
    ds.setdefault("fp16", {})["enabled"] = precision == "fp16"
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"

    clip = optim.clip_grad or 0.0
    ds_clip = ds.get("gradient_clipping")
    if not _is_auto(ds_clip) and float(ds_clip) != float(clip):
        raise ConfigError(
            f"{src}: gradient_clipping={ds_clip} but optim.clip_grad={optim.clip_grad}; "
            f"set gradient_clipping to \"auto\" or make them equal"
        )
    ds["gradient_clipping"] = clip
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("wall_clock_breakdown", False)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if device.type == "cpu":
        # CUDA-only knobs that DeepSpeed's CPU accelerator does not implement
        off = zero.get("offload_optimizer", {})
        if off.get("pin_memory"):
            off["pin_memory"] = False
    return ds


def write_json(data: dict, path: str | os.PathLike) -> Path:
    from mapet_ds.safe_io import atomic_write_text

    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")
