"""Classifier, layer decay, checkpoint export/import (DeepSpeed, plain, MaPeT release), k-NN."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mapet_ds.config import ModelConfig, ObjectiveConfig, RunConfig, save_config
from mapet_ds.interop.export import CheckpointError, export_timm, load_any_checkpoint
from mapet_ds.analysis.knn import extract_features, knn_eval
from mapet_ds.models.classifier import (
    build_classifier,
    convert_mapet_release,
    layer_decay_param_groups,
    load_backbone_into_classifier,
)
from mapet_ds.models.pretrain import PretrainModel

ROOT = Path(__file__).resolve().parents[1]


def _cli():
    spec = importlib.util.spec_from_file_location("launch_export", ROOT / "launch" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (layer scales, norms, head too), so no weight is trivially 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _timm(info: dict, name: str = "vit_tiny_patch16_224"):
    import timm

    return timm.create_model(name, pretrained=False, **info["timm_kwargs"]).eval()


# ---------------------------------------------------------------------------------------
# DeepSpeed checkpoints written by the test (1 process, CPU, gloo)


@pytest.fixture(scope="module")
def ds_env():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               DS_ACCELERATOR="cpu")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield


def _ds_train_and_save(model, loss_fn, run_dir: Path, cfg: RunConfig, *, stage: int, bf16: bool = False,
                       groups=None, step: int = 1, complete: bool = True):
    import deepspeed

    opt = torch.optim.AdamW(groups if groups is not None else model.parameters(), lr=1e-3)
    ds_cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    loss = loss_fn(engine)
    engine.backward(loss)
    engine.step()
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(run_dir / "checkpoints"), tag=tag)
    if complete:
        (run_dir / "checkpoints" / tag / "complete.json").write_text(json.dumps({"step": step}))
    save_config(cfg, run_dir / "config.yaml")
    return engine


@pytest.fixture(scope="module")
def pretrain_run(ds_env, tmp_path_factory):
    """A MaPeT pre-training run dir with one complete ZeRO-2 fp32 checkpoint."""
    torch.manual_seed(0)
    mcfg = ModelConfig(size=None, embed_dim=48, depth=2, num_heads=3, img_size=64, patch_size=16, drop_path=0.0)
    cfg = RunConfig(model=mcfg)
    model = PretrainModel(mcfg, ObjectiveConfig(), vocab_size=32)
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(0, 32, (2, 16))

    def loss_fn(engine):
        return engine(images, tokens, engine.module.sample_plan(2, "cpu"))["loss"]

    run_dir = tmp_path_factory.mktemp("pretrain_run")
    engine = _ds_train_and_save(model, loss_fn, run_dir, cfg, stage=2)
    return run_dir, engine.module


# ---------------------------------------------------------------------------------------
# Classifier and layer decay


def test_build_classifier_mean_pool_fc_norm_small_head(tiny_model_cfg):
    model = build_classifier(tiny_model_cfg, 10, drop_path=0.1)
    assert model.global_pool == "avg"
    assert isinstance(model.norm, torch.nn.Identity)
    assert isinstance(model.fc_norm, torch.nn.LayerNorm)
    assert model.head.out_features == 10
    assert 0.005 < model.head.weight.std() < 0.04 and model.head.bias.abs().max() == 0  # release: std 0.02
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    x = torch.randn(3, 3, 64, 64)
    model.eval()
    logits = model(x)
    assert logits.shape == (3, 10)
    tokens = model.forward_features(x)
    expected = model.head(model.fc_norm(tokens[:, 1:].mean(1)))  # mean over patch tokens, no CLS
    torch.testing.assert_close(logits, expected)


def test_layer_decay_groups_lr_scale_and_weight_decay(tiny_model_cfg):
    model = build_classifier(tiny_model_cfg, 5)
    depth, decay = tiny_model_cfg.depth, 0.65
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=decay)
    seen = {}
    for g in groups:
        assert len(g["param_names"]) == len(g["params"])
        for name, p in zip(g["param_names"], g["params"]):
            assert name not in seen
            seen[name] = (g["lr_scale"], g["weight_decay"])
            assert p is dict(model.named_parameters())[name]
    assert set(seen) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            layer_id = 0
        elif name.startswith("blocks."):
            layer_id = int(name.split(".")[1]) + 1
        else:
            assert name.startswith(("fc_norm", "head")), name
            layer_id = depth + 1
        scale, wd = seen[name]
        assert scale == pytest.approx(decay ** (depth + 1 - layer_id)), name
        no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert wd == (0.0 if no_decay else 0.05), name
    assert seen["pos_embed"][1] == 0.0 and seen["cls_token"][1] == 0.0
    assert seen["blocks.0.attn.qkv.weight"] == (pytest.approx(decay ** depth), 0.05)
    assert seen["head.weight"] == (1.0, 0.05)
    flat = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=None)  # ViT-T recipe: no decay
    assert {g["lr_scale"] for g in flat} == {1.0}


def test_load_backbone_from_pretrain_state_dict_and_resample_pos_embed(tiny_model_cfg):
    from timm.layers import resample_abs_pos_embed

    pre = _randomize(PretrainModel(tiny_model_cfg, ObjectiveConfig(), vocab_size=32))
    sd = pre.state_dict()
    clf = build_classifier(tiny_model_cfg, 7)
    report = load_backbone_into_classifier(clf, sd)
    assert sorted(report["missing"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert {"mask_token", "lm_head.weight", "lm_head.bias", "norm.weight", "norm.bias"} <= set(report["dropped"])
    torch.testing.assert_close(clf.blocks[1].attn.qkv.weight, pre.backbone.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(clf.pos_embed, pre.backbone.pos_embed)

    big = build_classifier(tiny_model_cfg.model_copy(update={"img_size": 96}), 7)  # grid 4 -> 6
    report = load_backbone_into_classifier(big, sd)
    assert report["resampled"] == ["pos_embed (1, 17, 48) -> (1, 37, 48)"]
    expected = resample_abs_pos_embed(sd["backbone.pos_embed"], new_size=[6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(big.pos_embed, expected)


def test_load_backbone_errors_are_one_line(tiny_model_cfg):
    sd = build_classifier(tiny_model_cfg, 3).state_dict()
    clf = build_classifier(tiny_model_cfg, 3)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(CheckpointError, match=r"missing backbone weights: blocks\.1\.mlp\.fc2\.weight") as e:
        load_backbone_into_classifier(clf, missing)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"unexpected keys for the classifier: extra\.weight"):
        load_backbone_into_classifier(clf, {**sd, "extra.weight": torch.zeros(1)})
    no_ls = build_classifier(tiny_model_cfg.model_copy(update={"layer_scale_init": None}), 3)
    with pytest.raises(CheckpointError, match="set model.layer_scale_init"):
        load_backbone_into_classifier(no_ls, sd)
    wide = build_classifier(ModelConfig(size=None, embed_dim=96, depth=2, num_heads=3, img_size=64), 3)
    with pytest.raises(CheckpointError, match="different model size"):
        load_backbone_into_classifier(wide, sd)


# ---------------------------------------------------------------------------------------
# Export from DeepSpeed checkpoints


def test_export_pretrain_zero2_backbone_loads_strict_in_timm(pretrain_run, tmp_path):
    run_dir, module = pretrain_run
    out = tmp_path / "backbone.pth"
    assert _cli()([str(run_dir), str(out)]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    kw = info["timm_kwargs"]
    assert (kw["img_size"], kw["embed_dim"], kw["depth"], kw["num_heads"]) == (64, 48, 2, 3)  # from config.yaml
    assert (kw["global_pool"], kw["num_classes"], kw["init_values"]) == ("token", 0, 0.1)
    assert info["source"]["tag"] == "step00000001" and info["source"]["module"] == "pretrain"
    assert "zero_to_fp32" in info["source"]["weights"]
    assert {"mask_token", "lm_head.weight", "lm_head.bias"} <= set(info["dropped_keys"])
    sd = torch.load(out, weights_only=True)
    model = _timm(info)
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), module.backbone.forward_features(x), rtol=0, atol=0)
    # the fp32 weights are the trained ones (ZeRO-2 fp32: master == module)
    for k, v in module.backbone.state_dict().items():
        assert torch.equal(sd[k], v), k
    # fine-tune init straight from the run dir: only the new fc_norm and head stay missing
    clf = build_classifier(module.model_cfg, 3)
    report = load_backbone_into_classifier(clf, load_any_checkpoint(run_dir)[0])
    assert sorted(report["missing"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report["dropped"] == ["norm.bias", "norm.weight"]


def test_incomplete_tag_never_picked(pretrain_run, tmp_path):
    src, _ = pretrain_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "step00000001", ckpts / "step00000002")
    (ckpts / "step00000002" / "complete.json").unlink()
    (ckpts / "latest").write_text("step00000002")  # DeepSpeed's pointer names the broken save
    for path in (run_dir, ckpts):
        _, meta = load_any_checkpoint(path)
        assert meta["tag"] == "step00000001"
    with pytest.raises(CheckpointError, match="has no complete.json") as e:
        load_any_checkpoint(ckpts / "step00000002")
    assert "\n" not in str(e.value)
    (ckpts / "step00000001" / "complete.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_any_checkpoint(run_dir)
    # DeepSpeed checkpoints from other code have no markers: opt in, then `latest` decides
    _, meta = load_any_checkpoint(run_dir, require_complete=False)
    assert meta["tag"] == "step00000002"


def test_export_classifier_from_zero0_and_bf16(ds_env, tiny_model_cfg, tmp_path, capsys):
    cfg = RunConfig(model=tiny_model_cfg)
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([1, 3])

    def loss_fn(engine):
        dtype = next(engine.module.parameters()).dtype
        return F.cross_entropy(engine(x.to(dtype)).float(), y)

    # ZeRO-0 fp32 with layer-decay groups: full weights in mp_rank_00_model_states.pt
    torch.manual_seed(1)
    model = _randomize(build_classifier(tiny_model_cfg, 5))
    groups = layer_decay_param_groups(model, 0.05, 0.65)
    engine = _ds_train_and_save(model, loss_fn, tmp_path / "ft0", cfg, stage=0, groups=groups)
    out = tmp_path / "clf.pth"
    info = export_timm(tmp_path / "ft0", out, kind="classifier")
    assert info["source"]["weights"] == "module weights (fp32)" and info["source"]["zero_stage"] == 0
    assert (info["timm_kwargs"]["global_pool"], info["timm_kwargs"]["num_classes"]) == ("avg", 5)
    timm_model = _timm(info)
    timm_model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    engine.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), engine.module(x), rtol=0, atol=0)
    # a backbone export of a classifier keeps fc_norm (avg pooling) and drops the head
    info = export_timm(tmp_path / "ft0", tmp_path / "bb.pth")
    assert info["timm_kwargs"]["num_classes"] == 0 and info["timm_kwargs"]["global_pool"] == "avg"
    assert not any(k.startswith("head.") for k in torch.load(tmp_path / "bb.pth", weights_only=True))

    # bf16, ZeRO-2 (zero_to_fp32) and ZeRO-0 (fp32 masters named through param_names)
    for stage in (2, 0):
        torch.manual_seed(2)
        model = _randomize(build_classifier(tiny_model_cfg, 5))
        groups = layer_decay_param_groups(model, 0.05, 0.65)
        engine = _ds_train_and_save(model, loss_fn, tmp_path / f"bf{stage}", cfg, stage=stage, bf16=True, groups=groups)
        sd, meta = load_any_checkpoint(tmp_path / f"bf{stage}")
        assert "fp32 master" in meta["weights"], meta["weights"]
        module_sd = engine.module.state_dict()
        assert set(sd) == set(module_sd)
        assert all(v.dtype == torch.float32 for v in sd.values())
        # masters round to the bf16 weights the engine computes with, and carry more precision
        assert all(torch.equal(sd[k].bfloat16(), module_sd[k]) for k in sd)
        assert any(not torch.equal(sd[k], module_sd[k].float()) for k in sd)
    # bf16 ZeRO-0 without param_names in the groups: the masters are unnamed, use the bf16 copies
    model = _randomize(build_classifier(tiny_model_cfg, 5))
    engine = _ds_train_and_save(model, loss_fn, tmp_path / "bf0plain", cfg, stage=0, bf16=True)
    sd, meta = load_any_checkpoint(tmp_path / "bf0plain")
    assert meta["weights"] == "module weights (bf16/fp16 copies, upcast to fp32)"
    assert all(torch.equal(sd[k], v.float()) for k, v in engine.module.state_dict().items())

    # the CLI: a classifier export, then a one-line error for a missing file
    capsys.readouterr()
    assert _cli()([str(tmp_path / "ft0"), str(tmp_path / "x.pth"), "--kind", "classifier"]) == 0
    code = _cli()(["--from-mapet-release", str(tmp_path / "missing.tar"), str(tmp_path / "y.pth")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "no such file" in err and "\n" not in err


def test_classifier_kind_needs_head(pretrain_run, tmp_path, capsys):
    run_dir, _ = pretrain_run
    assert _cli()([str(run_dir), str(tmp_path / "c.pth"), "--kind", "classifier"]) == 2
    err = capsys.readouterr().err
    assert "without a classification head" in err and "--kind backbone" in err
    assert not (tmp_path / "c.pth").exists()


# ---------------------------------------------------------------------------------------
# Plain files and the MaPeT release layout


def test_plain_file_wrappers_and_prefixes(tiny_model_cfg, tmp_path):
    model = _randomize(build_classifier(tiny_model_cfg, 4)).eval()
    sd = model.state_dict()
    for i, obj in enumerate([sd, {"model": sd}, {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
                             {"module": {f"_orig_mod.{k}": v for k, v in sd.items()}}]):
        torch.save(obj, tmp_path / f"{i}.pth")
        loaded, meta = load_any_checkpoint(tmp_path / f"{i}.pth")
        assert meta["module"] == "classifier" and meta["num_classes"] == 4
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    ema = {f"module.{k}": v + 1 for k, v in sd.items()}  # timm ModelEma keys carry "module."
    torch.save({"state_dict": sd, "state_dict_ema": ema}, tmp_path / "ema.pth")
    loaded, _ = load_any_checkpoint(tmp_path / "ema.pth", use_ema=True)
    assert all(torch.equal(loaded[k], sd[k] + 1) for k in sd)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_any_checkpoint(tmp_path / "1.pth", use_ema=True)
    torch.save({"optimizer": {}, "epoch": 1}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_any_checkpoint(tmp_path / "bad.pth")
    info = export_timm(tmp_path / "0.pth", tmp_path / "out.pth", kind="classifier", model_cfg=tiny_model_cfg)
    assert info["timm_kwargs"]["num_heads"] == 3
    with pytest.raises(CheckpointError, match="pass --config"):  # 48 wide: heads not inferable
        export_timm(tmp_path / "0.pth", tmp_path / "out2.pth", kind="classifier")


def _to_release_layout(sd: dict) -> dict:
    """timm classifier state dict -> the MaPeT release keys (attn.q + attn.kv per block)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias"):
            base, kind = k.rsplit(".qkv.", 1)
            d = v.shape[0] // 3
            out[f"{base}.q.{kind}"] = v[:d].clone()
            out[f"{base}.kv.{kind}"] = v[d:].clone()
        else:
            out[k] = v.clone()
    return out


