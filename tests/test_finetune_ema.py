"""Fine-tuning EMA: fp32 EMA of a bf16 model (the bf16 engine) updates in fp32, whatever timm's version."""

from __future__ import annotations

import pytest
import torch
from timm.utils import ModelEmaV3

from mapet_ds.engine.finetune import update_ema


def _timm_1_0_9_update(self, model, decay):
    """timm <= 1.0.30: one _foreach_lerp_ over EMA and model values, which needs one dtype."""
    ema_v = [v for v in self.module.state_dict().values() if v.is_floating_point()]
    model_v = [v for v in model.state_dict().values() if v.is_floating_point()]
    torch._foreach_lerp_(ema_v, model_v, weight=1.0 - decay)


def test_fp32_ema_of_a_bf16_model(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).bfloat16()
    ema = ModelEmaV3(model, decay=0.9)
    ema.module.float()
    monkeypatch.setattr(ModelEmaV3, "apply_update_", _timm_1_0_9_update)
    with pytest.raises(RuntimeError):  # what the floor's timm does with mixed dtypes
        ema.update(model, step=100)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.get_submodule("1").num_batches_tracked.fill_(7)
    update_ema(ema, model, step=100)
    decay = ema.get_decay(100)
    for name, value in ema.module.state_dict().items():
        m = model.state_dict()[name]
        if value.is_floating_point():
            assert value.dtype == torch.float32, name
            torch.testing.assert_close(value, decay * start[name] + (1 - decay) * m.float(), rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, m), name
    # same dtypes: timm's own update
    same = ModelEmaV3(model, decay=0.9)
    update_ema(same, model, step=100)
    assert all(v.dtype == torch.bfloat16 for v in same.module.state_dict().values() if v.is_floating_point())
