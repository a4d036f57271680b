"""Objective plans: which patches are context / predicted, in which order.

A *plan* is sampled per batch, on the training device for mapet/pet (a few ops), on
the host for mim (BEiT's sequential block rounds, vectorised over the batch in numpy,
then one pinned copy), without per-sample Python loops; or passed in explicitly so a
test can fix the permutation.

Patch indices here are 0..N-1 over the patch grid in row-major order (the order of a
flattened conv patch embedding); the CLS token is not a patch and always has rank 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

from mapet_ds.transfer import to_device

ObjectiveName = Literal["mapet", "pet", "mim"]


@dataclass
class Plan:
    """What one batch predicts.

    kind: "mapet" | "pet" | "mim".
    predicted: int64 [B, m] patch indices to predict, sorted by spatial index.
    rank: int64 [B, N] permutation step of each patch, a permutation of 1..N per row
        (mapet/pet; None for mim). Patches with rank <= N - m are context.
    """

    kind: ObjectiveName
    predicted: torch.Tensor
    rank: Optional[torch.Tensor] = None

    @property
    def num_predicted(self) -> int:
        return self.predicted.shape[1]

    def to(self, device: torch.device | str) -> "Plan":
        return Plan(
            self.kind,
            self.predicted.to(device),
            None if self.rank is None else self.rank.to(device),
        )


def _predicted_from_flags(flags: torch.Tensor, m: int) -> torch.Tensor:
    """flags: bool [B, N] with exactly m True per row -> int64 [B, m] sorted indices."""
    n = flags.shape[1]
    idx = torch.arange(n, device=flags.device).expand_as(flags)
    # non-flagged positions sort to the end; nonzero() would need a host sync for its size
    keyed = torch.where(flags, idx, idx + n)
    return keyed.sort(dim=1).values[:, :m]


def plan_from_rank(kind: ObjectiveName, rank: torch.Tensor, num_predicted: int) -> Plan:
    """Build a mapet/pet plan from explicit ranks.

    rank: int64 [B, N], each row a permutation of 1..N (CLS is step 0).
    """
    n = rank.shape[1]
    flags = rank > (n - num_predicted)
    return Plan(kind, _predicted_from_flags(flags, num_predicted), rank)


def sample_permutation_plan(
    kind: ObjectiveName,
    batch_size: int,
    num_patches: int,
    num_predicted: int,
    *,
    device: torch.device | str = "cpu",
    generator: Optional[torch.Generator] = None,
) -> Plan:
    """Uniform random permutation of the patches per sample (METHOD.md section 2)."""
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    order = noise.argsort(dim=1)  # order[b, s] = patch at step s + 1
    steps = torch.arange(1, num_patches + 1, device=device).expand(batch_size, -1)
    rank = torch.empty_like(order).scatter_(1, order, steps)
    return plan_from_rank(kind, rank, num_predicted)


def plan_generator(kind: ObjectiveName, device: torch.device | str, seed: int) -> torch.Generator:
    """The generator ``sample_plan`` should draw from: the CPU's for mim (its masks are drawn
    there, see ``sample_block_mask``), the device's for mapet/pet."""
    g = torch.Generator(device="cpu" if kind == "mim" else device)
    g.manual_seed(seed)
    return g


