"""bench/offline: the staging planner (batches, parts, tags) and the node side (join, check,
install, run gpu_check) on a small fake wheelhouse. No network: the fake wheels are built here."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

OFFLINE = REPO / "bench/offline"


def _load(name: str):
    sys.path.insert(0, str(OFFLINE))
    try:
        spec = importlib.util.spec_from_file_location(f"offline_{name}", OFFLINE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(OFFLINE))


plan = _load("plan")
stage = _load("stage")


def fake_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any", payload: int = 0) -> Path:
    """A minimal installable wheel: module ``name`` with VALUE = version (+ ``payload`` bytes of
    incompressible data, to make it large)."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VALUE = {version!r}\n".encode(),
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()}
    if payload:
        files[f"{name}/blob.bin"] = os.urandom(payload)
    record = "".join(f"{n},sha256={hashlib.sha256(d).hexdigest()},{len(d)}\n" for n, d in files.items())
    files[f"{dist}/RECORD"] = (record + f"{dist}/RECORD,,\n").encode()
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, d in files.items():
            z.writestr(n, d)
    return path


def test_freeze_and_missing_requirements():
    node = plan.parse_freeze("torch==2.11.0+cu130\nTimm==1.0.20\n# comment\n-e git+https://x#egg=y\n"
                             "Pillow==11.0.0\nnvidia_cublas==13.1.0.3\n")
    assert node == {"torch": "2.11.0", "timm": "1.0.20", "pillow": "11.0.0", "nvidia-cublas": "13.1.0.3"}
    reqs = ["torch>=2.4", "timm>=1.0.9", "open_clip_torch>=2.24", "deepspeed>=0.16", "pillow>=10.0", "hjson"]
    assert plan.missing(reqs, node) == ["open_clip_torch>=2.24", "deepspeed>=0.16", "hjson"]


def test_target_platform_tags_cover_older_glibc():
    tags = stage.target_platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags and "manylinux1_x86_64" in tags


@pytest.mark.parametrize("name,fits", [
    ("hjson-3.1.0-py3-none-any.whl", True),
    ("pydantic_core-2.41.5-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", True),
    ("faiss_gpu-1.15.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", True),
    ("cryptography-46.0.0-cp311-abi3-manylinux_2_28_x86_64.whl", True),  # stable ABI from 3.11
    ("regex-2026.1.1-cp311-cp311-manylinux_2_17_x86_64.whl", False),  # another CPython
    ("nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_34_x86_64.whl", False),  # needs a newer glibc
    ("numpy-2.3.0-cp312-cp312-manylinux_2_28_aarch64.whl", False),  # another architecture
    ("pywin-1.0-cp312-cp312-win_amd64.whl", False),
    ("typing_extensions-4.16.0-py3-none-any.whl", True),
    ("six-1.17.0-py2.py3-none-any.whl", True),
])
def test_every_wheel_tagged_for_the_target(name, fits):
    assert plan.wheel_fits(name, "3.12", "manylinux_2_28_x86_64") is fits


def test_batches_stay_within_the_limit_and_big_files_split():
    mib = plan.MIB
    files = [("dali.whl", 210 * mib + 5), ("faiss.whl", 59 * mib), ("a.whl", 30 * mib), ("b.whl", 29 * mib),
             ("c.whl", 1 * mib), ("src.tar.gz", 2 * mib)]
    batches = plan.plan_batches(files, 60 * mib)
    assert all(sum(p[2] for p in b) <= 60 * mib for b in batches)
    pieces = [p for b in batches for p in b]
    assert sorted(p[1] for p in pieces if p[0] == "dali.whl") == [1, 2, 3, 4]  # 210 MiB + 5 B -> 4 parts
    for name, size in files:  # every byte is sent exactly once
        assert sum(p[2] for p in pieces if p[0] == name) == size
    assert len(batches) == 6  # first-fit decreasing: 3 full dali parts, faiss+c, dali rest+b, a+src


