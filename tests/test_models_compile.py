"""model.compile=true: the compiled tiny model gives eager's loss and gradients.

Slow-ish on purpose: inductor generates and builds C++ for the block graph on the CPU
(~40-60 s on a busy 2-core box, one compile for all blocks); one configuration covers
the compiled block, activation checkpointing inside it and the two-stream mask.
"""

from __future__ import annotations

import torch

from mapet_ds.config import ModelConfig, ObjectiveConfig
from mapet_ds.models.pretrain import PretrainModel


def _model(compile_: bool) -> PretrainModel:
    cfg = ModelConfig(size=None, embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, drop_path=0.0,
                      grad_checkpointing=True, compile=compile_)
    return PretrainModel(cfg, ObjectiveConfig(name="mapet"), 50).train()


def test_compiled_model_equals_eager():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = _model(False)
    compiled = _model(True)
    compiled.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(0, 50, (3, 16), generator=g)
    graphs0 = counters["stats"]["unique_graphs"]
    for _ in range(2):  # a second step with a new plan reuses the graph
        plan = eager.sample_plan(3, "cpu", g)
        losses = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss = model(images, tokens, plan)["loss"]
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=name)
    # one graph for both blocks and both steps (regional compilation, no recompiles)
    assert counters["stats"]["unique_graphs"] - graphs0 == 1
    assert "_apply_block" not in dict(compiled.named_modules())  # state dict keys unchanged
    assert compiled.state_dict().keys() == eager.state_dict().keys()
