"""AdamW parameter groups and the per-step warmup + cosine schedules.

Groups come from timm (``param_groups_weight_decay`` / ``param_groups_layer_decay``);
the lr schedule is timm's ``CosineLRScheduler`` stepped per optimizer update, which
also applies each group's ``lr_scale`` (layer decay). timm has no weight-decay
schedule, so ``weight_decay_at`` is the BEiT-style cosine for it, applied only to
groups that decay at all.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from mapet_ds.config import OptimConfig


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if fn is not None else set()


def build_param_groups(model: torch.nn.Module, optim: OptimConfig, layer_decay: float | None = None) -> list[dict]:
    """No decay on 1-D params, pos_embed, cls_token (mask_token too with ``optim.decay_mask_token=false``);
    optional layer decay."""
    skip = no_weight_decay_names(model)
    if not optim.decay_mask_token:
        skip |= {n for n, _ in model.named_parameters() if n == "mask_token" or n.endswith(".mask_token")}
    if layer_decay is not None and layer_decay < 1.0:
        groups = param_groups_layer_decay(
            model, weight_decay=optim.weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
        )
    else:
        groups = param_groups_weight_decay(model, weight_decay=optim.weight_decay, no_weight_decay_list=skip)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        g["base_weight_decay"] = g["weight_decay"]
        # saved with the optimizer state: lets export name fp32 master weights (bf16, ZeRO-0)
        g["param_names"] = [names[id(p)] for p in g["params"]]
    return groups


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, layer_decay: float | None = None,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over ``build_param_groups``; ``fused`` (default: on when CUDA is available) uses
    torch's fused kernel: one launch for all parameters instead of several per tensor."""
    groups = build_param_groups(model, optim, layer_decay)
    if fused is None:
        fused = torch.cuda.is_available()
    # foreach=False keeps the CPU update bitwise identical whatever the tensor layout (exact
    # resume); the fused kernel is per element as well, so resume stays exact with it
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, foreach=False,
                             fused=bool(fused))


class Schedule:
    """lr (timm cosine with warmup prefix) and weight decay, both per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int, steps_per_epoch: int):
        self.optim = optim
        self.total_steps = max(1, total_steps)
        warm = optim.warmup_steps if optim.warmup_steps is not None else int(round(optim.warmup_epochs * steps_per_epoch))
        self.warmup_steps = min(warm, self.total_steps - 1)
        self.optimizer = optimizer
        self.lr_sched = self.lr_scheduler(optimizer, t_initial=self.total_steps - self.warmup_steps,
                                          lr_min=optim.min_lr, warmup_t=self.warmup_steps,
                                          warmup_lr_init=optim.warmup_lr, warmup_prefix=True, t_in_epochs=False)

    def lr_scheduler(self, optimizer: torch.optim.Optimizer, **common):
        """The timm per-step lr scheduler after the warmup prefix (``common``: its shared arguments);
        a subclass swaps the decay here (timm schedulers set the lr on creation: make only one)."""
        return CosineLRScheduler(optimizer, **common)

    def weight_decay_at(self, step: int) -> float:
        start = self.optim.weight_decay
        end = self.optim.weight_decay_end
        if end is None:
            return start
        t = min(step, self.total_steps) / self.total_steps
        return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))

    def apply(self, step: int, param_groups: Iterable[dict] | None = None) -> tuple[float, float]:
        """Set lr and weight decay for optimizer step ``step`` (0-based); return base values."""
        self.lr_sched.step_update(step)
        wd = self.weight_decay_at(step)
        groups = list(param_groups if param_groups is not None else self.optimizer.param_groups)
        for g in groups:
            if g.get("base_weight_decay", g.get("weight_decay", 0.0)) > 0:
                g["weight_decay"] = wd
        top = max(groups, key=lambda g: g.get("lr_scale", 1.0))
        return float(top["lr"]), wd
