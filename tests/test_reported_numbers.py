"""Closed-form checks of what the project reports: lr / weight-decay schedules per parameter
group, analytic FLOPs against torch's FlopCounterMode, top-1/top-5 on hand-built logits.

Every expected value is a formula written out here, not a call into the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mapet_ds.config import ModelConfig, ObjectiveConfig, OptimConfig
from mapet_ds.engine.finetune import evaluate
from mapet_ds.engine.optim import Schedule, build_optimizer
from mapet_ds.models.classifier import build_classifier
from mapet_ds.models.flops import classifier_forward_flops, pretrain_forward_flops
from mapet_ds.models.pretrain import PretrainModel

CFG = ModelConfig(size=None, embed_dim=24, depth=3, num_heads=3, img_size=32, patch_size=8, drop_path=0.0)


# ---------------------------------------------------------------------------------------
# lr and weight decay


def _layer_id(name: str, depth: int) -> int:
    """BEiT/timm layer decay ids: stem 0, blocks.i -> i + 1, everything after the blocks depth + 1."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _lr_formula(step: int, total: int, warmup: int, base: float, start: float, floor: float) -> float:
    """Linear warmup from ``start`` over ``warmup`` steps, then cosine from ``base`` to ``floor``
    over the remaining ``total - warmup`` steps (0-based optimizer steps)."""
    if step < warmup:
        return start + (base - start) * step / warmup
    t = (step - warmup) / (total - warmup)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t))


def _wd_formula(step: int, total: int, start: float, end: float) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / total))


