"""DeepSpeed JSON cross-checks against our config."""


import pytest
import torch

from mapet_ds.config import ConfigError, load_config
from mapet_ds.engine.ds_config import load_ds_json, resolve_ds_config

CPU = torch.device("cpu")


def _resolve(ds, overrides=(), world=2):
    cfg = load_config(None, ["pretrain.global_batch_size=64", *overrides])
    return resolve_ds_config(ds, cfg.pretrain, cfg.optim, world, CPU, src="zero2.json")


def test_auto_values_are_filled():
    ds = _resolve({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                   "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                   "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}},
                  ["pretrain.micro_batch_size=8"])
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 4)
    assert ds["gradient_clipping"] == 3.0 and ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


@pytest.mark.parametrize("ds, overrides, message", [
    ({"train_batch_size": 128}, [], "zero2.json: train_batch_size=128 but pretrain.global_batch_size=64"),
    ({"train_micro_batch_size_per_gpu": 4}, ["pretrain.micro_batch_size=8"],
     "train_micro_batch_size_per_gpu=4 but pretrain.micro_batch_size=8"),
    ({}, ["pretrain.micro_batch_size=6"], "micro batch 6 x grad accumulation 5 x world size 2 = 60 != pretrain.global_batch_size=64"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, [], "fp16.enabled and bf16.enabled are both true"),
    ({"bf16": {"enabled": True}}, [], "bf16.enabled=true but pretrain.precision resolves to 'fp32' on this cpu machine"),
    ({"gradient_clipping": 1.0}, [], "gradient_clipping=1.0 but optim.clip_grad=3.0"),
    ({"optimizer": {"type": "Adam"}}, [], "remove the \"optimizer\" section"),
    ({}, ["pretrain.precision=fp16"], "precision='fp16' is not supported on CPU"),
])
def test_contradictions_name_both_sources(ds, overrides, message):
    with pytest.raises(ConfigError) as exc:
        _resolve(ds, overrides)
    assert message in str(exc.value)


def test_shipped_ds_configs_resolve(tmp_path):
    from conftest import REPO

    for name in ("zero2.json", "zero0.json", "zero2_offload.json"):
        ds = load_ds_json(REPO / "ds_configs" / name)
        out = _resolve(ds, ["pretrain.micro_batch_size=16"])
        assert out["train_batch_size"] == 64
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n}')
    with pytest.raises(ConfigError, match="bad.json:2: not valid JSON"):
        load_ds_json(bad)
