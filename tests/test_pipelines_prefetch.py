"""data.prefetch_queue_depth: a deeper DALI queue changes neither the batches nor the exact resume."""

from __future__ import annotations

import pytest
import torch
from conftest import load_data_tool

from mapet_ds.config import load_config
from mapet_ds.pipelines import pretrain_loader

pytest.importorskip("nvidia.dali")


def test_prefetch_depth_keeps_batches_and_resume(tmp_path):
    load_data_tool("make_demo").make_demo(tmp_path, num_train_per_class=2, num_val_per_class=1, size=40, seed=1)
    kw = dict(img_size=16, batch_size=4, shard_id=0, num_shards=1, seed=3, device="cpu")
    ref = pretrain_loader(tmp_path / "train.txt", **kw)
    deep = pretrain_loader(tmp_path / "train.txt", prefetch_queue_depth=4, **kw)
    assert deep._pipe.prefetch_queue_depth == 4 and ref._pipe.prefetch_queue_depth == 2
    for _ in range(3):
        a, b = next(ref), next(deep)
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["sample_ids"], b["sample_ids"])
    state = deep.state()  # taken with 4 batches queued ahead: they must not be lost
    expected = [next(ref) for _ in range(4)]
    resumed = pretrain_loader(tmp_path / "train.txt", prefetch_queue_depth=4, checkpoint=state, **kw)
    for e in expected:
        assert torch.equal(next(resumed)["images"], e["images"])
    assert load_config(None, []).data.prefetch_queue_depth == 2
    assert load_config(None, ["data.prefetch_queue_depth=4"]).data.prefetch_queue_depth == 4