def sample_block_mask(
    batch_size: int,
    grid: int,
    num_masked: int,
    *,
    min_block: int = 16,
    max_block: Optional[int] = None,
    min_aspect: float = 0.3,
    max_rounds: int = 64,
    device: torch.device | str = "cpu",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """BEiT block-wise masking, drawn on the host and copied to ``device`` (pinned) once.

    Each round every unfinished sample proposes one rectangle (area uniform in
    [min_block, max_block], log-uniform aspect in [min_aspect, 1/min_aspect]) and keeps
    it if it adds 1..(remaining) new patches, as in BEiT's generator. A sample that
    still misses patches after ``max_rounds`` is topped up with random patches so that
    every row has exactly ``num_masked`` (a fixed m keeps the batch rectangular).

    The rounds are sequential per sample; run on the device they were ~40 tiny kernels
    each (8.5k ops per plan at batch 64). Here all uniforms come from one ``torch.rand``
    on ``generator`` (best a CPU one: ``plan_generator``; a device one costs a sync) and
    the rounds run in numpy over [B, grid, grid]; the device sees one copy.

    Returns bool [B, grid*grid] on ``device``, True = masked, exactly num_masked per row.
    """
    return to_device(torch.from_numpy(_block_mask_host(batch_size, grid, num_masked, min_block, max_block,
                                                       min_aspect, max_rounds, generator)), device)


def _block_mask_host(batch_size: int, grid: int, num_masked: int, min_block: int, max_block: Optional[int],
                     min_aspect: float, max_rounds: int, generator: Optional[torch.Generator]) -> np.ndarray:
    """``sample_block_mask`` on the host: bool ndarray [B, grid*grid]."""
    b, gh, gw = batch_size, grid, grid
    n = gh * gw
    max_block = max_block or num_masked
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(max_rounds * 4 * b + b * n, generator=generator, device=gen_device).cpu().numpy()
    rounds, noise = u[: max_rounds * 4 * b].reshape(max_rounds, 4, b), u[max_rounds * 4 * b:].reshape(b, n)
    mask = np.zeros((b, gh, gw), dtype=bool)
    count = np.zeros(b, dtype=np.int64)
    ys, xs = np.arange(gh), np.arange(gw)
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    aspects = np.exp(log_lo + rounds[:, 1] * (log_hi - log_lo))  # [rounds, B]: does not depend on the mask
    for r in range(max_rounds):
        remaining = num_masked - count
        if not (remaining > 0).any():
            break  # no later round can accept a block (the uniforms are drawn already)
        u_area, _, u_top, u_left = rounds[r]
        aspect = aspects[r]
        upper = np.minimum(remaining, max_block)
        target = min_block + u_area * np.clip(upper - min_block, 0, None)
        h = np.clip(np.rint(np.sqrt(target * aspect)), 1, gh).astype(np.int64)
        w = np.clip(np.rint(np.sqrt(target / aspect)), 1, gw).astype(np.int64)
        top = (u_top * (gh - h + 1)).astype(np.int64)
        left = (u_left * (gw - w + 1)).astype(np.int64)
        rows = (ys >= top[:, None]) & (ys < (top + h)[:, None])  # [B, gh]
        cols = (xs >= left[:, None]) & (xs < (left + w)[:, None])  # [B, gw]
        block = rows[:, :, None] & cols[:, None, :]
        new = (block & ~mask).sum((1, 2))
        accept = (new > 0) & (new <= remaining)
        mask |= block & accept[:, None, None]
        count += np.where(accept, new, 0)
    # top up (or, never in practice, trim) to exactly num_masked with random patches
    score = mask.reshape(b, n) * 2.0 + noise  # masked first, then random order
    keep = np.argsort(-score, axis=1, kind="stable")[:, :num_masked]
    out = np.zeros((b, n), dtype=bool)
    np.put_along_axis(out, keep, True, axis=1)
    return out


def sample_plan(
    kind: ObjectiveName,
    batch_size: int,
    grid: int,
    num_predicted: int,
    *,
    min_block: int = 16,
    max_block: Optional[int] = None,
    min_aspect: float = 0.3,
    device: torch.device | str = "cpu",
    generator: Optional[torch.Generator] = None,
) -> Plan:
    """Sample a plan for a batch. num_predicted is m (mapet/pet) or the masked count (mim)."""
    n = grid * grid
    if kind == "mim":
        flags = _block_mask_host(batch_size, grid, num_predicted, min_block, max_block, min_aspect, 64, generator)
        predicted = np.nonzero(flags)[1].reshape(batch_size, num_predicted)  # row-major: sorted per row
        return Plan("mim", to_device(torch.from_numpy(predicted), device))
    return sample_permutation_plan(kind, batch_size, n, num_predicted, device=device, generator=generator)


def attention_ranks(plan: Plan) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The two-stream mask of METHOD.md section 2 as one threshold per row and one rank per key.

    Query rows are [content stream; query stream], keys are the content stream:
      mapet: content = [CLS, x_1..x_N, a_P] (1+N+m), rows = content + m query rows
      pet:   content = [CLS, x_1..x_N]      (1+N),   rows = content + m query rows

    Every rule of METHOD.md reduces to one threshold T per row: a row may attend to x_k
    iff rank(k) <= T and to a_q iff rank(q) > T, with
      context content row / aux row: T = N - m      (all context x, every a_q)
      predicted content row r:       T = rank(r)    (itself and earlier; later a_q)
      query row p:                   T = rank(p)-1  (strictly earlier x; a_q from p on)

    Returns (t int64 [B, L_rows], key_rank int64 [B, L_keys], num_x): keys at index
    >= num_x are the a_q tokens (num_x = 1+N; = L_keys for pet, which has none). Row i
    may attend to key j iff (key_rank[j] <= t[i]) xor (j >= num_x).
    """
    if plan.rank is None:
        raise ValueError("attention_mask needs a permutation plan (mapet or pet), got mim")
    rank = plan.rank
    b, n = rank.shape
    m = plan.num_predicted
    n_ctx = n - m
    rank_x = torch.cat([rank.new_zeros(b, 1), rank], dim=1)  # [B, 1+N], CLS = 0
    rank_p = rank.gather(1, plan.predicted)  # [B, m]
    t_content = rank_x.clamp(min=n_ctx)  # context rows -> N-m, predicted rows -> own rank
    t_query = rank_p - 1
    if plan.kind == "mapet":
        t_aux = torch.full_like(rank_p, n_ctx)
        t = torch.cat([t_content, t_aux, t_query], dim=1)  # [B, 1+N+2m]
        keys = torch.cat([rank_x, rank_p], dim=1)  # [B, 1+N+m]
    elif plan.kind == "pet":
        t = torch.cat([t_content, t_query], dim=1)  # [B, 1+N+m]
        keys = rank_x
    else:
        raise ValueError(f"unknown permutation objective {plan.kind!r}")
    return t, keys, 1 + n


def attention_mask(plan: Plan) -> torch.Tensor:
    """Two-stream attention mask for mapet/pet (METHOD.md section 2), True = may attend.

    The dense form of ``attention_ranks`` (see there for the rules).
    Returns bool [B, 1, L_rows, L_keys], broadcast over heads.
    """
    t, keys, num_x = attention_ranks(plan)
    is_aux = torch.arange(keys.shape[1], device=keys.device) >= num_x
    allowed = (keys.unsqueeze(1) <= t.unsqueeze(2)) ^ is_aux.view(1, 1, -1)
    return allowed.unsqueeze(1)
