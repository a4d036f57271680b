"""model.attention=flex (FlexAttention + BlockMask) equals sdpa with the dense mask, in fp64.

torch 2.14 runs FlexAttention forward on the CPU but refuses its backward there
(``_validate_device``); the gradient test lifts that guard so the gradients of torch's
own FlexAttention (its reference implementation, the one eager CUDA runs too) with our
BlockMask are compared against sdpa. CPU training without the guard lifted goes through
the same mask_mod materialised densely (tested separately).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as FA

import mapet_ds.models.pretrain as P
from mapet_ds.config import ModelConfig, ObjectiveConfig
from mapet_ds.models.objectives import attention_mask, plan_from_rank
from mapet_ds.models.pretrain import PretrainModel
from mapet_ds.models.two_stream import build_block_mask, plan_mask_mod

N = 16  # 4x4 patches
VOCAB = 50
TOL = dict(rtol=1e-9, atol=1e-11)


def _cfg(attention: str, **kw) -> ModelConfig:
    return ModelConfig(size=None, embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, drop_path=0.0,
                       attention=attention, **kw)


def _pair(kind: str, **kw) -> tuple[PretrainModel, PretrainModel]:
    torch.manual_seed(0)
    ref = PretrainModel(_cfg("sdpa", **kw), ObjectiveConfig(name=kind), VOCAB).double()
    flex = PretrainModel(_cfg("flex", **kw), ObjectiveConfig(name=kind), VOCAB).double()
    flex.load_state_dict(ref.state_dict())
    return ref, flex


def _batch(kind: str, m: int, b: int = 3):
    g = torch.Generator().manual_seed(m)
    rank = torch.stack([torch.randperm(N, generator=g) + 1 for _ in range(b)])
    images = torch.randn(b, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (b, N), generator=g)
    return images, tokens, plan_from_rank(kind, rank, m)


KINDS_M = [(k, m) for k in ("mapet", "pet") for m in (1, 7, N)]


@pytest.mark.parametrize("kind,m", KINDS_M)
def test_mask_mod_is_the_dense_mask(kind, m):
    _, _, plan = _batch(kind, m)
    mask_mod, rows, keys = plan_mask_mod(plan)
    dense = FA.create_mask(mask_mod, 3, 1, rows, keys, device="cpu")
    expect = attention_mask(plan)
    assert dense.shape == expect.shape == (3, 1, 1 + N + (2 * m if kind == "mapet" else m),
                                           1 + N + (m if kind == "mapet" else 0))
    assert torch.equal(dense, expect)
    bm = build_block_mask(plan)
    assert isinstance(bm, FA.BlockMask) and bm.shape == expect.shape  # tiny L, K < one 128 block


@pytest.mark.parametrize("kind,m", KINDS_M)
def test_flex_forward_equals_sdpa(kind, m):
    ref, flex = _pair(kind)
    images, tokens, plan = _batch(kind, m)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()" on CPU
        a = ref(images, tokens, plan)
        b = flex(images, tokens, plan)
        assert isinstance(flex.two_stream_mask(plan), FA.BlockMask)
    torch.testing.assert_close(b["logits"], a["logits"], **TOL)
    torch.testing.assert_close(b["loss"], a["loss"], **TOL)


def _grads(model, images, tokens, plan):
    model.zero_grad(set_to_none=True)
    out = model(images, tokens, plan)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,m", KINDS_M)
def test_flex_gradients_equal_sdpa(kind, m, monkeypatch):
    # lift torch's CPU backward guard and route training through FlexAttention (see module doc)
    monkeypatch.setattr(FA, "_validate_device", lambda *a: None)
    monkeypatch.setattr(P, "flex_trains_on", lambda device: True)
    ref, flex = _pair(kind)
    images, tokens, plan = _batch(kind, m)
    assert isinstance(flex.two_stream_mask(plan), FA.BlockMask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la, ga = _grads(ref, images, tokens, plan)
        lb, gb = _grads(flex, images, tokens, plan)
    torch.testing.assert_close(lb, la, **TOL)
    assert ga.keys() == gb.keys() and "mask_token" in ga and "backbone.blocks.1.attn.qkv.weight" in ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], **TOL, msg=name)


@pytest.mark.parametrize("kind", ["mapet", "pet"])
def test_flex_trains_on_cpu_through_the_dense_mask_mod(kind):
    ref, flex = _pair(kind, grad_checkpointing=True)
    images, tokens, plan = _batch(kind, 7)
    la, ga = _grads(ref.train(), images, tokens, plan)
    with pytest.warns(UserWarning, match="no FlexAttention backward on the CPU"):
        lb, gb = _grads(flex.train(), images, tokens, plan)
    torch.testing.assert_close(lb, la, **TOL)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], **TOL, msg=name)


def test_config_attention_field():
    from mapet_ds.config import ConfigError, load_config

    assert load_config(None, []).model.attention == "sdpa"
    assert load_config(None, ["model.attention=flex"]).model.attention == "flex"
    with pytest.raises(ConfigError, match=r"model.attention='xformers': must be one of 'sdpa' or 'flex'"):
        load_config(None, ["model.attention=xformers"])
