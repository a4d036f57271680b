"""data/ tools: demo generator, ImageNet-layout file lists, corrupt-file scan."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import load_data_tool
from PIL import Image

from mapet_ds.filelist import FileListError, read_filelist



make_demo = load_data_tool("make_demo")
make_filelist = load_data_tool("make_filelist")
scan = load_data_tool("scan")


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# -- make_demo ---------------------------------------------------------------------------------

def test_make_demo_is_deterministic_and_in_imagenet_layout(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert make_demo.main(["--out", str(a), "--num-train-per-class", "2", "--num-val-per-class", "1",
                           "--size", "32", "--seed", "4"]) == 0
    make_demo.make_demo(b, num_train_per_class=2, num_val_per_class=1, size=32, seed=4)
    make_demo.make_demo(c, num_train_per_class=2, num_val_per_class=1, size=32, seed=5)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)

    train, val = read_filelist(a / "train.txt"), read_filelist(a / "val.txt")
    assert train.classes == sorted(make_demo.CLASSES) and len(train.classes) == 10
    assert len(train) == 20 and len(val) == 10
    for fl in (train, val):
        for rel, y in zip(fl.paths, fl.labels):
            assert Path(rel).parts[1] == fl.classes[y]  # <split>/<class>/<file>
            with Image.open(fl.root / rel) as img:
                assert img.format == "JPEG" and img.mode == "RGB"
                assert 32 <= min(img.size) and max(img.size) <= 40


def test_demo_classes_differ_in_shape_not_colour():
    """Mean colour is no shortcut: per-class mean intensities overlap heavily."""
    import numpy as np

    means = {}
    for ci, cls in enumerate(make_demo.CLASSES):
        vals = [np.asarray(make_demo.draw_sample(cls, np.random.default_rng([0, 0, ci, i]), 48), np.float32).mean()
                for i in range(12)]
        means[cls] = (np.mean(vals), np.std(vals))
    spread = np.std([m for m, _ in means.values()])
    within = np.mean([s for _, s in means.values()])
    assert spread < within


# -- make_filelist -----------------------------------------------------------------------------

def _jpeg(path: Path, colour=(120, 30, 200), size=(40, 36)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


def test_make_filelist_imagenet_layout_sorted_and_stable(tmp_path):
    root = tmp_path / "in"
    for wnid in ("n02", "n01"):
        for name in ("b.JPEG", "a.JPEG"):
            _jpeg(root / "train" / wnid / f"{wnid}_{name}")
        _jpeg(root / "val" / wnid / f"val_{wnid}.JPEG")
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    written = make_filelist.make_filelists(root)
    train = read_filelist(written["train"])
    assert train.classes == ["n01", "n02"]
    assert train.paths == ["train/n01/n01_a.JPEG", "train/n01/n01_b.JPEG", "train/n02/n02_a.JPEG",
                           "train/n02/n02_b.JPEG"]
    assert train.labels == [0, 0, 1, 1]
    val = read_filelist(written["val"])
    assert val.paths == ["val/n01/val_n01.JPEG", "val/n02/val_n02.JPEG"] and val.labels == [0, 1]
    first = written["train"].read_bytes()
    make_filelist.make_filelists(root)
    assert written["train"].read_bytes() == first


def test_make_filelist_flat_val_with_label_files(tmp_path):
    root = tmp_path / "in"
    for wnid in ("n01", "n02", "n03"):
        _jpeg(root / "train" / wnid / "x.JPEG")
    for i in range(3):
        _jpeg(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "labels.txt").write_text("ILSVRC2012_val_00000000.JPEG n03\nILSVRC2012_val_00000001 n01\n"
                                         "ILSVRC2012_val_00000002.JPEG 1\n")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n03 1 2 3 4 n03 5 6 7 8\n"
        "ILSVRC2012_val_00000000,n02 1 2 3 4\nILSVRC2012_val_00000001,n01 1 2 3 4\n")
    out = tmp_path / "lists"
    assert make_filelist.main([str(root), "--out", str(out), "--val-labels", str(tmp_path / "labels.txt")]) == 0
    val = read_filelist(out / "val.txt", root=out)
    assert val.labels == [2, 0, 1]
    assert val.paths[0] == "../in/val/ILSVRC2012_val_00000000.JPEG" and (out / val.paths[0]).is_file()
    make_filelist.make_filelists(root, out, val_labels=tmp_path / "LOC_val_solution.csv")
    assert read_filelist(out / "val.txt").labels == [1, 0, 2]


def test_make_filelist_errors_name_the_problem(tmp_path, capsys):
    root = tmp_path / "in"
    _jpeg(root / "train" / "n01" / "x.JPEG")
    _jpeg(root / "val" / "v.JPEG")
    with pytest.raises(FileListError, match="flat.*--val-labels"):
        make_filelist.make_filelists(root)
    (tmp_path / "bad.txt").write_text("v.JPEG n99\n")
    with pytest.raises(FileListError, match="bad.txt:1: class 'n99'"):
        make_filelist.make_filelists(root, val_labels=tmp_path / "bad.txt")
    assert make_filelist.main([str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err


# -- scan --------------------------------------------------------------------------------------

@pytest.fixture()
def broken_dataset(tmp_path):
    """Demo data (30 train JPEGs, 48 px) with four bad files planted."""
    root = tmp_path / "ds"
    make_demo.make_demo(root, num_train_per_class=3, num_val_per_class=1, size=48, seed=2)
    t = root / "train"
    bad = {
        "train/circle/circle_00000.JPEG": "truncated",
        "train/cross/cross_00001.JPEG": "cmyk",
        "train/dots/dots_00002.JPEG": "wrong_format",
        "train/ring/ring_00000.JPEG": "grayscale",
    }
    p = root / "train/circle/circle_00000.JPEG"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    p = t / "cross/cross_00001.JPEG"
    Image.open(p).convert("CMYK").save(p, format="JPEG")
    p = t / "dots/dots_00002.JPEG"
    Image.open(p).save(p, format="PNG")
    p = t / "ring/ring_00000.JPEG"
    Image.open(p).convert("L").save(p, format="JPEG")
    return root, bad


def test_scan_finds_exactly_the_planted_files(broken_dataset, tmp_path):
    root, bad = broken_dataset
    out = tmp_path / "scan"
    report = scan.scan_filelist(root / "train.txt", out, workers=2, progress=False)
    found = {p["path"]: p["issues"] for p in report["problems"]}
    assert found == {path: [issue] for path, issue in bad.items()}
    assert report["counts"] == {"truncated": 1, "undecodable": 0, "not_a_file": 0, "too_large": 0, "cmyk": 1,
                                "wrong_format": 1, "unsupported": 0, "grayscale": 1, "tiny": 0}
    assert report["actions"] == {"kept": 27, "repaired": 0, "dropped": 3}
    on_disk = json.loads((out / "train_scan.json").read_text())
    assert on_disk["num_clean"] == 27 and len(on_disk["problems"]) == 4

    clean = read_filelist(out / "train_clean.txt")
    src = read_filelist(root / "train.txt")
    kept = {str((clean.root / p).resolve()) for p in clean.paths}
    assert str((root / "train/ring/ring_00000.JPEG").resolve()) in kept  # grayscale decodes fine: kept
    for path, issue in bad.items():
        if issue != "grayscale":
            assert str((root / path).resolve()) not in kept
    # labels travel with their files
    label_of = {str((src.root / p).resolve()): y for p, y in zip(src.paths, src.labels)}
    assert all(label_of[str((clean.root / p).resolve())] == y for p, y in zip(clean.paths, clean.labels))
    assert clean.classes == src.classes


def test_scan_repair_and_a_pipeline_epoch_over_the_clean_list(broken_dataset, tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    from mapet_ds.pipelines import PipelineRunError, eval_loader, tokenizer_view_loader

    root, bad = broken_dataset
    out = tmp_path / "scan"
    assert scan.main([str(root / "train.txt"), "--out", str(out), "--repair", "--workers", "1",
                      "--no-progress"]) == 0
    assert "truncated 1" in capsys.readouterr().out
    report = json.loads((out / "train_scan.json").read_text())
    actions = {p["path"]: p["action"] for p in report["problems"]}
    assert actions == {"train/circle/circle_00000.JPEG": "dropped", "train/cross/cross_00001.JPEG": "repaired",
                       "train/dots/dots_00002.JPEG": "repaired", "train/ring/ring_00000.JPEG": "repaired"}
    for rel in ("train/cross/cross_00001.JPEG", "train/dots/dots_00002.JPEG"):
        with Image.open(out / "repaired" / rel) as img:
            assert (img.format, img.mode) == ("JPEG", "RGB")

    clean = read_filelist(out / "train_clean.txt")
    assert len(clean) == 29
    loader = eval_loader(clean, img_size=32, batch_size=8, shard_id=0, num_shards=1, device="cpu")
    seen = [i for b in loader for i in b["sample_ids"][b["valid"]].tolist()]
    assert sorted(seen) == list(range(29))

    # The unscanned list stops DALI at the truncated file; the error names it and the fix.
    with pytest.raises(PipelineRunError, match="circle_00000.JPEG.*data/scan.py"):
        for _ in tokenizer_view_loader(root / "train.txt", size=32, batch_size=8):
            pass


def test_scan_flags_tiny_and_undecodable(tmp_path):
    root = tmp_path / "ds"
    _jpeg(root / "train/a/tiny.JPEG", size=(12, 40))
    _jpeg(root / "train/a/fine.JPEG", size=(40, 40))
    (root / "train/a/junk.JPEG").write_bytes(b"this is not an image")
    (root / "train/a/empty.JPEG").write_bytes(b"")
    make_filelist.make_filelists(root)
    report = scan.scan_filelist(root / "train.txt", tmp_path / "out", workers=1, progress=False, min_size=16)
    assert {p["path"]: (p["issues"], p["action"], p["detail"]) for p in report["problems"]} == {
        "train/a/empty.JPEG": (["undecodable"], "dropped", "empty file"),
        "train/a/junk.JPEG": (["undecodable"], "dropped", "not an image (unknown format)"),
        "train/a/tiny.JPEG": (["tiny"], "kept", ""),
    }
