"""Every DALI graph builder decodes with jpeg_fancy_upsampling in mixed (GPU) mode, so GPU
decode equals CPU decode (libjpeg-turbo, PIL). Built here without a GPU: the mixed
decoders are recorded, then swapped for their CPU forms so the graphs still build."""

from __future__ import annotations

import pytest
from conftest import load_data_tool

from mapet_ds.filelist import read_filelist

pytest.importorskip("nvidia.dali")


def test_every_mixed_decoder_uses_fancy_upsampling(tmp_path, monkeypatch):
    from nvidia.dali import fn, types

    from mapet_ds.pipelines import common as C
    from mapet_ds.pipelines import graphs as G
    from mapet_ds.pipelines.randaugment import parse_rand_augment

    from mapet_ds.pipelines import segmentation as S

    load_data_tool("make_demo").make_demo(tmp_path, num_train_per_class=1, num_val_per_class=1, size=40, seed=1,
                                          segmentation=True)
    fl = read_filelist(tmp_path / "train.txt", tmp_path)
    sl = S.read_seglist(tmp_path / "seg_train.txt", tmp_path)
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
        "segmentation train": lambda: S.build_seg_train(
            sl, crop=32, img_scale=(64, 32), ratio_range=(0.5, 2.0), hflip=0.5, photometric=True,
            reduce_zero_label=True, ignore_index=255, seed=0, checkpoint=None, **norm, **common),
        "segmentation eval": lambda: S.build_seg_eval(
            sl, img_scale=(64, 32), reduce_zero_label=True, **norm,
            **{k: v for k, v in common.items() if k != "batch_size"}),
    }
    for what, build in builders.items():
        calls.clear()
        try:
            build()
        except RuntimeError as e:
            # the segmentation graphs also move the mask to the GPU (``.gpu()``), which only a
            # GPU pipeline can build; the decoders were already called when the graph was defined
            assert what.startswith("segmentation") and "CUDA" in str(e), (what, e)
        assert calls, what
        for name, kw in calls:
            if what.startswith("segmentation") and kw.get("output_type") == types.GRAY:
                assert kw["device"] == "cpu"  # the PNG mask: decoded on the host, labels untouched
                continue
            assert kw["device"] == "mixed" and kw.get("jpeg_fancy_upsampling") is True, (what, name, kw)
    # the CPU decoder is called as before
    assert C.decoder_kwargs("cpu") == {"device": "cpu", "output_type": C.decoder_kwargs("mixed")["output_type"]}
