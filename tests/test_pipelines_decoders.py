"""Every DALI graph builder decodes with jpeg_fancy_upsampling in mixed (GPU) mode, so GPU
decode equals CPU decode (libjpeg-turbo, PIL). Built here without a GPU: the mixed
decoders are recorded, then swapped for their CPU forms so the graphs still build."""

from __future__ import annotations

import pytest
from conftest import load_data_tool

from mapet_ds.filelist import read_filelist

pytest.importorskip("nvidia.dali")


def test_every_mixed_decoder_uses_fancy_upsampling(tmp_path, monkeypatch):
    from nvidia.dali import fn

    from mapet_ds.pipelines import common as C
    from mapet_ds.pipelines import graphs as G
    from mapet_ds.pipelines.randaugment import parse_rand_augment

    load_data_tool("make_demo").make_demo(tmp_path, num_train_per_class=1, num_val_per_class=1, size=40, seed=1)
    fl = read_filelist(tmp_path / "train.txt", tmp_path)
    calls = []

    def recorder(name, original):
        def decode(*args, **kw):
            calls.append((name, dict(kw)))
            kw.pop("jpeg_fancy_upsampling", None)
            return original(*args, **{**kw, "device": "cpu"})
        return decode

    for name in ("image", "image_slice", "image_random_crop", "image_crop"):
        monkeypatch.setattr(fn.decoders, name, recorder(name, getattr(fn.decoders, name)))
    monkeypatch.setattr(C, "pipeline_device_kwargs", lambda mode: {"device_id": None})
    common = dict(batch_size=2, shard_id=0, num_shards=1, num_threads=1, mode="mixed")
    norm = dict(mean=C.IMAGENET_DEFAULT_MEAN, std=C.IMAGENET_DEFAULT_STD)
    builders = {
        "tokenizer view": lambda: G.build_tokenizer_view(fl, size=32, **common),
        "pretrain": lambda: G.build_pretrain(fl, img_size=32, seed=0, color_jitter=0.4, tokenizer_view_size=16,
                                             random_resized_crop=False, checkpoint=None, **norm, **common),
        "pretrain rrc": lambda: G.build_pretrain(fl, img_size=32, seed=0, color_jitter=0.0, tokenizer_view_size=16,
                                                 random_resized_crop=True, checkpoint=None, **norm, **common),
        "finetune": lambda: G.build_finetune_train(fl, img_size=32, seed=0, scale=(0.08, 1.0), ratio=(0.75, 1.33),
                                                   hflip=0.5, rand_augment=parse_rand_augment("rand-m9-mstd0.5"),
                                                   checkpoint=None, **norm, **common),
        "eval": lambda: G.build_eval(fl, img_size=32, scale_size=36, interpolation="bicubic", **norm, **common),
    }
    for what, build in builders.items():
        calls.clear()
        build()
        assert calls, what
        for name, kw in calls:
            assert kw["device"] == "mixed" and kw.get("jpeg_fancy_upsampling") is True, (what, name, kw)
    # the CPU decoder is called as before
    assert C.decoder_kwargs("cpu") == {"device": "cpu", "output_type": C.decoder_kwargs("mixed")["output_type"]}
