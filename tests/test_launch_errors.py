"""Data errors end a launch with one `error:` line and a non-zero exit: no traceback, and one
line per job however many ranks hit it (real deepspeed launcher, 2 CPU ranks, gloo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port, run_py

from mapet_ds.engine import errors

PRETRAIN = REPO / "launch/pretrain.py"
ZERO2 = REPO / "ds_configs/zero2.json"



def _two_ranks(ws, *overrides):
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return subprocess.run(
        [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(PRETRAIN), "--ds_config", str(ZERO2),
         "--config", "pretrain.yaml", "pretrain.output_dir=runs/err", "pretrain.max_steps=12", *overrides],
        cwd=ws, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error")]


@pytest.fixture()
def ws(demo_workspace, tmp_path):
    """A private copy of the demo workspace (lists, images, token store) to break."""
    dst = tmp_path / "ws"
    shutil.copytree(demo_workspace, dst, ignore=shutil.ignore_patterns("runs", "vis"))
    return dst


def test_store_rows_not_matching_the_list_one_line_for_two_ranks(ws):
    lines = (ws / "data/train.txt").read_text().splitlines()
    (ws / "data/short.txt").write_text("\n".join(lines[:-1]) + "\n")
    proc = _two_ranks(ws, "data.train_list=data/short.txt")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    # every rank sees it: printed once, by rank 0, without a rank prefix
    assert _error_lines(proc.stderr) == [
        f"error: token store tokens has {len(lines)} rows but file list data/short.txt has {len(lines) - 1} images; "
        f"re-run `launch/tokens.py assign` for this file list and tokenizer into a new --out"]


def test_truncated_jpeg_in_an_unscanned_list_one_line_for_two_ranks(ws):
    rel = (ws / "data/train.txt").read_text().splitlines()[0].split("\t")[0]
    img = ws / "data" / rel
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    proc = _two_ranks(ws)  # 12 steps of 16 cover the 160-image epoch: the file is read
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    [line] = _error_lines(proc.stderr)  # the rank that read the file says so; its peer stays silent
    assert line.startswith(("error: DALI pipeline over data/train.txt failed: ",
                            "error: [rank 1] DALI pipeline over data/train.txt failed: "))
    assert rel in line and line.endswith("(run data/scan.py data/train.txt --out <dir> to drop or repair broken "
                                         "files, then use its clean list)")


def test_missing_and_unreadable_inputs_one_line(ws):
    proc = run_py([PRETRAIN, "--config", "pretrain.yaml", "data.train_list=data/nope.txt"], cwd=ws, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _error_lines(proc.stderr) == [
        "error: file list data/nope.txt does not exist (make one with data/make_filelist.py)"]
    (ws / "data/latin1.txt").write_bytes("caf\xe9.JPEG\t0\n".encode("latin-1"))
    proc = run_py([PRETRAIN, "--config", "pretrain.yaml", "data.train_list=data/latin1.txt"], cwd=ws, check=False)
    assert proc.returncode == 2 and _error_lines(proc.stderr) == [
        "error: file list data/latin1.txt is not UTF-8 text (invalid continuation byte): re-write it with "
        "data/make_filelist.py"]
    err = PermissionError(13, "Permission denied")
    err.filename = "data/train.txt"
    assert errors.describe(err) == "cannot access data/train.txt: Permission denied"


def test_report_error_once_per_job(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(errors, "RANK_ZERO_HEAD_START_S", 0.0)
    monkeypatch.setattr(errors.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setenv("RANK", "0")
    assert not errors.peer_failed()
    assert errors.report_error("bad list\n  (details)")
    monkeypatch.setenv("RANK", "1")
    assert not errors.report_error("bad list (details)")  # rank 0 said it already
    assert errors.report_error("only rank 1 saw this")
    assert capsys.readouterr().err.splitlines() == ["error: bad list (details)", "error: [rank 1] only rank 1 saw this"]
    # a rank whose collective broke because a peer failed stays silent, exit code 2
    assert errors.peer_failed()

    def broken():
        raise RuntimeError("Connection closed by peer")

    assert errors.run_main(broken, (ValueError,)) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MAPET_DEBUG", "1")
    with pytest.raises(RuntimeError):  # alone, with MAPET_DEBUG=1, an unexpected error keeps its traceback
        errors.run_main(broken, (ValueError,))
