"""MIM block masks drawn on the host: BEiT's block-wise distribution, unchanged.

``old_sample_block_mask`` is the device sampler this replaced (one batched round of
~40 tiny ops at a time), kept here verbatim as the reference: the host sampler must
give the same mask statistics within sampling error.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mapet_ds.models.objectives import plan_generator, sample_block_mask, sample_plan

GRID, M, N_MASKS = 14, 75, 2000


def old_sample_block_mask(batch_size, grid, num_masked, *, min_block=16, max_block: Optional[int] = None,
                          min_aspect=0.3, max_rounds=64, device="cpu", generator=None):
    gh = gw = grid
    n = gh * gw
    max_block = max_block or num_masked
    mask = torch.zeros(batch_size, gh, gw, dtype=torch.bool, device=device)
    ys = torch.arange(gh, device=device).view(1, gh, 1)
    xs = torch.arange(gw, device=device).view(1, 1, gw)
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)

    def u(*shape):
        return torch.rand(*shape, device=device, generator=generator)

    for _ in range(max_rounds):
        count = mask.flatten(1).sum(1)
        remaining = num_masked - count
        upper = torch.clamp(remaining, max=max_block).float()
        target = min_block + u(batch_size) * (upper - min_block).clamp(min=0)
        aspect = torch.exp(log_lo + u(batch_size) * (log_hi - log_lo))
        h = torch.round(torch.sqrt(target * aspect)).long().clamp(1, gh)
        w = torch.round(torch.sqrt(target / aspect)).long().clamp(1, gw)
        top = (u(batch_size) * (gh - h + 1).float()).long()
        left = (u(batch_size) * (gw - w + 1).float()).long()
        block = (
            (ys >= top.view(-1, 1, 1)) & (ys < (top + h).view(-1, 1, 1))
            & (xs >= left.view(-1, 1, 1)) & (xs < (left + w).view(-1, 1, 1))
        )
        new = (block & ~mask).flatten(1).sum(1)
        accept = (new > 0) & (new <= remaining)
        mask |= block & accept.view(-1, 1, 1)
    mask = mask.flatten(1)
    noise = u(batch_size, n)
    score = mask.float() * 2.0 + noise
    keep = score.argsort(dim=1, descending=True)[:, :num_masked]
    out = torch.zeros_like(mask)
    out.scatter_(1, keep, True)
    return out


def _components(grid: torch.Tensor) -> torch.Tensor:
    """Number of 8-connected masked regions per mask. grid: bool [n, H, W] -> [n]."""
    n, h, w = grid.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float64).view(1, h, w)
    label = torch.where(grid, ids, 0.0)
    while True:  # every region ends labelled with its largest id
        grown = F.max_pool2d(label.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * grid
        if torch.equal(grown, label):
            break
        label = grown
    return ((label == ids) & grid).double().sum((1, 2))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _stats(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-mask shape statistics (each [n]) of bool masks [n, 196]."""
    g = mask.view(-1, GRID, GRID)
    f = g.double()
    return {
        "count": f.sum((1, 2)),
        "right_pairs": (f[:, :, 1:] * f[:, :, :-1]).sum((1, 2)),  # horizontal extent of the blocks
        "down_pairs": (f[:, 1:] * f[:, :-1]).sum((1, 2)),  # vertical extent
        "rows_used": g.any(2).double().sum(1),
        "cols_used": g.any(1).double().sum(1),
        "border": torch.cat([f[:, 0], f[:, -1], f[:, 1:-1, 0], f[:, 1:-1, -1]], 1).sum(1),
        "components": _components(g),
    }


def test_host_sampler_keeps_the_block_mask_distribution():
    new = sample_block_mask(N_MASKS, GRID, M, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    old = torch.cat([old_sample_block_mask(100, GRID, M, generator=g) for _ in range(N_MASKS // 100)])
    assert new.shape == (N_MASKS, GRID * GRID) and new.dtype == torch.bool
    assert torch.all(new.sum(1) == M)
    a, b = _stats(new), _stats(old)
    for name in a:
        se = math.sqrt(a[name].var() / N_MASKS + b[name].var() / N_MASKS) + 1e-9
        z = (a[name].mean() - b[name].mean()).abs() / se
        assert z < 5, f"{name}: host {a[name].mean():.3f} vs device {b[name].mean():.3f} (z={z:.1f})"
    # blocks, not scattered patches: a random 75-of-196 mask has ~2.9 right pairs per row...
    assert a["right_pairs"].mean() > 50
    # ...and the same place-by-place frequency (borders less often than the centre)
    freq_new, freq_old = new.double().mean(0), old.double().mean(0)
    assert (freq_new - freq_old).abs().max() < 5 * math.sqrt(2 * 0.25 / N_MASKS)


def test_mim_plan_on_the_host_is_one_copy():
    """The plan's indices are the sampled mask's, sorted; same generator state -> same plan."""
    g = plan_generator("mim", "cpu", 7)
    assert g.device.type == "cpu"
    plan = sample_plan("mim", 6, GRID, M, generator=g)
    flags = sample_block_mask(6, GRID, M, generator=plan_generator("mim", "cpu", 7))
    assert plan.predicted.dtype == torch.int64 and plan.predicted.shape == (6, M)
    assert torch.equal(plan.predicted, flags.nonzero()[:, 1].view(6, M))
    with _CountOps() as count:
        sample_plan("mim", 64, GRID, M, generator=g)
    assert count.ops <= 4  # torch ops per plan: rand, numpy views, copy; the old one ran ~2.6k
    with _CountOps() as count_old:
        old_sample_block_mask(64, GRID, M, generator=g)
    assert count_old.ops > 1000
