"""bench/gpu_check.py: its CPU smoke runs every part's code path, so the GPU check cannot rot.

The compile part is left out here (inductor builds C++ for ~1 min on a small CPU box);
tests/test_models_compile.py covers compiled == eager.
"""

from __future__ import annotations

import importlib.util
import json

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
