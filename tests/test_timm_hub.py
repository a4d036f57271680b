"""launch/export.py --timm-dir: a timm Hub folder written by timm's save_for_hf that timm loads back."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import REPO

from mapet_ds.config import load_config, save_config
from mapet_ds.filelist import write_filelist

CLASSES = ["cat", "dog", "fish", "bird", "frog"]


def _export_main():
    spec = importlib.util.spec_from_file_location("launch_export", REPO / "launch" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fine-tuning run dir: config.yaml (48-wide ViT, 3 heads: not inferable from weights), best.pt, and a
    train list with classes.txt beside it."""
    from mapet_ds.models.classifier import build_classifier

    root = tmp_path_factory.mktemp("hub")
    write_filelist(root / "data" / "train.txt", [(f"{c}/0.jpg", i) for i, c in enumerate(CLASSES)], classes=CLASSES)
    cfg = load_config(None, ["model.size=null", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
                             "model.img_size=32", "data.crop_pct=0.9", f"data.train_list={root / 'data/train.txt'}",
                             "data.mean=[0.5,0.4,0.3]", "data.std=[0.2,0.25,0.3]"])
    (root / "run").mkdir()
    save_config(cfg, root / "run" / "config.yaml")
    torch.manual_seed(0)
    model = build_classifier(cfg.model, len(CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial head and norms
    torch.save(model.state_dict(), root / "run" / "best.pt")
    return root, model.eval()


def test_timm_dir_loads_through_timm_with_equal_outputs_and_eval_view(run, capsys):
    import timm
    from timm.data import resolve_data_config

    root, ours = run
    out = root / "timm_cls"
    assert _export_main()([str(root / "run" / "best.pt"), "--timm-dir", str(out)]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 5 and cfg["label_names"] == CLASSES and cfg["architecture"].startswith("vit_")
    assert cfg["model_args"]["embed_dim"] == 48 and cfg["model_args"]["num_heads"] == 3
    pc = cfg["pretrained_cfg"]
    assert pc["mean"] == [0.5, 0.4, 0.3] and pc["std"] == [0.2, 0.25, 0.3] and pc["crop_pct"] == 0.9
    assert pc["interpolation"] == "bicubic" and pc["input_size"] == [3, 32, 32] and pc["num_classes"] == 5

    m = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ours(x), rtol=0, atol=0)
    dc = resolve_data_config(model=m)
    assert dc["crop_pct"] == 0.9 and dc["interpolation"] == "bicubic" and tuple(dc["mean"]) == (0.5, 0.4, 0.3)


def test_timm_dir_backbone_and_refusals(run, capsys):
    import timm

    root, ours = run
    out = root / "timm_bb"
    assert _export_main()([str(root / "run" / "best.pt"), "--timm-dir", str(out), "--kind", "backbone"]) == 0
    m = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert m.num_classes == 0 and "label_names" not in json.loads((out / "config.json").read_text())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ours.forward_head(ours.forward_features(x), pre_logits=True))
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert _export_main()([str(root / "run" / "best.pt"), "--timm-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --timm-dir") and "not an empty folder" in err and "\n" not in err
    assert (out / "model.safetensors").read_bytes() == before
    (root / "bad.txt").write_text("a\nb\n")
    assert _export_main()([str(root / "run" / "best.pt"), "--timm-dir", str(root / "x"),
                           "--class-names", str(root / "bad.txt")]) == 2
    assert "2 class names for a 5-class head" in capsys.readouterr().err
    assert not (root / "x").exists() and not list(root.glob(".x.tmp-*"))
