"""The data tools against hostile and careless input (issue 21): every test writes its own nasty
files (glob-character paths, pre-placed symlinks, decompression bombs, FIFOs, 32-bit TIFFs,
undecodable names, ...) and checks that nothing outside the tool's own outputs is touched, and
that a bad input ends in one ``error:`` line (exit code 2) or a reported bad image, never a
traceback or a hang."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, load_data_tool, run_py
from PIL import Image

from mapet_ds.filelist import FileList, read_filelist

scan = load_data_tool("scan")
make_filelist = load_data_tool("make_filelist")
make_shards = load_data_tool("make_shards")


def _jpeg(path: Path, colour=(120, 30, 200), size=(40, 36), mode="RGB", fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path, format=fmt)
    return path


def _dataset(tmp_path: Path, n: int = 4) -> Path:
    """tmp_path/ds/train/{a,b}/x<i>.JPEG and its lists; -> the train list."""
    root = tmp_path / "ds"
    for i in range(n):
        _jpeg(root / f"train/{'ab'[i % 2]}/x{i}.JPEG", colour=(40 * i, 90, 200 - 30 * i))
    make_filelist.make_filelists(root)
    return root / "train.txt"


def _tree(folder: Path) -> dict[str, str]:
    """relative path -> md5 (or 'link -> target') of everything under ``folder``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for f in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, folder)
            out[rel] = f"link -> {os.readlink(p)}" if os.path.islink(p) else hashlib.md5(Path(p).read_bytes()).hexdigest()
    return out


