#!/usr/bin/env python
"""Stage a wheelhouse for an air-gapped GPU node, in transfer batches of at most N MiB.

Run on a machine that reaches the package index; it needs the node's Python version, its
platform tag and what it already has (``pip list --format freeze > node.txt`` on the node):

    python bench/offline/stage.py --node-freeze node.txt --python 3.12 \\
        --platform manylinux_2_28_x86_64 --out /tmp/wheelhouse [--batch-mib 60]

1. the project's requirements (pyproject ``dependencies`` + the ``gpu`` extra, which
   replaces faiss-cpu) minus the projects the node has -> the missing ones;
2. DeepSpeed, an sdist, is built here as a pure wheel (``DS_BUILD_OPS=0 pip wheel
   --no-deps --no-build-isolation``; its ops JIT-compile on the node with its nvcc/ninja);
3. pip resolves the missing requirements for the target (``--dry-run --report``, binary
   wheels only, the node's versions as constraints) and downloads exactly the wheels the
   node lacks, each checked against the index's sha256;
4. every wheel must be tagged for the target; files are packed into batches (a wheel
   larger than a batch is cut into parts), the repository's tracked files go along as
   ``mapet_ds-src.tar.gz``; ``OUT/batches/batch_00`` (run.sh, node_install.py, plan.py,
   manifest.json with every sha256) is sent first, then batch_01... in order.

On the node: copy all batch folders side by side into one folder, then
``bash STAGE/batch_00/run.sh OUT`` (joins and checks parts, installs into OUT/site, runs
bench/gpu_check.py within ~9 minutes, writes OUT/gpu_check.txt and OUT/gpu_check.json).

Prints the plan (files, sizes, batches, order), then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan import (  # noqa: E402
    MANIFEST,
    MIB,
    canonical,
    describe,
    format_mib,
    missing,
    parse_freeze,
    part_name,
    plan_batches,
    requirement_name,
    sha256,
    wheel_fits,
    write_part,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NODE_TOOLS = ("run.sh", "node_install.py", "plan.py")
SOURCE = "mapet_ds-src.tar.gz"


def target_platforms(platform: str) -> list[str]:
    """pip's ``--platform`` takes exact tags (it expands none of ``manylinux_2_X``): a
    glibc-2.28 node also runs manylinux_2_27 ... 2_5 and the legacy aliases."""
    if not platform.startswith("manylinux_"):
        return [platform]
    _, major, minor, arch = platform.split("_", 3)
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(int(minor), 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{arch}" for m, name in legacy.items() if m <= int(minor)]


def project_requirements(extra: str = "gpu") -> list[str]:
    """pyproject dependencies + the extra; a GPU faiss replaces faiss-cpu (same module)."""
    import tomllib  # Python >= 3.11 on the staging machine

    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"])
    extra_reqs = proj.get("optional-dependencies", {}).get(extra, []) if extra else []
    if any(requirement_name(r).startswith("faiss-gpu") for r in extra_reqs):
        reqs = [r for r in reqs if requirement_name(r) != "faiss-cpu"]
    return reqs + extra_reqs


def pip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"error: {' '.join(cmd[:6])} ... failed ({p.returncode}):\n{tail}")
    return p


def build_deepspeed(spec: str, build: Path) -> Path:
    """A pure-Python DeepSpeed wheel (no prebuilt ops: they JIT-compile on the node against
    its own torch/CUDA). Built with this Python's torch, without build isolation (an
    isolated build would download a torch just to run setup.py)."""
    build.mkdir(parents=True, exist_ok=True)
    have = sorted(build.glob("deepspeed-*-py3-none-any.whl"))
    if not have:
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(build), spec,
            env={"DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cuda"})
        have = sorted(build.glob("deepspeed-*-py3-none-any.whl"))
    if not have:
        raise SystemExit(f"error: pip wheel {spec} made no pure wheel in {build}")
    return have[-1]


def resolve(reqs: list[str], node: dict[str, str], python: str, platform: str, work: Path,
            find_links: Path) -> list[dict]:
    """pip's resolution for the target: [{name, version, url, sha256}] of what to install
    beside the node's packages (pinned to the node's versions as constraints)."""
    cons = work / "node-constraints.txt"
    cons.write_text("".join(f"{n}=={v}\n" for n, v in sorted(node.items())))
    report = work / "resolve-report.json"
    tags = [a for p in target_platforms(platform) for a in ("--platform", p)]
    major, minor = python.split(".")[:2]
    pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
        "--target", str(work / "unused-target"), "--only-binary=:all:", "--implementation", "cp",
        "--python-version", python, "--abi", f"cp{major}{minor}", *tags, "-c", str(cons),
        "--find-links", str(find_links), *reqs)
    out = []
    for item in json.loads(report.read_text())["install"]:
        info = item["download_info"]
        hashes = info.get("archive_info", {}).get("hashes", {})
        out.append({"name": canonical(item["metadata"]["name"]), "version": item["metadata"]["version"],
                    "url": info["url"], "sha256": hashes.get("sha256")})
    return out


def download(items: list[dict], python: str, platform: str, dest: Path) -> list[Path]:
    """The resolved wheels the node lacks, checked against the index's sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    local = [i for i in items if i["url"].startswith("file://")]
    remote = [i for i in items if not i["url"].startswith("file://")]
    if remote:
        tags = [a for p in target_platforms(platform) for a in ("--platform", p)]
        major, minor = python.split(".")[:2]
        pip("download", "--no-deps", "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
            "--abi", f"cp{major}{minor}", *tags, "-d", str(dest), *[f"{i['name']}=={i['version']}" for i in remote])
    for i in local:
        src = Path(i["url"][len("file://"):])
        shutil.copy2(src, dest / src.name)
    files = []
    for i in items:
        name = Path(i["url"]).name
        path = dest / name
        if not path.is_file():
            raise SystemExit(f"error: {name} was resolved but not downloaded into {dest}")
        if i["sha256"] and sha256(path) != i["sha256"]:
            raise SystemExit(f"error: {name}: sha256 differs from the index's; delete it and stage again")
        files.append(path)
    return files