def _release_reference_forward(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The release ViT written out with separate q / kv projections. x [B,3,H,W] -> logits [B,C]."""
    w = sd["patch_embed.proj.weight"]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], 1) + sd["pos_embed"]
    b, n, d = t.shape
    hd = d // heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))

    def split(z):
        return z.reshape(b, n, heads, hd).transpose(1, 2)

    for i in range(depth):
        p = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(t, (d,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        q = F.linear(h, p["attn.q.weight"], p["attn.q.bias"])
        kv = F.linear(h, p["attn.kv.weight"], p["attn.kv.bias"])
        k, v = kv[..., :d], kv[..., d:]
        attn = (split(q) @ split(k).transpose(-2, -1) * hd ** -0.5).softmax(-1)
        o = (attn @ split(v)).transpose(1, 2).reshape(b, n, d)
        t = t + p["ls1.gamma"] * F.linear(o, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(t, (d,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        hidden = F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
        mlp = F.linear(hidden, p["mlp.fc2.weight"], p["mlp.fc2.bias"])
        t = t + p["ls2.gamma"] * mlp
    pooled = F.layer_norm(t[:, 1:].mean(1), (d,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-6)
    return F.linear(pooled, sd["head.weight"], sd["head.bias"])


def test_mapet_release_import_matches_reference_forward(tmp_path, capsys):
    # 64-wide heads as in the release's ViT-T/S/B, so num_heads is inferred without a config
    cfg = ModelConfig(size=None, embed_dim=128, depth=2, num_heads=2, img_size=32, patch_size=16, drop_path=0.0)
    release = _to_release_layout(_randomize(build_classifier(cfg, 7), seed=3).state_dict())
    assert "blocks.0.attn.q.weight" in release and "blocks.0.attn.kv.bias" in release
    tar = tmp_path / "vit_standard_tiny_patch16_224_KCLIP.tar"
    torch.save({"epoch": 99, "arch": "vit_standard_tiny_patch16_224", "state_dict": release,
                "args": argparse.Namespace(model="vit_standard_tiny_patch16_224")}, tar)
    out = tmp_path / "mapet_t.pth"
    assert _cli()(["--from-mapet-release", str(tar), str(out)]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    kw = info["timm_kwargs"]
    assert (kw["num_heads"], kw["global_pool"], kw["num_classes"], kw["img_size"]) == (2, "avg", 7, 32)
    assert info["source"]["format"] == "mapet_release"
    model = _timm(info)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _release_reference_forward(release, x, heads=2), rtol=1e-5, atol=1e-5)
    # ... and into our classifier as a fine-tuning init (head dropped)
    clf = build_classifier(cfg, 3)
    report = load_backbone_into_classifier(clf, release)
    assert sorted(report["missing"]) == ["head.bias", "head.weight"]
    torch.testing.assert_close(clf.blocks[0].attn.qkv.weight,
                               torch.cat([release["blocks.0.attn.q.weight"], release["blocks.0.attn.kv.weight"]]))


def test_beit_style_keys_and_unknown_layouts(tiny_model_cfg):
    sd = _randomize(build_classifier(tiny_model_cfg, 3)).state_dict()
    d = 48
    beit = {}
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias"):
            base = k[: -len("qkv.bias")]
            beit[base + "q_bias"], beit[base + "v_bias"] = v[:d], v[2 * d:]
        elif k.endswith("ls1.gamma") or k.endswith("ls2.gamma"):
            beit[k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = v
        else:
            beit[k] = v
    conv = convert_mapet_release(beit)
    assert set(conv) == set(sd)
    for k in sd:
        expected = sd[k].clone()
        if k.endswith("attn.qkv.bias"):
            expected[d:2 * d] = 0  # BEiT has no k bias
        assert torch.equal(conv[k], expected), k
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout, unexpected keys encoder\.blocks_0") as e:
        convert_mapet_release({"encoder.blocks_0.attn.q.weight": torch.zeros(2, 2), **sd})
    assert "supported layouts" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="relative position bias"):
        convert_mapet_release({**beit, "blocks.0.attn.relative_position_bias_table": torch.zeros(3, 3)})


# ---------------------------------------------------------------------------------------
# k-NN


def test_knn_separable_is_perfect_and_random_is_chance():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 5
    ytr, yte = torch.arange(100) % 5, torch.arange(50) % 5
    tr = centers[ytr] + 0.1 * torch.randn(100, 16, generator=g)
    te = centers[yte] + 0.1 * torch.randn(50, 16, generator=g)
    res = knn_eval(tr, ytr, te, yte, k=20, T=0.07, num_classes=5, batch_size=7)
    assert res["top1"] == 100.0 and res["top5"] == 100.0

    tr, te = torch.randn(2000, 16, generator=g), torch.randn(1000, 16, generator=g)
    ytr, yte = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    res = knn_eval(tr, ytr, te, yte, k=20, num_classes=10)
    assert 5.0 < res["top1"] < 15.0  # chance 10%, std ~1%
    assert 40.0 < res["top5"] < 60.0  # chance 50%

    # k=1: the label of the most cosine-similar train sample
    res = knn_eval(tr[:50], ytr[:50], te[:20], yte[:20], k=1, num_classes=10)
    nn_idx = (F.normalize(te[:20], dim=1) @ F.normalize(tr[:50], dim=1).T).argmax(1)
    assert res["top1"] == pytest.approx(100.0 * (ytr[:50][nn_idx] == yte[:20]).float().mean().item())
    with pytest.raises(ValueError, match="same D"):
        knn_eval(tr, ytr, te[:, :8], yte)


def test_extract_features_cls_or_mean_pooled_after_norm(tiny_model_cfg):
    pre = _randomize(PretrainModel(tiny_model_cfg, ObjectiveConfig(), vocab_size=32)).train()
    images = torch.randn(5, 3, 64, 64)
    loader = [
        {"images": images[:3], "labels": torch.tensor([0, 1, 2]), "sample_ids": torch.tensor([10, 11, 12])},
        [{"images": images[3:], "labels": torch.tensor([3, 4]), "sample_ids": torch.tensor([13, 99]),
          "valid": torch.tensor([True, False])}],  # DALI-style list; the last row is padding
    ]
    feats, labels, ids = extract_features(pre, loader, "cpu", pool="mean")
    assert pre.training  # mode restored
    assert feats.shape == (4, 48) and labels.tolist() == [0, 1, 2, 3] and ids.tolist() == [10, 11, 12, 13]
    bb = pre.backbone.eval()
    with torch.no_grad():
        expected = bb.forward_features(images[:4])[:, 1:].mean(1)  # forward_features applies the final norm
        torch.testing.assert_close(feats, expected)
        cls, _, _ = extract_features(pre, loader, "cpu")  # the default: [CLS] after the final norm
        torch.testing.assert_close(cls, bb.forward_features(images[:4])[:, 0])
        with pytest.raises(ValueError, match="pool must be one of cls, mean"):
            extract_features(pre, loader, "cpu", pool="max")
        clf = _randomize(build_classifier(tiny_model_cfg, 3)).eval()
        f2, _, _ = extract_features(clf, loader[:1], "cpu", pool="mean")
        torch.testing.assert_close(f2, clf.fc_norm(clf.forward_features(images[:3])[:, 1:].mean(1)))
