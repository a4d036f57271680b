"""launch/predict.py: top-k names + probabilities per image through the DALI eval view."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mapet_ds.config import load_config, save_config
from mapet_ds.filelist import write_filelist

pytest.importorskip("nvidia.dali")

CLASSES = ["cat", "dog", "fish", "bird", "frog"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A fine-tuning run (config.yaml, best.pt, classes.txt beside its train list) and an image folder with
    5 good images (2 in a sub-folder, JPEG and PNG), a text file, a non-image and a half-written PNG."""
    from mapet_ds.models.classifier import build_classifier

    root = tmp_path_factory.mktemp("pred")
    write_filelist(root / "data" / "train.txt", [(f"{c}.jpg", i) for i, c in enumerate(CLASSES)], classes=CLASSES)
    cfg = load_config(None, ["model.size=null", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
                             "model.img_size=32", "data.crop_pct=0.875", f"data.train_list={root / 'data/train.txt'}"])
    (root / "run").mkdir()
    save_config(cfg, root / "run" / "config.yaml")
    torch.manual_seed(0)
    model = build_classifier(cfg.model, len(CLASSES), head_init_std=0.5)
    torch.save(model.state_dict(), root / "run" / "best.pt")
    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = []
    for i in range(5):
        a = np.asarray(Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((40 + i, 36),
                                                                                               Image.BICUBIC))
        p = imgs / (f"sub/{i}.jpg" if i >= 3 else f"{i}.png")
        Image.fromarray(a).save(p, quality=95) if p.suffix == ".jpg" else Image.fromarray(a).save(p)
        good.append(p)
    (imgs / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    (imgs / "bad.jpg").write_bytes(b"this is no jpeg")  # PIL cannot open it
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    (imgs / "half.png").write_bytes(buf.getvalue()[:200])  # header fine, data cut off
    return root, model.eval(), sorted(good)


def _reference(model, path):
    """timm's eval transform (PIL) on the same view + our model -> probabilities [C]."""
    from timm.data import create_transform

    t = create_transform(input_size=(3, 32, 32), crop_pct=0.875, interpolation="bicubic", is_training=False)
    with torch.no_grad():
        return model(t(Image.open(path).convert("RGB"))[None]).softmax(-1)[0]


def test_predict_folder_topk_names_probs_and_errors(ws, capsys):
    from mapet_ds.engine.predict import main

    root, model, good = ws
    rc = main([str(root / "run" / "best.pt"), str(root / "imgs"), "--topk", "3", "--json", "--batch-size", "2",
               "--device", "cpu", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 1  # some images were skipped
    rows = [json.loads(line) for line in out.splitlines()]
    by_image = {r["image"]: r for r in rows}
    assert sorted(p for p, r in by_image.items() if "topk" in r) == [str(p) for p in good]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and any("bad.jpg: not an image" in e for e in errors)
    # the PNG that only fails at decode, named by the data tools' DALI probe (issue 21)
    assert any("half.png: DALI cannot decode it" in e for e in errors)
    assert not any("notes.txt" in line for line in out.splitlines() + errors)
    for p in good:
        top = by_image[str(p)]["topk"]
        assert len(top) == 3 and all(t["class"] == CLASSES[t["index"]] for t in top)
        ref = _reference(model, p)
        ref_p, ref_i = ref.topk(3)
        assert top[0]["index"] == int(ref_i[0]), (p, top, ref)
        # DALI vs PIL JPEG decoding / bicubic rounding: probabilities agree closely
        assert abs(top[0]["prob"] - float(ref_p[0])) < 0.02
        assert top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"]


def test_predict_from_timm_dir_equals_checkpoint_and_text_output(ws, capsys, tmp_path):
    from mapet_ds.engine.predict import main
    from mapet_ds.interop.hub import export_timm_dir

    root, model, good = ws
    export_timm_dir(root / "run" / "best.pt", tmp_path / "timm")
    args = [*map(str, good[:3]), "--device", "cpu", "--no-progress", "--topk", "2"]
    assert main([str(root / "run" / "best.pt"), *args]) == 0
    a = capsys.readouterr().out
    assert main([str(tmp_path / "timm"), *args]) == 0
    b = capsys.readouterr().out
    assert a == b and len(a.splitlines()) == 3
    assert a.splitlines()[0].startswith(f"{good[0]}: ") and any(c in a.splitlines()[0] for c in CLASSES)
    assert main([str(tmp_path / "timm"), str(tmp_path / "missing.jpg"), "--device", "cpu"]) == 1
    assert "error: " + str(tmp_path / "missing.jpg") + ": no such file or folder" in capsys.readouterr().err
