"""The release's recipe by default (issue 22 section 1): each default, and the config value that
keeps the older behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mapet_ds.config import ConfigError, load_config


def _pretrain_model(overrides=()):
    from mapet_ds.models.pretrain import PretrainModel

    cfg = load_config(None, ["model.size=null", "model.embed_dim=48", "model.depth=1", "model.num_heads=3",
                             "model.img_size=32", *overrides])
    return PretrainModel(cfg.model, cfg.objective, 64), cfg


def _decay_of(groups, name):
    return next(g["weight_decay"] for g in groups if name in g["param_names"])


def test_mask_token_is_weight_decayed_as_the_release_unless_configured():
    from mapet_ds.engine.optim import build_param_groups

    model, cfg = _pretrain_model()
    groups = build_param_groups(model, cfg.optim)
    assert _decay_of(groups, "mask_token") == cfg.optim.weight_decay == 0.05
    assert _decay_of(groups, "backbone.pos_embed") == 0.0 and _decay_of(groups, "backbone.cls_token") == 0.0
    model, cfg = _pretrain_model(["optim.decay_mask_token=false"])
    groups = build_param_groups(model, cfg.optim)
    assert _decay_of(groups, "mask_token") == 0.0
    assert _decay_of(groups, "backbone.blocks.0.attn.qkv.weight") == 0.05


def test_classifier_head_init_std_is_the_release_s_and_configurable(tiny_model_cfg):
    from mapet_ds.models.classifier import build_classifier

    torch.manual_seed(0)
    cfg = load_config(None)
    assert cfg.finetune.head_init_std == 0.02
    big = build_classifier(tiny_model_cfg.model_copy(update={"embed_dim": 192}), 500,
                           head_init_std=cfg.finetune.head_init_std)
    assert big.head.weight.std().item() == pytest.approx(0.02, rel=0.05)  # timm truncates at +-2 absolute
    assert big.head.bias.abs().max() == 0
    mae = build_classifier(tiny_model_cfg.model_copy(update={"embed_dim": 192}), 500, head_init_std=2e-5)
    assert mae.head.weight.std().item() == pytest.approx(2e-5, rel=0.05)


def test_kmeans_seed_defaults_to_faiss_s_own():
    faiss = pytest.importorskip("faiss")
    from mapet_ds.tokenizers.codebook import fit_codebook

    x = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    km = faiss.Kmeans(8, 16, niter=5, nredo=1, max_points_per_centroid=512)  # faiss default seed (1234)
    km.train(x)
    ours = fit_codebook(x, 16, niter=5, nredo=1, use_gpu=False)
    np.testing.assert_array_equal(ours, km.centroids)
    assert not np.array_equal(fit_codebook(x, 16, niter=5, nredo=1, seed=0, use_gpu=False), km.centroids)


def test_tokens_fit_cli_defaults_kmeans_seed_1234():
    from conftest import REPO, run_py

    out = run_py([REPO / "launch/tokens.py", "fit", "--help"], cwd=REPO).stdout
    assert "--kmeans-seed" in out and "1234" in " ".join(out.split())


def test_random_resized_crop_refused_only_with_offline_tokens():
    base = ["data.random_resized_crop=true"]
    assert load_config(None, base + ["tokenizer.kind=kclip", "tokenizer.online=true"]).tokenizer.offline is False
    assert load_config(None, base + ["tokenizer.kind=vqkd"]).data.random_resized_crop
    for kind in ("kclip", "pixel_kmeans"):
        with pytest.raises(ConfigError, match=f"offline tokenizer.kind='{kind}'"):
            load_config(None, base + [f"tokenizer.kind={kind}"])


# -- centre square: timm's RandomResizedCrop(scale=(1, 1), ratio=(1, 1)) anchor --------------------

def _column_ramp(tmp_path, sizes):
    """PNGs whose pixel (y, x) is grey 5 * x (+ 3 * y): the first output column names the anchor."""
    from mapet_ds.filelist import write_filelist

    entries = []
    for i, (w, h) in enumerate(sizes):
        a = (5 * np.arange(w)[None, :] + 3 * np.arange(h)[:, None]).clip(0, 255).astype(np.uint8)
        Image.fromarray(np.repeat(a[..., None], 3, axis=2)).save(tmp_path / f"r{i}.png")
        entries.append((f"r{i}.png", 0))
    return write_filelist(tmp_path / "r.txt", entries)


# margins 3 and 7 (floor 1 / 3, half-to-even 2 / 4), one each way, and an even one
SIZES = [(23, 20), (20, 27), (24, 20)]


def _timm_anchor(w, h):
    from timm.data.transforms import RandomResizedCropAndInterpolation

    i, j, ch, cw = RandomResizedCropAndInterpolation.get_params(Image.new("RGB", (w, h)), (1.0, 1.0), (1.0, 1.0))
    assert ch == cw == min(w, h)
    return i, j


@pytest.mark.parametrize("view", ["tokenizer", "pretrain"])
def test_centre_square_anchor_floors_odd_margins_like_timm_rrc(tmp_path, view):
    pytest.importorskip("nvidia.dali")
    from mapet_ds.pipelines import pretrain_loader, tokenizer_view_loader

    fl = _column_ramp(tmp_path, SIZES)
    if view == "tokenizer":
        images = next(iter(tokenizer_view_loader(fl, size=20, batch_size=3, device="cpu")))["images"]
        ids = list(range(3))
    else:
        b = next(iter(pretrain_loader(fl, img_size=20, batch_size=3, shard_id=0, num_shards=1, seed=0,
                                      device="cpu", color_jitter=0.0, tokenizer_view_size=20)))
        images, ids = b["tok_images"], b["sample_ids"].tolist()
        from mapet_ds.pipelines import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
        vit = ((b["images"] * std + mean) * 255).round()
        assert (vit - images.float()).abs().max() <= 1  # the ViT view is the same square
    for img, sid in zip(images, ids):
        w, h = SIZES[sid]
        i, j = _timm_anchor(w, h)
        assert (i, j) == ((h - 20) // 2, (w - 20) // 2)
        assert int(img[0, 0, 0]) == 5 * j + 3 * i, (sid, int(img[0, 0, 0]), i, j)


def test_store_with_old_rounding_is_refused_in_one_line(tmp_path):
    from mapet_ds.filelist import write_filelist
    from mapet_ds.pipelines.graphs import pretrain_view_spec, tokenizer_view_spec
    from mapet_ds.tokenizers.store import TokenStore, TokenStoreError

    fl_path = write_filelist(tmp_path / "l.txt", [(f"{i}.png", 0) for i in range(4)])
    from mapet_ds.filelist import read_filelist

    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    fl = read_filelist(fl_path)
    assert tokenizer_view_spec(8)["crop_anchor"] == pretrain_view_spec(False)["crop_anchor"] == "floor"
    old_view = {"crop": "center_square", "size": 8, "interpolation": "bicubic"}  # before crop_anchor
    for name, view in (("old", old_view), ("legacy", None)):
        store = TokenStore.create(tmp_path / name, fl, grid=2, vocab=50, spec={}, chunk_size=16, view=view or old_view)
        store.write_chunk(0, np.zeros((4, 4), np.int16))
        store.finalise()
        meta_path = tmp_path / name / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["view"] = view
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(TokenStoreError) as e:
            TokenStore.open(tmp_path / name, filelist=fl, view=pretrain_view_spec(False))
        msg = str(e.value)
        assert "\n" not in msg and "old centre-square rounding" in msg and "launch/tokens.py assign" in msg


def test_online_kmeans_tokenizer_runs_in_the_step_with_a_random_resized_crop(tmp_path):
    """tokenizer.online=true with a k-means kind: the codebook + its extractor tokenize the augmented
    (randomly cropped) view in the step, exactly as `launch/tokens.py assign` would tokenize it."""
    pytest.importorskip("faiss")
    from mapet_ds.engine.pretrain import build_online_tokenizer
    from mapet_ds.tokenizers import Codebook, KMeansTokenizer, PixelPatchExtractor
    from mapet_ds.tokenizers.codebook import fit_codebook

    ext = PixelPatchExtractor(patch_size=16, img_size=32, device="cpu")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8)
    feats = ext.extract(images).reshape(-1, ext.extract(images[:1]).shape[-1]).numpy()
    cb = Codebook(fit_codebook(feats, 8, niter=3, nredo=1, use_gpu=False), {"extractor": ext.spec()})
    cb.save(tmp_path / "cb.pt")
    common = ["model.size=null", "model.embed_dim=48", "model.depth=1", "model.num_heads=3", "model.img_size=32",
              "tokenizer.kind=pixel_kmeans", "tokenizer.online=true", "tokenizer.vocab_size=8",
              "data.random_resized_crop=true"]
    cfg = load_config(None, common + [f"tokenizer.codebook={tmp_path / 'cb.pt'}"])
    tok = build_online_tokenizer(cfg, torch.device("cpu"))
    assert (tok.grid, tok.vocab_size, tok.input_size) == (2, 8, 32)
    assert torch.equal(tok.tokenize(images[:4]), KMeansTokenizer(ext, cb).tokenize(images[:4]))
    with pytest.raises(ConfigError, match=r"online=true needs tokenizer.codebook=<file>"):
        build_online_tokenizer(load_config(None, common), torch.device("cpu"))