TOTAL, WARMUP = 110, 10
# step 0, end of warmup, middle of the cosine, last optimizer step
STEPS = (0, WARMUP, WARMUP + (TOTAL - WARMUP) // 2, TOTAL - 1)


def test_schedule_formulas_at_the_landmarks():
    # what the formulas give at the landmarks, in plain numbers (guards the formulas themselves)
    base, start, floor = 1e-3, 1e-6, 1e-5
    assert _lr_formula(0, TOTAL, WARMUP, base, start, floor) == start
    assert _lr_formula(WARMUP, TOTAL, WARMUP, base, start, floor) == base
    assert _lr_formula(60, TOTAL, WARMUP, base, start, floor) == pytest.approx((base + floor) / 2, rel=1e-12)
    assert _lr_formula(TOTAL, TOTAL, WARMUP, base, start, floor) == pytest.approx(floor, rel=1e-12)
    assert _wd_formula(TOTAL // 2, TOTAL, 0.05, 0.2) == pytest.approx(0.125, rel=1e-12)


@pytest.mark.parametrize("layer_decay", [0.65, None])
def test_finetune_lr_and_weight_decay_per_group(layer_decay):
    optim = OptimConfig(lr=5e-4, warmup_lr=1e-6, min_lr=1e-6, warmup_steps=WARMUP, weight_decay=0.05,
                        weight_decay_end=0.2, layer_decay=layer_decay)
    model = build_classifier(CFG, 7)
    opt = build_optimizer(model, optim, layer_decay, fused=False)
    names = {id(p): n for n, p in model.named_parameters()}
    sched = Schedule(opt, optim, TOTAL, steps_per_epoch=11)
    no_decay = {"pos_embed", "cls_token"}
    checked = 0
    for step in STEPS:
        lr_top, wd = sched.apply(step, opt.param_groups)
        base_lr = _lr_formula(step, TOTAL, WARMUP, optim.lr, optim.warmup_lr, optim.min_lr)
        assert lr_top == pytest.approx(base_lr, rel=1e-12, abs=0)
        assert wd == pytest.approx(_wd_formula(step, TOTAL, 0.05, 0.2), rel=1e-12)
        for g in opt.param_groups:
            for p in g["params"]:
                name = names[id(p)]
                scale = (layer_decay or 1.0) ** (CFG.depth + 1 - _layer_id(name, CFG.depth))
                assert g["lr"] == pytest.approx(base_lr * scale, rel=1e-12, abs=0), (step, name)
                decays = p.ndim > 1 and name not in no_decay
                assert g["weight_decay"] == (pytest.approx(wd, rel=1e-12) if decays else 0.0), (step, name)
                checked += 1
    assert checked == 4 * len(list(model.parameters()))
    if layer_decay:  # the stem learns at 0.65 ** 4 of the head's rate
        lrs = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
        assert lrs["patch_embed.proj.weight"] / lrs["head.weight"] == pytest.approx(0.65 ** 4, rel=1e-12)


def test_pretrain_lr_constant_weight_decay_and_groups():
    optim = OptimConfig(lr=1.5e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=WARMUP, weight_decay=0.05)
    model = PretrainModel(CFG, ObjectiveConfig(), 16)
    opt = build_optimizer(model, optim, None, fused=False)
    names = {id(p): n for n, p in model.named_parameters()}
    sched = Schedule(opt, optim, TOTAL, steps_per_epoch=11)
    for step in STEPS:
        lr, wd = sched.apply(step, opt.param_groups)
        assert lr == pytest.approx(_lr_formula(step, TOTAL, WARMUP, 1.5e-3, 1e-6, 1e-5), rel=1e-12, abs=0)
        assert wd == 0.05  # no weight_decay_end: constant
        for g in opt.param_groups:
            assert g["lr"] == lr
            for p in g["params"]:
                name = names[id(p)]
                if name == "mask_token":
                    continue  # decayed or not is a recipe choice (METHOD.md 5), not a formula
                decays = p.ndim > 1 and name not in ("backbone.pos_embed", "backbone.cls_token")
                assert g["weight_decay"] == (0.05 if decays else 0.0), name
    # warmup given in epochs: 2 epochs x 11 steps
    sched = Schedule(opt, optim.model_copy(update={"warmup_steps": None, "warmup_epochs": 2}), TOTAL, 11)
    assert sched.warmup_steps == 22


# ---------------------------------------------------------------------------------------
# FLOPs


def _counted(fn) -> tuple[int, int]:
    """(matmul + conv FLOPs, attention FLOPs) of ``fn`` as torch's FlopCounterMode counts them.

    FlopCounterMode has no formula for torch's fused CPU attention kernel (it would count 0),
    so attention runs on sdpa's MATH backend, which computes QK^T and AV as two ``bmm``.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert set(counts) <= {"aten.addmm", "aten.mm", "aten.convolution", "aten.bmm"}, counts
    return fc.get_total_flops() - counts.get("aten.bmm", 0), counts.get("aten.bmm", 0)


# Both count 2 x multiply-adds of every matmul, of the patch-embedding conv and of QK^T / AV
# over the full rows x keys (masked entries included: the kernels compute them), and neither
# counts norms, softmax, GELU, bias or position adds; models/flops.py is per image and
# forward only, so the comparison is one image with grad disabled. The tolerance is 0: any
# difference is a term that models/flops.py (MFU, the equal-compute budget) gets wrong.
@pytest.mark.parametrize("kind", ["mapet", "pet", "mim"])
def test_pretrain_flops_match_flop_counter(kind):
    m = 6 if kind == "mim" else 12
    model = PretrainModel(CFG, ObjectiveConfig(name=kind, predicted_ratio=0.75, mask_patches=6,
                                               min_block_patches=2), 40).eval()
    plan = model.sample_plan(1, "cpu", torch.Generator().manual_seed(0))
    assert plan.num_predicted == m
    images, tokens = torch.randn(1, 3, 32, 32), torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        linear, attention = _counted(lambda: model(images, tokens, plan))
    analytic = pretrain_forward_flops(CFG, kind, m, 40)
    assert (analytic.linear, analytic.attention) == (linear, attention), kind


def test_classifier_flops_match_flop_counter():
    model = build_classifier(CFG, 7).eval()
    with torch.no_grad():
        linear, attention = _counted(lambda: model(torch.randn(1, 3, 32, 32)))
    analytic = classifier_forward_flops(CFG, 7)
    assert (analytic.linear, analytic.attention) == (linear, attention)


# ---------------------------------------------------------------------------------------
# top-1 / top-5


class _FixedLogits(torch.nn.Module):
    """Returns the next hand-built logits tensor whatever the images."""

    def __init__(self, batches):
        super().__init__()
        self.batches = iter(batches)

    def forward(self, images):
        return next(self.batches)


def test_top1_top5_on_hand_built_logits():
    c = 8
    # each row: the label's rank among the logits (0 = the argmax), built by hand
    label_rank = [0, 0, 1, 4, 5, 7, 0, 2]
    labels = [3, 0, 7, 1, 6, 2, 5, 4]
    rows = []
    for y, r in zip(labels, label_rank):
        order = [k for k in range(c) if k != y]
        order.insert(r, y)  # class order from the highest logit down
        logits = torch.empty(c)
        logits[order] = torch.arange(c, 0, -1, dtype=torch.float32)
        rows.append(logits)
    logits = torch.stack(rows)
    # two batches of 5; the last two rows of the second batch are padding (valid=False): a
    # padded row that would count as a hit must not
    pad = torch.zeros(2, c)
    pad[:, 0] = 10.0
    batches = [logits[:5], torch.cat([logits[5:], pad])]
    loader = [{"images": torch.zeros(5, 3, 4, 4), "labels": torch.tensor(labels[:5]),
               "valid": torch.ones(5, dtype=torch.bool)},
              {"images": torch.zeros(5, 3, 4, 4), "labels": torch.tensor(labels[5:] + [0, 0]),
               "valid": torch.tensor([True, True, True, False, False])}]
    res = evaluate(_FixedLogits(batches), loader, torch.device("cpu"), num_classes=c, confusion=True)
    assert res["count"] == 8
    assert res["top1"] == pytest.approx(100.0 * 3 / 8)  # ranks 0, 0, 0
    assert res["top5"] == pytest.approx(100.0 * 6 / 8)  # ranks 0, 0, 1, 4, 0, 2
    ce = [math.log(sum(math.exp(v) for v in row.tolist())) - row[y].item() for row, y in zip(rows, labels)]
    assert res["loss"] == pytest.approx(sum(ce) / 8, rel=1e-6)
    assert int(res["confusion"].sum()) == 8 and int(res["confusion"].trace()) == 3
