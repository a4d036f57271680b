"""Fused AdamW (the CUDA default) inside the DeepSpeed ZeRO-2 engine: same updates as the per-tensor loop.

torch also has the fused kernel on the CPU, so the engine path is checked here.
"""

from __future__ import annotations

import torch
from conftest import REPO

from mapet_ds.config import load_config
from mapet_ds.engine.optim import build_optimizer
from mapet_ds.models.pretrain import PretrainModel

OVER = ["model.size=null", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.img_size=32",
        "model.patch_size=8", "tokenizer.vocab_size=64", "pretrain.global_batch_size=4"]


def test_default_is_fused_exactly_when_cuda():
    cfg = load_config(None, OVER)
    opt = build_optimizer(PretrainModel(cfg.model, cfg.objective, 64), cfg.optim)
    assert opt.defaults["fused"] is torch.cuda.is_available() and opt.defaults["foreach"] is False


def test_fused_adamw_in_the_zero2_engine_matches_unfused():
    import deepspeed

    from mapet_ds.engine.dist import init_distributed
    from mapet_ds.engine.ds_config import load_ds_json, resolve_ds_config

    dist = init_distributed()
    cfg = load_config(None, OVER)
    losses, weights = {}, {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = PretrainModel(cfg.model, cfg.objective, 64)
        ds = resolve_ds_config(load_ds_json(REPO / "ds_configs/zero2.json"), cfg.pretrain, cfg.optim, 1,
                               dist.device, src="zero2.json")
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim, fused=fused),
                                          config=ds)
        assert engine.optimizer.optimizer.defaults["fused"] is fused
        g = torch.Generator().manual_seed(0)
        images, tokens = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 64, (4, 16), generator=g)
        losses[fused] = []
        for i in range(3):
            plan = engine.module.sample_plan(4, "cpu", torch.Generator().manual_seed(i))
            out = engine(images, tokens, plan)
            engine.backward(out["loss"])
            engine.step()
            losses[fused].append(out["loss"].item())
        weights[fused] = engine.module.lm_head.weight.detach().clone()
    assert losses[True] == losses[False]
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-6, atol=1e-7)