def _one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 JPEG whose SOF0 header claims ``width`` x ``height`` (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# -- 1. globs over user paths -------------------------------------------------------------------

def test_glob_characters_in_out_never_touch_another_folder(tmp_path):
    lst = _dataset(tmp_path)
    victim = tmp_path / "g1"
    victim.mkdir()
    for name in ("keep.tmp1", "shard-000000.tar.tmp7", "progress.tmp"):
        (victim / name).write_text("someone else's")
    before = _tree(victim)
    out = tmp_path / "g[1]"
    assert make_shards.main([str(lst), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert _tree(victim) == before  # the leftover-temp cleanup globbed "g[1]/*.tmp*" = g1/*.tmp*
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 4


class _FakeTokenizer:
    input_size, grid, vocab_size, device = 8, 2, 5, torch.device("cpu")

    def spec(self):
        return {"kind": "fake"}

    def tokenize(self, images):  # uint8 [B,3,8,8] -> [B,4]
        return images[:, 0, ::4, ::4].reshape(len(images), 4).long() % 5


def _fake_loader(fl, *, size, batch_size, **_):
    for s in range(0, len(fl), batch_size):
        ids = torch.arange(s, min(s + batch_size, len(fl)))
        yield {"images": ids.view(-1, 1, 1, 1).expand(-1, 3, size, size).to(torch.uint8), "sample_ids": ids}


def test_token_store_with_glob_characters_leaves_other_stores_alone_and_completes(tmp_path):
    from mapet_ds.tokenizers.store import assign_tokens

    fl = FileList(tmp_path / "train.txt", tmp_path, [f"img{i}.jpg" for i in range(10)], [0] * 10)
    victim = tmp_path / "t1"
    (victim / "progress").mkdir(parents=True)
    for c in range(3):
        (victim / "progress" / f"chunk_{c:06d}.json").write_text("{}")
    before = _tree(victim)
    store = assign_tokens(fl, _FakeTokenizer(), tmp_path / "t[1]", batch_size=4, chunk_size=4, loader=_fake_loader,
                          progress=False)
    assert _tree(victim) == before
    assert store.complete and json.loads((tmp_path / "t[1]" / "meta.json").read_text())["complete"]
    assert sorted(os.listdir(tmp_path / "t[1]" / "progress")) == [f"chunk_{c:06d}.json" for c in range(3)]


# -- 2. a symlinked OUT/repaired ----------------------------------------------------------------

def test_scan_repair_refuses_a_symlinked_repaired_folder(tmp_path, capsys):
    lst = _dataset(tmp_path)
    _jpeg(lst.parent / "train/a/x0.JPEG", mode="CMYK")  # needs a repair
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "repaired").symlink_to(elsewhere)
    assert scan.main([str(lst), "--out", str(out), "--repair", "--workers", "1", "--no-progress"]) == 2
    err = _one_error(capsys.readouterr().err)
    assert "repaired" in err and "leads out of it" in err
    assert os.listdir(elsewhere) == []


# -- 3. temporary files are created exclusively --------------------------------------------------

def test_atomic_write_never_follows_a_pre_placed_temp_link(tmp_path):
    from mapet_ds.safe_io import atomic_write_text, is_temp_of, temp_file

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.txt"
    # the name the old atomic_write used, and a few that look like the new ones
    for name in (f".out.txt.tmp{os.getpid()}", ".out.txt.aaaaaaaa.tmp"):
        (tmp_path / name).symlink_to(victim)
    atomic_write_text(out, "new")
    assert victim.read_text() == "precious" and out.read_text() == "new" and not out.is_symlink()
    assert (tmp_path / f".out.txt.tmp{os.getpid()}").is_symlink()  # not ours: left alone
    t = temp_file(out)
    assert is_temp_of(t.name, r"out\.txt") and t.stat().st_size == 0 and not t.is_symlink()
    assert not is_temp_of("out.txt.tmp1", r"out\.txt") and not is_temp_of(".out.txt.aaaaaaaa.tmp", r"x")


def test_scan_writes_through_no_pre_placed_link_onto_its_list(tmp_path):
    lst = _dataset(tmp_path)
    list_bytes = lst.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        (out / f".train_clean.txt.tmp{pid}").symlink_to(lst)
        (out / f".train_scan.json.tmp{pid}").symlink_to(lst)
    assert scan.main([str(lst), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert lst.read_bytes() == list_bytes
    assert len(read_filelist(out / "train_clean.txt")) == 4


# -- 4. outputs checked against every input -------------------------------------------------------

def test_tokens_assign_refuses_a_listed_image_named_like_its_outputs(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "tokens.npy").write_bytes(b"an image, oddly named")
    (tmp_path / "train.txt").write_text("store/tokens.npy\t0\n")
    (tmp_path / "cb.pt").write_bytes(b"codebook")
    p = run_py([REPO / "launch/tokens.py", "assign", "--filelist", "train.txt", "--codebook", "cb.pt",
                "--out", "store"], cwd=tmp_path, check=False)
    assert p.returncode == 2
    assert _one_error(p.stderr) == ("error: refusing to write store/tokens.npy: it is an image of the list, an input "
                                    "of this command; choose another --out")
    assert (store / "tokens.npy").read_bytes() == b"an image, oddly named"


def test_make_shards_refuses_an_out_holding_its_inputs(tmp_path, capsys):
    lst = _dataset(tmp_path)
    assert make_shards.main([str(lst), "--out", str(lst.parent / "train.txt"), "--no-progress"]) == 2
    assert "refusing to write into" in _one_error(capsys.readouterr().err)
    images = _tree(lst.parent / "train")
    assert make_shards.main([str(lst), "--out", str(lst.parent / "train" / "a"), "--no-progress"]) == 2
    assert "choose an empty folder" in _one_error(capsys.readouterr().err)
    assert _tree(lst.parent / "train") == images


# -- 7. decompression bombs -----------------------------------------------------------------------

def test_bombs_are_reported_bad_images_not_tracebacks(tmp_path, capsys):
    lst = _dataset(tmp_path)
    root = lst.parent
    (root / "train/a/x0.JPEG").write_bytes(_jpeg_claiming(60000, 60000))  # 779 bytes, 3.6 Gpx: PIL's error
    (root / "train/b/x1.JPEG").write_bytes(_jpeg_claiming(12000, 10000))  # 120 Mpx: over our cap only
    assert len((root / "train/a/x0.JPEG").read_bytes()) < 1000
    out = tmp_path / "scan"
    assert scan.main([str(lst), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    report = json.loads((out / "train_scan.json").read_text())
    assert {p["path"]: (p["issues"], p["action"]) for p in report["problems"]} == {
        "train/a/x0.JPEG": (["too_large"], "dropped"), "train/b/x1.JPEG": (["too_large"], "dropped")}
    assert "--max-pixels" in report["problems"][0]["detail"]
    assert len(read_filelist(out / "train_clean.txt")) == 2
    # the cap is configurable: 40x36 images are over a cap of 1000 pixels
    assert scan.check_image(str(root / "train/a/x2.JPEG"), max_pixels=1000)["issues"] == ["too_large"]
    assert scan.check_image(str(root / "train/a/x2.JPEG"))["issues"] == []

    shards = tmp_path / "shards"
    assert make_shards.main([str(lst), "--out", str(shards), "--workers", "1", "--no-progress"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and {d["path"] for d in manifest["dropped"]} == {"train/a/x0.JPEG",
                                                                                         "train/b/x1.JPEG"}
    assert not [n for n in os.listdir(shards) if "tmp" in n]


# -- 8. FIFOs, devices, folders named like images --------------------------------------------------

def test_only_regular_files_are_images_no_hang(tmp_path):
    lst = _dataset(tmp_path)
    root = lst.parent
    os.mkfifo(root / "train/a/fifo.JPEG")
    (root / "train/b/zero.JPEG").symlink_to("/dev/zero")
    (root / "train/b/dir.JPEG").mkdir()
    lst.write_text(lst.read_text() + "train/a/fifo.JPEG\t0\ntrain/b/zero.JPEG\t1\ntrain/b/dir.JPEG\t1\n")
    # a subprocess with a timeout: a regression hangs (FIFO) or eats all memory (/dev/zero) there, not here
    p = run_py([REPO / "data/scan.py", lst, "--out", tmp_path / "scan", "--workers", "1", "--no-progress"],
               cwd=tmp_path, timeout=120)
    report = json.loads((tmp_path / "scan/train_scan.json").read_text())
    assert {q["path"]: (q["issues"], q["detail"]) for q in report["problems"]} == {
        "train/a/fifo.JPEG": (["not_a_file"], "not a regular file (a FIFO)"),
        "train/b/zero.JPEG": (["not_a_file"], "not a regular file (a character device)"),
        "train/b/dir.JPEG": (["not_a_file"], "not a regular file (a directory)")}, p.stdout
    run_py([REPO / "data/make_shards.py", lst, "--out", tmp_path / "shards", "--workers", "1", "--no-progress"],
           cwd=tmp_path, timeout=120)
    manifest = json.loads((tmp_path / "shards/manifest.json").read_text())
    assert manifest["num_samples"] == 4 and len(manifest["dropped"]) == 3
    # --no-check still reads only regular files, with the size cap
    run_py([REPO / "data/make_shards.py", lst, "--out", tmp_path / "shards2", "--workers", "1", "--no-progress",
            "--no-check"], cwd=tmp_path, timeout=120)
    assert json.loads((tmp_path / "shards2/manifest.json").read_text())["num_dropped"] == 3
    big = root / "train/a/x2.JPEG"
    assert scan.check_image(str(big), max_bytes=100)["issues"] == ["too_large"]


# -- 9. one error line, nothing half-written -------------------------------------------------------

def test_out_that_is_a_file_or_a_dangling_link_is_one_error_line(tmp_path, capsys):
    lst = _dataset(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for out in (afile, dangling):
        for tool, argv in ((scan, [str(lst), "--out", str(out), "--no-progress"]),
                           (make_filelist, [str(lst.parent), "--out", str(out)]),
                           (make_shards, [str(lst), "--out", str(out), "--no-progress"])):
            assert tool.main(argv) == 2, (tool, out)
            err = _one_error(capsys.readouterr().err)
            assert str(out) in err and ("is a file, not a folder" in err or "dangling symlink" in err), err
    assert afile.read_text() == "mine" and not (tmp_path / "nowhere").exists()
    # --out = the list itself: the refusal names it
    assert scan.main([str(lst), "--out", str(lst), "--no-progress"]) == 2
    assert _one_error(capsys.readouterr().err).startswith(f"error: refusing to write into {lst}: it is the file list")


def test_undecodable_names_and_bad_label_files_are_one_error_line(tmp_path, capsys):
    root = tmp_path / "ds"
    _jpeg(root / "train/a/ok.JPEG")
    bad = os.path.join(os.fsencode(root / "train/a"), b"bad\xff.JPEG")
    with open(bad, "wb") as f:
        f.write((root / "train/a/ok.JPEG").read_bytes())
    assert make_filelist.main([str(root)]) == 2
    err = _one_error(capsys.readouterr().err)
    assert "bad\\xff.JPEG" in err and "not valid UTF-8" in err and "rename" in err
    assert not (root / "train.txt").exists() and not [n for n in os.listdir(root) if "tmp" in n]
    os.remove(bad)

    _jpeg(root / "val/v1.JPEG")
    labels = tmp_path / "labels.txt"
    for setup, words in ((lambda: None, "missing"),
                         (lambda: labels.mkdir(), "a folder"),
                         (lambda: (labels.rmdir(), labels.write_bytes("v1.JPEG caf\xe9\n".encode("latin-1"))),
                          "not UTF-8")):
        setup()
        assert make_filelist.main([str(root), "--val-labels", str(labels)]) == 2
        err = _one_error(capsys.readouterr().err)
        assert str(labels) in err and words in err, err


def test_absurd_class_index_is_refused_before_anything_is_written(tmp_path, capsys):
    lst = _dataset(tmp_path)
    lines = lst.read_text().splitlines()
    lines[2] = lines[2].split("\t")[0] + "\t99999999999999999999"
    lst.write_text("\n".join(lines) + "\n")
    assert scan.main([str(lst), "--out", str(tmp_path / "scan"), "--no-progress"]) == 2
    assert _one_error(capsys.readouterr().err) == (
        f"error: {lst}:3: class index 99999999999999999999 is absurd (over 2147483647): class indices are "
        f"0..num_classes-1; fix the line or remake the list")
    out = tmp_path / "shards"
    assert make_shards.main([str(lst), "--out", str(out), "--no-progress"]) == 2
    assert "class index 99999999999999999999 is absurd" in _one_error(capsys.readouterr().err)
    assert not out.exists()


# -- 10. a killed run's temporaries ----------------------------------------------------------------

def test_rerun_removes_its_own_killed_temps_only(tmp_path):
    lst = _dataset(tmp_path)
    out = tmp_path / "shards"
    assert make_shards.main([str(lst), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    done = _tree(out)
    # what a SIGKILL leaves (temps of markers, shards, manifest; old and new names), and a user's files
    own = [out / "progress/.shard-000000.json.k2j4h5g6.tmp", out / ".shard-000000.tar.a1b2c3d4.tmp",
           out / ".manifest.json.zz99xx77.tmp", out / "progress/shard-000000.json.tmp4242",
           out / "shard-000000.idx.tmp17"]
    theirs = [out / "notes.tmp", out / "progress/mine.json.tmp", out / ".shard-000000.tar.TOOLONGNAME.tmp"]
    for p in own + theirs:
        p.write_text("x")
    assert make_shards.main([str(lst), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert not any(p.exists() for p in own)
    assert all(p.read_text() == "x" for p in theirs)
    after = _tree(out)
    for p in theirs:
        del after[str(p.relative_to(out))]
    assert after == done  # and the shards are byte-identical


# -- 5. the README flow keeps repaired images ------------------------------------------------------

def _int32_tiff(path: Path, size=(40, 36)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.arange(size[0] * size[1], dtype=np.int32).reshape(size[1], size[0]) * 1000
    Image.fromarray(arr, mode="I").save(path, format="TIFF")
    return path


def test_readme_flow_scan_repair_tokens_shards_drops_nothing(tmp_path):
    pytest.importorskip("nvidia.dali")
    from mapet_ds.tokenizers.store import assign_tokens

    root = tmp_path / "ds"
    for i in range(4):
        _jpeg(root / f"train/a/ok{i}.JPEG", colour=(50 * i, 60, 70))
    _jpeg(root / "train/a/gray.png", mode="L", fmt="PNG")          # grayscale: --repair converts
    _jpeg(root / "train/b/cmyk.JPEG", mode="CMYK")                  # CMYK JPEG: repaired under its own name
    _jpeg(root / "train/b/png_data.JPEG", fmt="PNG")               # PNG behind a .JPEG name
    _jpeg(root / "train/b/jpeg_data.png")                          # JPEG behind a .png name
    _int32_tiff(root / "train/b/int32.tif")                          # PIL opens it, DALI does not
    make_filelist.make_filelists(root)
    out = tmp_path / "clean"
    assert scan.main([str(root / "train.txt"), "--out", str(out), "--repair", "--workers", "1", "--no-progress"]) == 0
    clean = read_filelist(out / "train_clean.txt")
    assert len(clean) == 9
    repaired = sorted(p for p in clean.paths if p.startswith("repaired/"))
    assert repaired == ["repaired/train/a/gray.png.jpg", "repaired/train/b/cmyk.JPEG",
                        "repaired/train/b/int32.tif.jpg", "repaired/train/b/jpeg_data.png.jpg",
                        "repaired/train/b/png_data.JPEG"]
    # scanning the clean list again finds nothing to drop
    again = scan.scan_filelist(out / "train_clean.txt", tmp_path / "again", workers=1, progress=False)
    assert again["actions"]["dropped"] == 0 and again["num_clean"] == 9
    store = assign_tokens(clean, _FakeTokenizer(), tmp_path / "tokens", batch_size=4, num_threads=1, progress=False)
    assert store.complete
    shards = tmp_path / "shards"
    assert make_shards.main([str(out / "train_clean.txt"), "--token-store", str(tmp_path / "tokens"), "--out",
                             str(shards), "--workers", "1", "--no-progress"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_dropped"] == 0 and manifest["num_samples"] == 9


# -- 6. the scan's rule is "DALI decodes it" --------------------------------------------------------

def test_32bit_and_float_tiffs_are_unsupported_not_grayscale_kept(tmp_path):
    lst = _dataset(tmp_path)
    root = lst.parent
    _int32_tiff(root / "train/a/int32.tif")
    Image.fromarray(np.linspace(0, 1, 40 * 36, dtype=np.float32).reshape(36, 40), mode="F").save(
        root / "train/b/float.tif", format="TIFF")
    Image.new("1", (40, 36), 1).save(root / "train/b/bilevel.tif", format="TIFF")
    make_filelist.make_filelists(root)
    report = scan.scan_filelist(root / "train.txt", tmp_path / "scan", workers=1, progress=False)
    got = {p["path"]: (p["issues"], p["action"]) for p in report["problems"]}
    assert got == {"train/a/int32.tif": (["unsupported", "grayscale"], "dropped"),
                   "train/b/float.tif": (["unsupported", "grayscale"], "dropped"),
                   "train/b/bilevel.tif": (["unsupported", "grayscale"], "dropped")}
    assert "TIFF in PIL mode I," in next(p["detail"] for p in report["problems"] if p["path"].endswith("int32.tif"))
    shards = tmp_path / "shards"
    assert make_shards.main([str(root / "train.txt"), "--out", str(shards), "--workers", "1", "--no-progress"]) == 0
    assert json.loads((shards / "manifest.json").read_text())["num_dropped"] == 3


# -- 11, 12. a DALI failure names the sample it failed on ------------------------------------------

def _list_with(tmp_path: Path, bad: dict[int, Path], n: int = 30) -> Path:
    """n lines of good JPEGs, with the files of ``bad`` (1-based line -> file) in between."""
    lines = []
    for line in range(1, n + 1):
        if line in bad:
            lines.append(f"{bad[line].name}\t0")
        else:
            _jpeg(tmp_path / f"ok{line}.jpg", colour=(line * 8, 100, 50))
            lines.append(f"ok{line}.jpg\t0")
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst


def test_dali_failure_names_the_first_file_dali_cannot_decode(tmp_path):
    pytest.importorskip("nvidia.dali")
    from mapet_ds.pipelines import PipelineRunError, eval_loader

    int32 = _int32_tiff(tmp_path / "int32.tif")
    text = tmp_path / "text.JPEG"
    text.write_text("not an image\n" * 20)
    for bad, where in (({17: int32, 26: text}, "17: int32.tif"), ({17: int32}, "17: int32.tif")):
        lst = _list_with(tmp_path, bad)
        with pytest.raises(PipelineRunError) as e:
            for _ in eval_loader(lst, img_size=16, batch_size=8, shard_id=0, num_shards=1, device="cpu"):
                pass
        msg = str(e.value)
        assert f"; {lst}:{where}: DALI cannot decode it (TIFF in PIL mode I" in msg, msg
        assert "text.JPEG" not in msg and msg.endswith(f"(run data/scan.py {lst} --out <dir> to drop or repair "
                                                       f"broken files, then use its clean list)")


def test_shard_loader_failure_names_shard_and_sample_and_a_hint_that_works(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    from mapet_ds.pipelines import PipelineRunError
    from mapet_ds.pipelines.shards import eval_shard_loader

    lst = _list_with(tmp_path, {5: _int32_tiff(tmp_path / "int32.tif")}, n=12)
    shards = tmp_path / "shards"
    assert make_shards.main([str(lst), "--out", str(shards), "--no-check", "--workers", "1", "--no-progress"]) == 0
    with pytest.raises(PipelineRunError) as e:
        for _ in eval_shard_loader(shards, img_size=16, batch_size=4, shard_id=0, num_shards=1, device="cpu"):
            pass
    msg = str(e.value)
    assert f"; {shards / 'shard-000000.tar'}: sample 000000004 (000000004.tif, sample id 4): DALI cannot decode it " \
           f"(TIFF in PIL mode I" in msg, msg
    assert msg.endswith(f"(run data/scan.py --shards {shards} to list its broken samples, then make the shards again "
                        f"with data/make_shards.py (its image check on, i.e. without --no-check))")
    capsys.readouterr()
    assert scan.main(["--shards", str(shards), "--no-progress"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{shards / 'shard-000000.tar'}: 000000004.tif, sample id 4: unsupported: "
                             f"TIFF in PIL mode I")
    assert out[-1].startswith(f"12 samples in {shards}: 1 broken")


# -- 13. small things --------------------------------------------------------------------------------

def test_bom_fit_out_folder_and_error_lines_after_progress_bars(tmp_path, capsys):
    from tqdm import tqdm

    from mapet_ds.safe_io import print_error

    lst = _dataset(tmp_path)
    lst.write_bytes(b"\xef\xbb\xbf" + lst.read_bytes())  # a UTF-8 byte-order mark
    fl = read_filelist(lst)
    assert fl.paths[0] == "train/a/x0.JPEG"
    fl.check_exists()

    (tmp_path / "cbdir").mkdir()
    p = run_py([REPO / "launch/tokens.py", "fit", "--filelist", lst, "--out", tmp_path / "cbdir", "--k", "2"],
               cwd=tmp_path, check=False)
    assert p.returncode == 2 and _one_error(p.stderr) == (
        f"error: --out {tmp_path / 'cbdir'} is a folder: --out names the codebook file to write, e.g. "
        f"{tmp_path / 'cbdir' / 'codebook.pt'}")
    assert os.listdir(tmp_path / "cbdir") == []

    bar = tqdm(total=10, desc="scan", file=sys.stderr)
    bar.update(3)  # a failure in the middle of a loop: the bar is still open
    print_error("something broke")
    err = capsys.readouterr().err
    assert "\nerror: something broke\n" in err and "\rerror" not in err


# -- fuzz: the scan's check against mutated images of every format PIL writes -----------------------

_FUZZ_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif", "GIF": ".gif",
                 "PPM": ".ppm", "TGA": ".tga", "ICO": ".ico", "JPEG2000": ".jp2", "PCX": ".pcx", "SGI": ".sgi"}
_FUZZ_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F")


def _encodings(rng) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every (format, mode) PIL writes, from one small random image."""
    base = Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8))
    out = []
    for fmt, ext in _FUZZ_FORMATS.items():
        for mode in _FUZZ_MODES:
            buf = io.BytesIO()
            try:
                img = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 200), "I;16") if mode == "I;16" \
                    else base.convert(mode)
                img.save(buf, format=fmt)
            except Exception:  # noqa: BLE001 - PIL cannot write this mode in this format
                continue
            out.append((f"{fmt.lower()}_{mode.replace(';', '')}{ext}", buf.getvalue()))
    return out


def _mutate(data: bytes, rng) -> bytes:
    b = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:  # flip a few bytes (headers are in the first 64)
        for i in rng.integers(0, min(len(b), 64 if rng.random() < 0.5 else len(b)), size=rng.integers(1, 4)):
            b[i] = int(rng.integers(256))
    elif kind == 1:  # truncate
        b = b[:int(rng.integers(1, len(b)))]
    elif kind == 2:  # insert junk
        i = int(rng.integers(len(b)))
        b[i:i] = rng.integers(0, 256, size=int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
    else:  # overwrite a run with large values (sizes, counts, offsets)
        i = int(rng.integers(min(len(b), 48)))
        b[i:i + 4] = b"\xff\xff\x7f\xff"
    return bytes(b)


def test_fuzz_scan_check_never_raises_and_keeps_only_what_dali_decodes():
    pytest.importorskip("nvidia.dali")
    from mapet_ds.images import DaliProbe

    rng = np.random.default_rng(21)
    encodings = _encodings(rng)
    assert {name.split("_")[0] for name, _ in encodings} >= {"jpeg", "png", "bmp", "webp", "tiff", "gif"}
    # every encoding unmutated, then mutated copies: a few hundred files in all
    cases = list(encodings) + [(name, _mutate(data, rng)) for _ in range(4) for name, data in encodings]
    assert len(cases) >= 300
    probe = DaliProbe()
    kept, refused_by_dali = 0, []
    for name, data in cases:
        info = scan.check_bytes(data, name, min_size=1)  # must not raise, whatever the bytes
        if any(i in scan.DROP or i in scan.CONVERT for i in info["issues"]):
            continue
        kept += 1
        err = probe.error(data)
        if err is not None:
            refused_by_dali.append((name, info["format"], info["mode"], err))
    assert refused_by_dali == []
    assert kept >= 50  # the check keeps the good ones (not a check that drops everything)
