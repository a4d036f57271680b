"""model.compile=true: the compiled tiny model gives eager's loss and gradients.

Slow-ish on purpose: inductor generates and builds C++ for the block graph on the CPU
(~40-60 s on a busy 2-core box, one compile for all blocks); one configuration covers
the compiled block, activation checkpointing inside it, the two-stream mask and drop
path at timm's per-block rates (depth 12: more distinct rates than dynamo's recompile
limit of 8, which a per-block specialisation would hit).
"""

from __future__ import annotations

import logging

import torch

from mapet_ds.config import ModelConfig, ObjectiveConfig
from mapet_ds.models.pretrain import PretrainModel


def _model(compile_: bool, objective: str = "mapet", depth: int = 12, drop_path: float = 0.1) -> PretrainModel:
    cfg = ModelConfig(size=None, embed_dim=32, depth=depth, num_heads=2, img_size=32, patch_size=8,
                      drop_path=drop_path, grad_checkpointing=True, compile=compile_)
    return PretrainModel(cfg, ObjectiveConfig(name=objective), 50).train()


def test_compiled_model_equals_eager(caplog):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = _model(False)
    compiled = _model(True)
    compiled.load_state_dict(eager.state_dict())
    rates = {round(b.drop_path1.drop_prob, 6) for b in compiled.backbone.blocks[1:]}
    assert len(rates) == 11  # timm's linear rule: a different rate per block
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(0, 50, (3, 16), generator=g)
    graphs0 = counters["stats"]["unique_graphs"]
    caplog.set_level(logging.WARNING)
    for step in range(2):  # a second step with a new plan reuses the graph
        plan = eager.sample_plan(3, "cpu", g)
        losses = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(100 + step)  # the same drop-path draws for both
            loss = model(images, tokens, plan)["loss"]
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=name)
    # one graph for all 12 blocks and both steps (regional compilation, no recompiles)
    assert counters["stats"]["unique_graphs"] - graphs0 == 1
    assert "recompile" not in caplog.text
    assert "_apply_block" not in dict(compiled.named_modules())  # state dict keys unchanged
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_block_loop_equals_timm_block_forward():
    """The block loop (drop-path draws outside the blocks) is timm's Block.forward, draws included."""
    model = _model(False, objective="mim", depth=4, drop_path=0.5)
    z = torch.randn(5, 17, 32, dtype=torch.float64)
    model.double()
    torch.manual_seed(3)
    ours = model._run_blocks(z, None, None)
    torch.manual_seed(3)
    ref = z
    for blk in model.backbone.blocks:
        ref = blk(ref)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model._run_blocks(z, None, None), model.backbone.blocks(z), rtol=0, atol=0)
