#!/usr/bin/env python
"""Node side of the offline staging: join and check the staged files, install the wheels.

    python node_install.py STAGE OUT

STAGE: the folder holding the batch folders (batch_00 with manifest.json, batch_01, ...;
side by side or merged). Every file and part is looked up by name under STAGE, every
part's and every file's sha256 is checked against the manifest, split wheels are joined
into OUT/wheels, the wheels are installed with ``pip install --no-index --no-deps
--target OUT/site`` (a temporary site folder: nothing of the node's Python changes) and
the source tarball is unpacked into OUT/src. Standard library only: it runs before
anything is installed. Prints one JSON object as its last line; exit code 2 with one
``error:`` line when a file is missing or corrupt.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan import MANIFEST, StageError, find_files, join_parts, read_manifest, sha256  # noqa: E402


def locate_manifest(stage: Path) -> Path:
    found = sorted(p for p in stage.rglob(MANIFEST) if p.is_file())
    if not found:
        raise StageError(f"no {MANIFEST} under {stage}: copy batch_00 (sent first) there too")
    return found[0]


def gather(manifest: dict, stage: Path, wheels: Path) -> list[Path]:
    """Every staged file, whole and checked, in ``wheels`` (the source tarball too)."""
    names = []
    for f in manifest["files"]:
        names += [p["file"] for p in f["parts"]] if "parts" in f else [f["file"]]
    where = find_files(stage, names)
    lost = sorted(n for n, p in where.items() if p is None)
    if lost:
        batch_of = {x["file"]: b["name"] for b in manifest["batches"] for x in b["files"]}
        batches = sorted({batch_of.get(n, "?") for n in lost})
        raise StageError(f"{len(lost)} staged file(s) missing under {stage} (e.g. {lost[0]}): "
                         f"transfer batch(es) {', '.join(batches)} again")
    wheels.mkdir(parents=True, exist_ok=True)
    out = []
    for f in manifest["files"]:
        dst = wheels / f["file"]
        if "parts" in f:
            join_parts([where[p["file"]] for p in f["parts"]], [p["sha256"] for p in f["parts"]], f["sha256"], dst)
        else:
            src = where[f["file"]]
            if sha256(src) != f["sha256"]:
                raise StageError(f"{src}: sha256 differs from the manifest: transfer it again")
            shutil.copyfile(src, dst)
        out.append(dst)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    stage, out = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    t0 = time.perf_counter()
    try:
        manifest = read_manifest(locate_manifest(stage))
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if here != manifest["python"]:
            raise StageError(f"the wheels were staged for Python {manifest['python']}, this is {here}: "
                             f"stage again with --python {here} (or run with PYTHON=python{manifest['python']})")
        files = gather(manifest, stage, out / "wheels")
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wheels = [f for f in files if f.name.endswith(".whl")]
    site = out / "site"
    if site.exists():  # a re-run installs afresh (this folder is ours: OUT/site)
        shutil.rmtree(site)
    t1 = time.perf_counter()
    if wheels:
        p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                            "--disable-pip-version-check", "--target", str(site), *map(str, wheels)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            tail = " | ".join((p.stdout + p.stderr).strip().splitlines()[-3:])
            print(f"error: pip install --target {site} failed ({p.returncode}): {tail}", file=sys.stderr)
            return 2
    t_install = time.perf_counter() - t1
    src = [f for f in files if f.name.endswith(".tar.gz")]
    if src:
        dst = out / "src"
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        with tarfile.open(src[0]) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.12 (and patched 3.8+): no links out, no devices
                tar.extractall(dst, filter="data")
            else:
                tar.extractall(dst)
    print(json.dumps({"step": "node_install", "wheels": len(wheels), "site": str(site),
                      "src": str(out / "src") if src else None, "python": here, "machine": platform.machine(),
                      "install_s": round(t_install, 1), "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