def test_split_parts_join_to_the_original_sha(tmp_path):
    big = tmp_path / "big.whl"
    big.write_bytes(os.urandom(2 * plan.MIB + 12345))
    want = plan.sha256(big)
    part_bytes = plan.MIB
    n = -(-big.stat().st_size // part_bytes)
    parts, shas = [], []
    for i in range(1, n + 1):
        p = tmp_path / plan.part_name(big.name, i, n)
        shas.append(plan.write_part(big, p, i, part_bytes))
        assert p.stat().st_size <= part_bytes
        parts.append(p)
    plan.join_parts(parts, shas, want, tmp_path / "joined.whl")
    assert plan.sha256(tmp_path / "joined.whl") == want
    # a corrupted part is refused by name and leaves no joined file
    data = bytearray(parts[1].read_bytes())
    data[7] ^= 0xFF
    parts[1].write_bytes(bytes(data))
    with pytest.raises(plan.StageError, match=r"big\.whl\.part002of003: sha256 .* transfer it again"):
        plan.join_parts(parts, shas, want, tmp_path / "again.whl")
    assert not (tmp_path / "again.whl").exists() and not (tmp_path / "again.whl.joining").exists()


def _staged(tmp_path: Path) -> tuple[Path, dict, dict]:
    """Two fake wheels (one larger than a 1 MiB batch) + this tree's source, materialized."""
    wh = tmp_path / "wh"
    wh.mkdir()
    small = fake_wheel(wh, "mapetfake_small", "1.0")
    big = fake_wheel(wh, "mapetfake_big", "2.0", payload=int(2.5 * plan.MIB))
    src = stage.pack_source(wh)
    meta = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "platform": "manylinux_2_28_x86_64"}
    manifest = stage.materialize([small, big, src], tmp_path / "out", plan.MIB, meta)
    return tmp_path / "out/batches", manifest, {p.name: plan.sha256(p) for p in (small, big, src)}


def test_materialized_plan(tmp_path):
    batches, manifest, shas = _staged(tmp_path)
    assert manifest["batches"][0]["name"] == "batch_00"
    assert {f["file"] for f in manifest["batches"][0]["files"]} == {"run.sh", "node_install.py", "plan.py",
                                                                   "manifest.json"}
    for b in manifest["batches"]:  # what lies on disk is what the plan says, each batch within 1 MiB
        on_disk = {p.name: p.stat().st_size for p in (batches / b["name"]).iterdir()}
        assert on_disk == {f["file"]: f["bytes"] for f in b["files"]}
        if b["name"] != "batch_00":
            assert sum(on_disk.values()) <= plan.MIB
    files = {f["file"]: f for f in manifest["files"]}
    assert len(files["mapetfake_big-2.0-py3-none-any.whl"]["parts"]) == 3
    assert {n: f["sha256"] for n, f in files.items()} == shas


def test_node_side_installs_and_runs_the_check(tmp_path):
    """run.sh on the staged fake wheelhouse: parts joined and checked, wheels importable from
    OUT/site, gpu_check run from the unpacked source (OUT/src), its table and JSON in OUT."""
    batches, manifest, _ = _staged(tmp_path)
    out = tmp_path / "node_out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHON=sys.executable, MAPET_CHECK_ARGS="--parts kmeans", MAPET_DEADLINE_S="400")
    proc = subprocess.run(["bash", batches / "batch_00/run.sh", out], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    inst = json.loads((out / "install.json").read_text())
    assert inst["wheels"] == 2 and inst["src"] == str(out / "src")
    probe = subprocess.run([sys.executable, "-c", "import mapetfake_big, mapetfake_small; "
                            "print(mapetfake_big.VALUE, mapetfake_small.VALUE, mapetfake_big.__file__)"],
                           env=dict(env, PYTHONPATH=str(out / "site")), capture_output=True, text=True)
    assert probe.stdout.split()[:2] == ["2.0", "1.0"] and probe.stdout.split()[2].startswith(str(out / "site"))
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["ok"] is True and res["code"] == str(out / "src") and res["parts"]["kmeans"]["status"] == "ok"
    assert "part     status" in (out / "gpu_check.txt").read_text()


def test_node_side_refuses_a_missing_batch(tmp_path):
    batches, manifest, _ = _staged(tmp_path)
    lost = manifest["batches"][-1]
    for f in lost["files"]:
        (batches / lost["name"] / f["file"]).unlink()
    proc = subprocess.run([sys.executable, batches / "batch_00/node_install.py", batches, tmp_path / "o"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and f"transfer batch(es) {lost['name']} again" in proc.stderr
    assert not (tmp_path / "o/site").exists()
