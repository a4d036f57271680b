"""bench/gpu_check.py: its CPU smoke runs every part's code path, so the GPU check cannot rot.

The compile part is left out here (inductor builds C++ for ~1 min on a small CPU box);
tests/test_models_compile.py covers compiled == eager.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig

import pytest
from conftest import REPO, run_py

PARTS = ["dali", "step", "ckpt", "kmeans", "clip", "resume"]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench/gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_library_is_a_skip_with_its_name(monkeypatch):
    gc = _gpu_check()
    with pytest.raises(gc.Skip, match=r"^no_such_module_xyz not installed$"):
        gc.need("json", "no_such_module_xyz")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nvidia.dali" else real(name, *a))
    with pytest.raises(gc.Skip, match=r"^DALI \(nvidia-dali\) not installed$"):
        gc.need("torch", "nvidia.dali")


def test_cpu_smoke_reports_every_part(tmp_path):
    proc = run_py([REPO / "bench/gpu_check.py", "--parts", ",".join(PARTS), "--budget", "1500"], cwd=tmp_path,
                  timeout=1800)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["ok"] is True and res["cuda"] is False and res["benchmark"] == "gpu_check"
    parts = res["parts"]
    assert list(parts) == PARTS
    for name, p in parts.items():
        assert p["status"] == "ok", (name, p)
        assert p["seconds"] > 0 and p["summary"]
    assert parts["dali"]["dali_pretrain_img_s"] > 0 and parts["dali"]["torchvision_eval_img_s"] > 0
    step = parts["step"]
    assert set(step["configs"]) == {"mapet/sdpa", "mapet/flex", "pet/sdpa", "pet/flex", "mim/sdpa"}
    for c in step["configs"].values():
        assert c["img_s"] > 0 and c["precision"] == "fp32" and c["loss"] > 0 and "mfu" not in c  # no CPU peak
    # flex trains through the same mask: the first steps' loss equals sdpa's (same seed, same plans)
    assert step["configs"]["mapet/flex"]["loss"] == pytest.approx(step["configs"]["mapet/sdpa"]["loss"], abs=1e-5)
    assert step["mapet_flex_over_sdpa_time"] > 0 and step["mapet_over_mim_flops"] > 1
    assert parts["ckpt"]["on"]["loss"] == pytest.approx(parts["ckpt"]["off"]["loss"], abs=1e-6)
    assert parts["kmeans"]["cpu_s_per_iter"] > 0 and parts["kmeans"]["gpu_skipped"] == "no CUDA"
    assert parts["clip"]["ids_shape"] == [2, 196] and parts["clip"]["img_s"] > 0
    r = parts["resume"]
    assert r["kill_returncode"] == -9 and r["resumed_from_step"] == 4
    assert r["max_loss_diff_after_resume"] == 0.0  # fp32 CPU: exact resume
    assert "part     status" in proc.stdout  # the readable table


def test_classify_skips_missing_libraries_and_fails_missing_own_code():
    gc = _gpu_check()
    assert gc.classify(ModuleNotFoundError("No module named 'hjson'", name="hjson")) == {
        "status": "skipped", "reason": "hjson not installed (ModuleNotFoundError)"}
    assert gc.classify(ModuleNotFoundError("No module named 'nvidia.dali'", name="nvidia.dali"))["status"] == "skipped"
    own = gc.classify(ModuleNotFoundError("No module named 'mapet_ds'", name="mapet_ds"))
    assert own["status"] == "failed" and "No module named 'mapet_ds'" in own["reason"]
    assert gc.classify(ModuleNotFoundError("x", name="mapet_ds.engine.gone"))["status"] == "failed"
    assert gc.classify(ValueError("bad shape"))["status"] == "failed"
    # the compiled sweep also runs flex + compile + activation checkpointing (CUDA only)
    assert ("mapet", "flex", True) in gc._configs(True) and all(not c[2] for c in gc._configs(False))


def _no_install_env(extra_path=()) -> dict:
    """An environment where only what is on PYTHONPATH imports: run with ``python -S`` the
    venv's site-packages is a plain path entry, so its .pth files (the editable mapet_ds
    finder among them) are never executed."""
    site_packages = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_path), site_packages])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_runs_from_a_plain_checkout_without_an_install(tmp_path):
    """bench/gpu_check.py from a copy of the tree, in a Python where mapet_ds is not
    installed: its parts import the copy; a library missing on the node (hjson, which
    deepspeed imports) makes the parts that need it ``skipped`` with the module's name."""
    tree = tmp_path / "checkout"
    for part in ("mapet_ds", "bench", "ds_configs", "launch", "data"):
        shutil.copytree(REPO / part, tree / part, ignore=shutil.ignore_patterns("__pycache__", "*.png"))
    blocked = tmp_path / "blocked"  # deepspeed is present, its dependency hjson is not
    (blocked / "hjson").mkdir(parents=True)
    (blocked / "hjson/__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'hjson'\", name='hjson')\n")
    env = _no_install_env([blocked])
    probe = subprocess.run([sys.executable, "-S", "-c", "import mapet_ds"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'mapet_ds'" in probe.stderr  # genuinely not installed

    proc = subprocess.run([sys.executable, "-S", tree / "bench/gpu_check.py", "--parts", "kmeans,step",
                           "--budget", "300"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert res["ok"] is True and res["complete"] is True and res["code"] == str(tree)
    km = res["parts"]["kmeans"]
    assert km["status"] == "ok" and km["cpu_s_per_iter"] > 0
    # one restart is timed: faiss records niter iterations per fit, not nredo * niter
    assert km["nredo"] == 1 and km["iterations_per_fit"] == [km["niter"]]
    assert res["parts"]["step"] == {"status": "skipped", "reason": "hjson not installed (ModuleNotFoundError)",
                                    "seconds": res["parts"]["step"]["seconds"]}


def test_sigterm_prints_what_finished(tmp_path):
    """A real SIGTERM while a part runs (its tools running as subprocesses): the finished
    part's result and the stopped part are the last JSON line, and the exit code says it was
    stopped."""
    proc = subprocess.Popen([sys.executable, REPO / "bench/gpu_check.py", "--parts", "kmeans,resume",
                             "--budget", "600"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    try:
        for line in proc.stdout:  # stop it once resume (~40 s) has started, after kmeans finished
            lines.append(line)
            if line.startswith("  resume   running"):
                proc.send_signal(signal.SIGTERM)
                break
        lines += proc.stdout.read().splitlines(keepends=True)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    res = json.loads(lines[-1])
    assert rc == 128 + signal.SIGTERM
    assert res["complete"] is False and res["ok"] is False
    assert res["parts"]["kmeans"]["status"] == "ok" and res["parts"]["kmeans"]["cpu_s_per_iter"] > 0
    assert res["parts"]["resume"]["status"] == "stopped" and list(res["parts"]) == ["kmeans", "resume"]
    assert any("stopped by SIGTERM" in ln for ln in lines) and any(ln.startswith("part     status") for ln in lines)
