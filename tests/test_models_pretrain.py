"""Pre-training model: no leakage, timm compatibility, activation checkpointing."""

import pytest
import timm
import torch

from mapet_ds.config import ModelConfig, ObjectiveConfig
from mapet_ds.models.objectives import plan_from_rank, sample_plan
from mapet_ds.models.pretrain import PretrainModel
from mapet_ds.models.vit import build_backbone, timm_kwargs


def _perturb_patch(images, patch, grid, p=16, seed=0):
    out = images.clone()
    r, c = divmod(patch, grid)
    g = torch.Generator().manual_seed(seed)
    out[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = torch.randn(out.shape[0], 3, p, p, generator=g) * 3
    return out


@pytest.mark.parametrize("kind", ["mapet", "pet"])
def test_no_leakage_permuted(kind, tiny_model_cfg):
    torch.manual_seed(0)
    n, m = tiny_model_cfg.num_patches, 10
    model = PretrainModel(tiny_model_cfg, ObjectiveConfig(name=kind, predicted_ratio=m / n), 64).eval()
    rank = (torch.randperm(n) + 1).unsqueeze(0)
    plan = plan_from_rank(kind, rank, m)
    images = torch.randn(1, 3, 64, 64)
    tokens = torch.randint(0, 64, (1, n))
    with torch.no_grad():
        base = model(images, tokens, plan)["logits"][0]  # [m, V]
        predicted = plan.predicted[0].tolist()
        checked_changed = checked_same = 0
        for q in range(n):  # perturb every patch in turn
            logits = model(_perturb_patch(images, q, 4, seed=q), tokens, plan)["logits"][0]
            for row, p in enumerate(predicted):
                diff = (logits[row] - base[row]).abs().max().item()
                if rank[0, q] >= rank[0, p]:
                    assert diff == 0.0, f"{kind}: logits of patch {p} leak from patch {q} (rank not earlier)"
                    checked_same += 1
                else:
                    assert diff > 1e-5, f"{kind}: logits of patch {p} ignore earlier patch {q}"
                    checked_changed += 1
        assert checked_same >= m and checked_changed >= m


def test_no_leakage_mim(tiny_model_cfg):
    torch.manual_seed(0)
    model = PretrainModel(tiny_model_cfg, ObjectiveConfig(name="mim", mask_patches=6, min_block_patches=2), 64).eval()
    plan = sample_plan("mim", 1, 4, 6, min_block=2, generator=torch.Generator().manual_seed(0))
    images = torch.randn(1, 3, 64, 64)
    tokens = torch.randint(0, 64, (1, 16))
    masked = set(plan.predicted[0].tolist())
    with torch.no_grad():
        base = model(images, tokens, plan)["logits"]
        changed = images
        for q in masked:
            changed = _perturb_patch(changed, q, 4, seed=q)
        assert torch.equal(model(changed, tokens, plan)["logits"], base)
        visible = next(q for q in range(16) if q not in masked)
        assert (model(_perturb_patch(images, visible, 4), tokens, plan)["logits"] - base).abs().max() > 1e-5


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_backbone_loads_into_timm_strict(size):
    cfg = ModelConfig(size=size)
    torch.manual_seed(0)
    ours = build_backbone(cfg).eval()
    ref = timm.create_model(f"vit_{size}_patch16_224", pretrained=False, num_classes=0, init_values=0.1).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours.forward_features(x), ref.forward_features(x))


def test_pretrain_backbone_state_is_timm_state(tiny_model_cfg):
    model = PretrainModel(tiny_model_cfg, ObjectiveConfig(), 32)
    sd = {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **timm_kwargs(tiny_model_cfg))
    ref.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("kind", ["mapet", "pet", "mim"])
def test_grad_checkpointing_same_loss_and_grads(kind, tiny_model_cfg):
    cfg = tiny_model_cfg.model_copy(update={"drop_path": 0.2})
    obj = ObjectiveConfig(name=kind, mask_patches=6, min_block_patches=2)
    torch.manual_seed(0)
    plain = PretrainModel(cfg, obj, 32).train()
    ckpt = PretrainModel(cfg.model_copy(update={"grad_checkpointing": True}), obj, 32).train()
    ckpt.load_state_dict(plain.state_dict())
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(0, 32, (2, 16))
    plan = plain.sample_plan(2, "cpu", torch.Generator().manual_seed(1))
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(42)  # same drop-path draws
        out = model(images, tokens, plan)
        out["loss"].backward()
        results.append((out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_plan_kind_must_match_model(tiny_model_cfg):
    model = PretrainModel(tiny_model_cfg, ObjectiveConfig(name="mapet"), 32)
    plan = sample_plan("pet", 1, 4, 12)
    with pytest.raises(ValueError, match="plan is for 'pet'"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 16, dtype=torch.long), plan)
