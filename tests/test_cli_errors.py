"""engine/errors.run_main: one line for the user's mistakes; for any other error (a ValueError
or RuntimeError from inside a library) the line plus the file holding the full traceback,
and MAPET_DEBUG=1 re-raises."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from mapet_ds.engine import errors
from mapet_ds.engine.cli import USER_ERRORS, run_job
from mapet_ds.pipelines.common import check_batch_size


@pytest.fixture()
def fakelib(tmp_path, monkeypatch):
    """A stand-in for torch/Triton/DeepSpeed: a module outside mapet_ds that raises."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "fakelib.py").write_text(textwrap.dedent('''
        def kernel(x):
            raise ValueError("expected 4D input (got 3D input)")
    '''))
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.delenv("MAPET_DEBUG", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(errors, "_RUN_DIR", None)
    import fakelib

    return fakelib


def _line(capsys) -> str:
    [line] = capsys.readouterr().err.splitlines()
    return line


def test_library_error_points_to_a_traceback_in_the_run_dir(fakelib, tmp_path, capsys):
    run = tmp_path / "runs/a"
    run.mkdir(parents=True)
    errors.set_run_dir(run)
    assert run_job(lambda: fakelib.kernel(1)) == 1
    line = _line(capsys)
    [tb] = list(run.glob("error-*-rank0-*.txt"))
    assert line == (f"error: ValueError: expected 4D input (got 3D input) (not a known input problem: full "
                    f"traceback in {tb}; MAPET_DEBUG=1 prints it here)")
    text = tb.read_text()
    assert "Traceback (most recent call last)" in text and 'fakelib.py", line 3, in kernel' in text
    assert text.rstrip().endswith("ValueError: expected 4D input (got 3D input)")


def test_library_error_without_a_run_dir_goes_to_a_temp_file(fakelib, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(errors.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert run_job(lambda: [1, 2] @ fakelib) == 1  # a TypeError: a bug, not the user's input
    line = _line(capsys)
    [tb] = list((tmp_path / "tmp").glob("error-*.txt"))
    assert line.startswith("error: TypeError: ") and f"full traceback in {tb};" in line
    assert "Traceback" in tb.read_text()


def test_user_mistakes_stay_one_line(fakelib, tmp_path, capsys):
    errors.set_run_dir(tmp_path)
    assert run_job(lambda: check_batch_size(0)) == 2  # a `raise ValueError` check of ours
    assert _line(capsys) == "error: batch_size=0: must be >= 1"
    assert run_job(lambda: open(tmp_path / "nope.txt")) == 2  # noqa: SIM115 (a missing user file)
    assert _line(capsys) == f"error: cannot access {tmp_path / 'nope.txt'}: No such file or directory"
    from mapet_ds.tokenizers.store import TokenStoreError  # any mapet_ds error type, listed or not

    assert TokenStoreError not in USER_ERRORS

    def store():
        raise TokenStoreError("token store tokens/ holds 10 rows, the list 12: re-run launch/tokens.py assign")

    assert run_job(store) == 2 and _line(capsys).startswith("error: token store tokens/ holds 10 rows")
    assert not list(tmp_path.glob("error-*.txt"))  # no traceback file for the user's mistakes


def test_mapet_debug_reraises(fakelib, monkeypatch):
    monkeypatch.setenv("MAPET_DEBUG", "1")
    with pytest.raises(ValueError, match="expected 4D input"):
        run_job(lambda: fakelib.kernel(1))
    with pytest.raises(ValueError, match="batch_size=0"):
        run_job(lambda: check_batch_size(0))


def test_process_exit_codes_and_debug_traceback(tmp_path):
    """A real process: exit code 1 + the one line; MAPET_DEBUG=1 prints the traceback."""
    (tmp_path / "fakelib.py").write_text("def kernel():\n    raise RuntimeError('CUDA error: an illegal memory access')\n")
    code = ("import sys, fakelib; from mapet_ds.engine.errors import run_main; "
            "sys.exit(run_main(fakelib.kernel, ()))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), TMPDIR=str(tmp_path))
    env.pop("MAPET_DEBUG", None)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    [line] = p.stderr.splitlines()
    assert line.startswith("error: RuntimeError: CUDA error: an illegal memory access (not a known input problem")
    path = line.split("full traceback in ")[1].split(";")[0]
    assert "in kernel" in open(path).read()
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(env, MAPET_DEBUG="1"),
                       capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback (most recent call last)" in p.stderr and "in kernel" in p.stderr