def pack_source(dest: Path, repo: Path = REPO) -> Path:
    """The repository's tracked (and untracked, not ignored) files as a tarball: the node
    runs gpu_check from this plain checkout."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                               capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive)
        tops = ("mapet_ds", "bench", "ds_configs", "launch", "data", "pyproject.toml", "README.md")
        names = [str(f.relative_to(repo)) for t in tops for f in ([repo / t] + sorted((repo / t).rglob("*")))
                 if f.is_file() and "__pycache__" not in f.parts and not f.name.endswith(".whl")]
    out = dest / SOURCE
    with tarfile.open(out, "w:gz") as tar:
        for n in sorted(n for n in names if n):
            p = repo / n
            if p.is_file() and not p.is_symlink():
                tar.add(p, arcname=n, recursive=False)
    return out


def materialize(files: list[Path], out: Path, batch_bytes: int, meta: dict) -> dict:
    """Write OUT/batches/batch_00 (node tools + manifest) and batch_01.. (files and parts,
    hard links where possible) and return the manifest."""
    batches_dir = out / "batches"
    if batches_dir.exists():
        shutil.rmtree(batches_dir)
    sizes = {f.name: f.stat().st_size for f in files}
    by_name = {f.name: f for f in files}
    plan = plan_batches(sorted(sizes.items()), batch_bytes)
    entries = {f.name: {"file": f.name, "bytes": sizes[f.name], "sha256": sha256(f),
                        "kind": "source" if f.name == SOURCE else "wheel"} for f in files}
    counts = {}
    for batch in plan:
        for name, idx, _ in batch:
            counts[name] = max(counts.get(name, 0), idx)
    manifest = {"format": "mapet_ds-offline-1", **meta, "batch_bytes": batch_bytes, "files": [], "batches": []}
    parts: dict[str, dict[int, dict]] = {}
    for bi, batch in enumerate(plan, start=1):
        bdir = batches_dir / f"batch_{bi:02d}"
        bdir.mkdir(parents=True)
        listed = []
        for name, idx, size in batch:
            src = by_name[name]
            if idx == 0:
                try:
                    os.link(src, bdir / name)
                except OSError:
                    shutil.copy2(src, bdir / name)
                listed.append({"file": name, "bytes": size})
            else:
                pname = part_name(name, idx, counts[name])
                digest = write_part(src, bdir / pname, idx, batch_bytes)
                parts.setdefault(name, {})[idx] = {"file": pname, "bytes": size, "sha256": digest}
                listed.append({"file": pname, "bytes": size})
        manifest["batches"].append({"name": bdir.name, "bytes": sum(x["bytes"] for x in listed), "files": listed})
    for name in sorted(entries):
        e = entries[name]
        if name in parts:
            e["parts"] = [parts[name][i] for i in sorted(parts[name])]
        manifest["files"].append(e)
    first = batches_dir / "batch_00"
    first.mkdir()
    for tool in NODE_TOOLS:
        shutil.copy2(HERE / tool, first / tool)
    (first / MANIFEST).write_text(json.dumps(manifest, indent=1))
    tools = sorted(first.iterdir())
    manifest["batches"].insert(0, {"name": "batch_00", "bytes": sum(p.stat().st_size for p in tools),
                                   "files": [{"file": p.name, "bytes": p.stat().st_size} for p in tools]})
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--node-freeze", required=True, help="the node's `pip list --format freeze` output")
    ap.add_argument("--python", default="3.12", help="the node's Python major.minor")
    ap.add_argument("--platform", default="manylinux_2_28_x86_64",
                    help="the node's platform tag (glibc 2.28 x86_64: manylinux_2_28_x86_64)")
    ap.add_argument("--out", required=True, help="wheelhouse folder (outside the repository)")
    ap.add_argument("--batch-mib", type=float, default=60, help="largest transfer, MiB (default 60)")
    ap.add_argument("--extra", default="gpu", help="pyproject extra to add (default gpu; '' for none)")
    ap.add_argument("--deepspeed-spec", default=None, help="DeepSpeed requirement to build (default: pyproject's)")
    ap.add_argument("--shadow", action="append", default=[],
                    help="a node package the resolver may replace (its staged version goes first on the node's "
                         "PYTHONPATH), e.g. --shadow packaging: DALI caps packaging below what new nodes have")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    if out == REPO or REPO in out.parents:
        raise SystemExit(f"error: --out {out} is inside the repository: stage outside it (wheels are never committed)")
    out.mkdir(parents=True, exist_ok=True)
    node = parse_freeze(Path(args.node_freeze).read_text())
    if not node:
        raise SystemExit(f"error: {args.node_freeze} lists no `name==version` line: give `pip list --format freeze`")
    reqs = project_requirements(args.extra)
    need = missing(reqs, node)
    print(f"node has {len(node)} projects; missing of the project's {len(reqs)} requirements: {', '.join(need)}")
    build = out / "build"
    ds = [r for r in need if requirement_name(r) == "deepspeed"]
    if ds:
        whl = build_deepspeed(args.deepspeed_spec or ds[0], build)
        print(f"built {whl.name} ({format_mib(whl.stat().st_size)})")
    shadow = {canonical(n) for n in args.shadow}
    pinned = {n: v for n, v in node.items() if n not in shadow}
    items = resolve(need, pinned, args.python, args.platform, out, build)
    changed = {i["name"]: i["version"] for i in items
               if i["name"] in node and i["version"].split("+")[0] != node[i["name"]]}
    clash = [f"{n} {v} (node {node[n]})" for n, v in changed.items() if n not in shadow]
    if clash:
        raise SystemExit(f"error: the resolution changes packages the node has: {', '.join(clash)}")
    extra = [i for i in items if i["name"] not in node or i["name"] in changed]
    for n, v in changed.items():
        print(f"shadowing the node's {n} {node[n]} with {v} (--shadow {n})")
    wheels_dir = out / "wheels"
    if wheels_dir.exists():
        shutil.rmtree(wheels_dir)
    files = download([i for i in extra if not i["url"].startswith(build.as_uri())], args.python, args.platform,
                     wheels_dir)
    for i in extra:
        if i["url"].startswith(build.as_uri()):
            src = Path(i["url"][len("file://"):])
            shutil.copy2(src, wheels_dir / src.name)
            files.append(wheels_dir / src.name)
    wrong = [f.name for f in files if not wheel_fits(f.name, args.python, args.platform)]
    if wrong:
        raise SystemExit(f"error: not tagged for CPython {args.python} on {args.platform}: {', '.join(wrong)}")
    files.append(pack_source(out))
    meta = {"python": args.python, "platform": args.platform, "created": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                      time.gmtime()),
            "node_has": len(node), "requirements": need, "shadowed": changed}
    manifest = materialize(files, out, int(args.batch_mib * MIB), meta)
    print(f"\nsend in this order ({len(manifest['batches'])} batches, each <= {args.batch_mib:g} MiB), "
          f"from {out / 'batches'}:")
    for line in describe(manifest):
        print(line)
    total = sum(f["bytes"] for f in manifest["files"])
    print(f"\non the node: put the batch folders side by side in one folder STAGE, then\n"
          f"  bash STAGE/batch_00/run.sh OUT     # joins + checks parts, installs, runs gpu_check (~9 min)")
    print(json.dumps({"benchmark": "offline_stage", "python": args.python, "platform": args.platform,
                      "missing_requirements": need, "shadowed": changed, "wheels": len(files) - 1, "total_mib": round(total / MIB, 1),
                      "batches": len(manifest["batches"]), "batch_mib": args.batch_mib,
                      "split": {f["file"]: len(f["parts"]) for f in manifest["files"] if "parts" in f},
                      "files": {f["file"]: round(f["bytes"] / MIB, 2) for f in manifest["files"]},
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
