"""No tool writes outside the folder it was given or onto one of its inputs; writes are atomic.

The first test is issue 12's report, step by step: scan --repair of a list made with
--out ROOT/lists (paths ../train/...) used to overwrite the original images.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import REPO, load_data_tool, run_py
from PIL import Image

from mapet_ds.filelist import read_filelist, write_filelist
from mapet_ds.safe_io import (
    InputGuard,
    UnsafeWriteError,
    atomic_write,
    contained_name,
    contained_names,
    path_under,
)

make_demo = load_data_tool("make_demo")
make_filelist = load_data_tool("make_filelist")
scan = load_data_tool("scan")


def _md5s(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _jpeg(path: Path, colour=(120, 30, 200), size=(40, 36)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


@pytest.fixture()
def imagenet_like(tmp_path):
    """ROOT/train/<class>/*.JPEG: good files plus a CMYK JPEG, a PNG named .JPEG and a grayscale JPEG."""
    root = tmp_path / "ROOT"
    for cls in ("n01", "n02"):
        for i in range(3):
            _jpeg(root / "train" / cls / f"{cls}_{i}.JPEG", colour=(40 * i, 90, 200))
    Image.new("CMYK", (40, 36), (10, 200, 30, 5)).save(root / "train/n01/cmyk.JPEG", format="JPEG")
    Image.new("RGB", (40, 36), (1, 2, 3)).save(root / "train/n02/png.JPEG", format="PNG")
    Image.new("L", (40, 36), 77).save(root / "train/n02/gray.JPEG", format="JPEG")
    return root


def test_issue_12_scan_repair_never_touches_the_originals(imagenet_like):
    root = imagenet_like
    before = _md5s(root / "train")
    run_py([REPO / "data/make_filelist.py", root, "--out", root / "lists"], cwd=root)
    assert read_filelist(root / "lists/train.txt").paths[0] == "../train/n01/cmyk.JPEG"
    proc = run_py([REPO / "data/scan.py", root / "lists/train.txt", "--out", root, "--repair", "--workers", "2",
                   "--no-progress"], cwd=root)
    assert "cmyk 1, wrong_format 1, grayscale 1" in proc.stdout

    assert _md5s(root / "train") == before  # byte-identical originals, none added or removed
    repaired = sorted(str(p.relative_to(root)) for p in (root / "repaired").rglob("*") if p.is_file())
    assert repaired == ["repaired/train/n01/cmyk.JPEG", "repaired/train/n02/gray.JPEG", "repaired/train/n02/png.JPEG"]
    clean = read_filelist(root / "train_clean.txt")
    assert clean.root == root
    expect = {f"train/{c}/{c}_{i}.JPEG" for c in ("n01", "n02") for i in range(3)} | set(repaired)
    assert set(clean.paths) == expect and len(clean) == 9
    labels = dict(zip(clean.paths, clean.labels))
    assert labels["repaired/train/n01/cmyk.JPEG"] == 0 and labels["repaired/train/n02/png.JPEG"] == 1
    for p in clean.abspaths():
        with Image.open(p) as img:
            img.load()
            assert img.mode == "RGB" and img.format == "JPEG"
    assert clean.classes == ["n01", "n02"]
    # a second run is idempotent and still leaves the originals alone
    run_py([REPO / "data/scan.py", root / "lists/train.txt", "--out", root, "--repair", "--no-progress"], cwd=root)
    assert _md5s(root / "train") == before


def test_escaping_list_paths_stay_under_out(tmp_path):
    data = tmp_path / "deep/data"
    Image.new("L", (40, 36), 50).save(_mk(data / "a/x.JPEG"), format="JPEG")
    Image.new("L", (40, 36), 60).save(_mk(data / "b/x.JPEG"), format="JPEG")
    _jpeg(data / "a/good.JPEG")
    lists = tmp_path / "deep/lists/nested"
    lists.mkdir(parents=True)
    # an absolute entry, one climbing two folders, and one that normalises to the same name
    entries = [(str(data / "a/x.JPEG"), 0), ("../../data/b/x.JPEG", 1), ("../../data/a/good.JPEG", 0),
               ("../../data/a/../b/x.JPEG", 1)]
    write_filelist(lists / "l.txt", entries)
    before = _md5s(tmp_path / "deep/data")
    out = tmp_path / "out"
    report = scan.scan_filelist(lists / "l.txt", out, repair=True, workers=1, progress=False)
    assert _md5s(tmp_path / "deep/data") == before
    abs_name = contained_name(str(data / "a/x.JPEG"))
    assert not abs_name.startswith("/") and abs_name.endswith("deep/data/a/x.JPEG")
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.JPEG"))
    assert written == sorted([f"repaired/{abs_name}", "repaired/data/b/x.JPEG", "repaired/data/b/x~1.JPEG"])
    assert report["actions"] == {"kept": 1, "repaired": 3, "dropped": 0}
    clean = read_filelist(out / "l_clean.txt")
    assert all(Path(p).is_file() for p in clean.abspaths())
    assert clean.paths[1:] == ["repaired/data/b/x.JPEG", "../deep/data/a/good.JPEG", "repaired/data/b/x~1.JPEG"]


def _mk(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def test_contained_names_are_deterministic_and_unique():
    assert contained_name("../train/n01/x.JPEG") == "train/n01/x.JPEG"
    assert contained_name("../../a/./b/../x.JPEG") == "a/x.JPEG"
    assert contained_name("/data/in/x.JPEG") == "data/in/x.JPEG"
    assert contained_name("C:\\data\\x.JPEG") == "data/x.JPEG"
    assert contained_names(["../t/x.JPEG", "t/x.JPEG", "/t/x.JPEG", "t/x~1.JPEG"]) == [
        "t/x.JPEG", "t/x~2.JPEG", "t/x~3.JPEG", "t/x~1.JPEG"]
    with pytest.raises(UnsafeWriteError, match="names no file"):
        contained_name("../..")


def test_path_under_refuses_a_symlink_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out/link")
    assert path_under(tmp_path / "out", "../a/b.JPEG") == tmp_path / "out/a/b.JPEG"
    with pytest.raises(UnsafeWriteError, match="symlink inside .* leads out of it"):
        path_under(tmp_path / "out", "link/x.JPEG")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["f.bin"]


# -- refusals: one line naming the path ------------------------------------------------------

def test_scan_refuses_to_write_onto_its_inputs(imagenet_like, tmp_path, capsys):
    root = imagenet_like
    make_filelist.make_filelists(root)
    # the clean list's name is a link to the input list
    out = tmp_path / "o"
    out.mkdir()
    os.symlink(root / "train.txt", out / "train_clean.txt")
    list_md5 = hashlib.md5((root / "train.txt").read_bytes()).hexdigest()
    assert scan.main([str(root / "train.txt"), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: refusing to write {out}/train_clean.txt: it is the file list being scanned "
                   f"({root}/train.txt), an input of this command; choose another --out")
    assert hashlib.md5((root / "train.txt").read_bytes()).hexdigest() == list_md5
    # a list whose images live in OUT/repaired/ (an earlier scan's copies): a repair would replace them
    gray = root / "repaired/train/n02/gray.JPEG"
    Image.new("L", (40, 36), 77).save(_mk(gray), format="JPEG")
    write_filelist(root / "again.txt", [("train/n02/gray.JPEG", 1)])
    before = gray.read_bytes()
    assert scan.main([str(root / "again.txt"), "--root", str(root / "repaired"), "--out", str(root), "--repair",
                      "--no-progress", "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: refusing to write {gray}: it is an image of the list, an input of this command; choose another --out")
    assert gray.read_bytes() == before


def test_make_filelist_and_make_demo_refusals(tmp_path, capsys):
    root = tmp_path / "in"
    _jpeg(root / "train/n01/x.JPEG")
    _jpeg(root / "val/v.JPEG")
    (root / "val.txt").write_text("v.JPEG n01\n")
    assert make_filelist.main([str(root), "--val-labels", str(root / "val.txt")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: refusing to write {root}/val.txt: it is the --val-labels file, an input of this command; "
        f"choose another --out")
    assert (root / "val.txt").read_text() == "v.JPEG n01\n"
    assert make_demo.main(["--out", str(root), "--num-train-per-class", "1", "--num-val-per-class", "1",
                           "--size", "16"]) == 2
    assert "refusing to write the demo into" in capsys.readouterr().err
    assert not (root / "train/circle").exists()


def test_export_refuses_its_source(tmp_path, capsys):
    export = __import__("importlib").import_module("mapet_ds.interop.export")
    src = tmp_path / "best.pt"
    src.write_bytes(b"weights")
    with pytest.raises(UnsafeWriteError, match=f"refusing to write {src}: it is the checkpoint being exported"):
        export.export_timm(src, src)
    tag = tmp_path / "run/checkpoints/step00000010"
    tag.mkdir(parents=True)
    with pytest.raises(UnsafeWriteError, match="it is the checkpoints being exported"):
        export.export_timm(tmp_path / "run", tag / "x.pth")
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_export", REPO / "launch/export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(src), str(src.with_suffix(".json")).replace(".json", ".pt")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: refusing to write {src}: it is the checkpoint")
    assert src.read_bytes() == b"weights"


def test_tokens_cli_refuses_its_inputs(tmp_path):
    _jpeg(tmp_path / "train/a/x.JPEG")
    make_filelist.make_filelists(tmp_path)
    (tmp_path / "cb.pt").write_bytes(b"codebook")
    fit = run_py([REPO / "launch/tokens.py", "fit", "--filelist", "train.txt", "--out", "train.txt", "--k", "2"],
                 cwd=tmp_path, check=False)
    assert fit.returncode == 2 and fit.stderr.strip() == (
        "error: refusing to write train.txt: it is the file list, an input of this command; choose another --out")
    assign = run_py([REPO / "launch/tokens.py", "assign", "--filelist", "train.txt", "--codebook", "cb.pt",
                     "--out", "cb.pt"], cwd=tmp_path, check=False)
    assert assign.returncode == 2 and assign.stderr.strip() == (
        "error: refusing to write into cb.pt: it is the codebook cb.pt (or inside it), an input of this command; "
        "choose another --out")
    assert (tmp_path / "cb.pt").read_bytes() == b"codebook"


def test_run_dir_refuses_the_init_checkpoint_and_inputs(tmp_path):
    from mapet_ds.config import load_config
    from mapet_ds.engine import finetune

    run = tmp_path / "runs/ft"
    (run / "checkpoints/step00000004").mkdir(parents=True)
    cfg_path = tmp_path / "ft.yaml"
    cfg_path.write_text(f"data: {{train_list: t.txt, val_list: v.txt}}\n"
                        f"finetune: {{output_dir: {run}, init: {run}/checkpoints/step00000004}}\n")
    with pytest.raises(UnsafeWriteError, match=f"refusing to write {run}/checkpoints: finetune.init"):
        finetune.build_trainer(load_config(str(cfg_path)), "unused", None)
    cfg_path.write_text(f"data: {{train_list: t.txt, val_list: v.txt}}\nfinetune: {{output_dir: {run}, init: {run}}}\n")
    with pytest.raises(UnsafeWriteError, match=f"refusing to write into {run}: it is finetune.init"):
        finetune.build_trainer(load_config(str(cfg_path)), "unused", None)
    guard = InputGuard().add(run / "metrics.jsonl", "data.train_list")
    with pytest.raises(UnsafeWriteError, match="data.train_list .*metrics.jsonl is there"):
        guard.check_folder(run, ["metrics.jsonl"])


def test_compare_refuses_an_out_holding_its_recipe(tmp_path, capsys):
    import importlib.util

    recipe = tmp_path / "sweep/pretrain/mapet_s0/config.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text("model: {size: tiny}\n")
    spec = importlib.util.spec_from_file_location("launch_compare", REPO / "launch/compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--config", str(recipe), "--out", str(tmp_path / "sweep"), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: refusing to write {tmp_path}/sweep/pretrain: the --config recipe {recipe} is there and would be "
        f"overwritten; choose another --out")


def test_checkpoint_files_never_write_through_a_pre_placed_temp_link(tmp_path):
    """The old fixed names ("<file>.tmp", "complete.json.tmp") followed a link placed there."""
    import torch

    from mapet_ds.engine.checkpoint import _atomic_torch_save

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / "rank00000.pt.tmp").symlink_to(victim)
    _atomic_torch_save({"step": 3}, run / "rank00000.pt")
    assert torch.load(run / "rank00000.pt") == {"step": 3}
    assert victim.read_text() == "keep me"
    assert (run / "rank00000.pt.tmp").is_symlink()  # not ours: left where it was
