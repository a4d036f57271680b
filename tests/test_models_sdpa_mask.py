"""model.attention=sdpa: one additive mask per step, padded to a multiple of 8 keys, shared by all layers."""

from __future__ import annotations

import pytest
import torch

from mapet_ds.config import ModelConfig, ObjectiveConfig
from mapet_ds.models import pretrain as P
from mapet_ds.models import two_stream as T
from mapet_ds.models.objectives import attention_mask


def test_additive_mask_layout():
    allowed = torch.rand(2, 1, 5, 13) > 0.5
    bias = T.additive_mask(allowed, torch.bfloat16)
    assert bias.shape == (2, 1, 5, 13) and bias.dtype == torch.bfloat16
    assert bias.stride(-2) == 16 and bias.stride(-1) == 1  # key stride padded to a multiple of 8
    assert torch.equal(bias == 0, allowed) and torch.isinf(bias[~allowed]).all()


@pytest.mark.parametrize("kind", ["mapet", "pet"])
def test_shared_additive_mask_equals_bool_mask(kind, monkeypatch):
    """Outputs and gradients (fp64) equal those of the bool mask sdpa converted in every layer."""
    cfg = ModelConfig(size=None, embed_dim=32, depth=3, num_heads=2, img_size=32, patch_size=8, drop_path=0.0)
    torch.manual_seed(0)
    model = P.PretrainModel(cfg, ObjectiveConfig(name=kind), 50).double().train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 50, (3, 16), generator=g)
    plan = model.sample_plan(3, "cpu", g)

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(images, tokens, plan)
        out["loss"].backward()
        return out["logits"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setattr(T.F, "scaled_dot_product_attention", spy)
    logits, grads = run()
    assert len(seen) == 3 and all(m is seen[0] for m in seen)  # one tensor for every layer
    assert seen[0].dtype == torch.float64 and seen[0].stride(-2) % 8 == 0
    # today's path: the bool mask, converted by sdpa in each layer
    monkeypatch.setattr(P.PretrainModel, "two_stream_mask", lambda self, plan, dtype=None: attention_mask(plan))
    ref_logits, ref_grads = run()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-12, atol=1e-12, msg=name)
