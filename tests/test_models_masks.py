"""Two-stream masks against a brute-force reference written from METHOD.md's rules."""

import pytest
import torch

from mapet_ds.models.objectives import attention_mask, plan_from_rank, sample_block_mask, sample_plan


def reference_mask(kind: str, rank: list[int], m: int) -> torch.Tensor:
    """Literal transcription of METHOD.md section 2, one sample, loops only.

    rank: rank of patches 1..N (list index 0 = patch 1); CLS (token 0) has rank 0.
    """
    n = len(rank)
    r = [0] + rank  # r[t] for token t = 0..N
    c = 1 + n - m  # context steps, CLS included
    context = [t for t in range(n + 1) if r[t] < c]
    predicted = sorted(t for t in range(1, n + 1) if r[t] >= c)  # spatial order
    assert len(predicted) == m
    x_keys = list(range(n + 1))
    a_keys = predicted if kind == "mapet" else []
    rows = []

    def row(allow_x, allow_a):
        return [allow_x(k) for k in x_keys] + [allow_a(q) for q in a_keys]

    # content rows for x tokens
    for t in range(n + 1):
        if t in context:
            rows.append(row(lambda k: k in context, lambda q: True))
        else:
            rows.append(row(lambda k, t=t: k in context or r[k] <= r[t], lambda q, t=t: r[q] > r[t]))
    if kind == "mapet":  # content rows of auxiliary tokens a_r
        for _ in predicted:
            rows.append(row(lambda k: k in context, lambda q: True))
    for p in predicted:  # query rows
        rows.append(row(lambda k, p=p: k in context or (k not in context and r[k] < r[p]),
                        lambda q, p=p: r[q] >= r[p]))
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("kind", ["mapet", "pet"])
@pytest.mark.parametrize("n,ratio", [(16, 0.75), (16, 0.5), (25, 0.2), (49, 0.9), (9, 1 / 9)])
def test_mask_matches_reference(kind, n, ratio):
    m = int(round(ratio * n))
    g = torch.Generator().manual_seed(n * 100 + m)
    rank = torch.stack([torch.randperm(n, generator=g) + 1 for _ in range(4)])
    plan = plan_from_rank(kind, rank, m)
    mask = attention_mask(plan)
    extra = m if kind == "mapet" else 0
    assert mask.shape == (4, 1, 1 + n + extra + m, 1 + n + extra)
    assert mask.dtype == torch.bool
    for b in range(4):
        ref = reference_mask(kind, rank[b].tolist(), m)
        assert torch.equal(mask[b, 0], ref), f"sample {b} differs from METHOD.md rules"


def test_predicted_sorted_spatially_and_ranked_last():
    g = torch.Generator().manual_seed(0)
    plan = sample_plan("mapet", 8, 14, 147, generator=g)
    assert plan.predicted.shape == (8, 147)
    assert torch.all(plan.predicted[:, 1:] > plan.predicted[:, :-1])
    # predicted patches are exactly those with the 147 latest ranks
    assert torch.all(plan.rank.gather(1, plan.predicted) > 196 - 147)
    assert torch.equal(plan.rank.sort(1).values, torch.arange(1, 197).expand(8, -1))


def test_plan_is_reproducible_with_generator():
    a = sample_plan("pet", 4, 14, 147, generator=torch.Generator().manual_seed(3))
    b = sample_plan("pet", 4, 14, 147, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.rank, b.rank) and torch.equal(a.predicted, b.predicted)


def test_block_mask_counts_and_blockiness():
    g = torch.Generator().manual_seed(0)
    mask = sample_block_mask(64, 14, 75, min_block=16, min_aspect=0.3, generator=g)
    assert mask.shape == (64, 196)
    assert torch.all(mask.sum(1) == 75)
    # block-wise: masked patches have mostly masked 4-neighbours (random masking ~0.38)
    grid = mask.view(64, 14, 14).float()
    right = (grid[:, :, 1:] * grid[:, :, :-1]).sum() / grid[:, :, :-1].sum()
    assert right > 0.6


def test_mim_plan_is_masked_indices():
    plan = sample_plan("mim", 5, 14, 75, generator=torch.Generator().manual_seed(1))
    assert plan.rank is None and plan.predicted.shape == (5, 75)
    assert torch.all(plan.predicted[:, 1:] > plan.predicted[:, :-1])
