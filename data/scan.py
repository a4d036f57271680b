#!/usr/bin/env python
"""Check every image of a file list; write a clean list and a JSON report.

DALI cannot skip a bad sample in the middle of a batch: one broken file stops a
training run. This scan finds them first (in parallel, with a progress bar):

  issue           what                                   clean list
  truncated       JPEG/PNG data ends early               dropped
  undecodable     empty, not an image, decoder error     dropped
  cmyk            CMYK (or YCCK) JPEG                    dropped; with --repair an RGB copy
  wrong_format    e.g. a PNG behind a .JPEG name         dropped; with --repair an RGB JPEG copy
  grayscale       one-channel image                      kept (decoded to RGB); --repair converts
  tiny            shorter side < --min-size px           kept (reported)

Writes into OUT: ``<list stem>_clean.txt`` (paths relative to OUT, classes.txt copied
beside it), ``<list stem>_scan.json``, and with --repair the converted copies under
``OUT/repaired/<list path>``, where list paths that climb out (``../train/x.JPEG``,
absolute ones) lose their leading ``..`` and ``/`` parts (``OUT/repaired/train/x.JPEG``):
nothing is ever written outside OUT, and the scan refuses to write onto any of its
inputs (the list, its images). Sample ids of the clean list are its own line indices:
make token stores from the clean list.

    python data/scan.py /data/imagenet/train.txt --out /data/imagenet_clean --repair
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mapet_ds.filelist import FileListError, read_filelist, write_filelist  # noqa: E402
from mapet_ds.safe_io import (  # noqa: E402
    InputGuard,
    UnsafeWriteError,
    atomic_copy,
    atomic_write_bytes,
    atomic_write_text,
    contained_names,
    path_under,
)

DROP = ("truncated", "undecodable")
CONVERT = ("cmyk", "wrong_format")
WARN = ("grayscale", "tiny")
ISSUES = DROP + CONVERT + WARN

_EXPECTED = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP",
             ".tif": "TIFF", ".tiff": "TIFF"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def check_image(path: str, min_size: int = 32) -> dict:
    """Inspect one file. -> {"issues": [...], "format", "mode", "size", "detail"}."""
    info: dict = {"issues": [], "format": None, "mode": None, "size": None, "detail": ""}
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        info["issues"].append("undecodable")
        info["detail"] = f"cannot read: {e}"
        return info
    if not data:
        info["issues"].append("undecodable")
        info["detail"] = "empty file"
        return info
    try:
        with Image.open(io.BytesIO(data)) as img:
            info.update(format=img.format, mode=img.mode, size=list(img.size))
            img.load()  # full decode: PIL raises on truncated data (LOAD_TRUNCATED_IMAGES is off)
    except UnidentifiedImageError:  # its message names our in-memory buffer, not the file
        info["issues"].append("undecodable")
        info["detail"] = "not an image (unknown format)"
        return info
    except (SyntaxError, ValueError) as e:
        info["issues"].append("undecodable")
        info["detail"] = str(e)
        return info
    except OSError as e:
        info["issues"].append("truncated" if "truncated" in str(e).lower() or info["format"] else "undecodable")
        info["detail"] = str(e)
        return info
    expected = _EXPECTED.get(Path(path).suffix.lower())
    if expected and info["format"] != expected:
        info["issues"].append("wrong_format")
        info["detail"] = f"{info['format']} data behind a {Path(path).suffix} name"
    if info["mode"] == "CMYK":
        info["issues"].append("cmyk")
    if info["mode"] in _GRAY_MODES:
        info["issues"].append("grayscale")
    if min(info["size"]) < min_size:
        info["issues"].append("tiny")
    return info


def _repair(src: str, dst: Path) -> None:
    """Re-encode ``src`` as an RGB JPEG at ``dst`` (atomic)."""
    with Image.open(src) as img:
        rgb = img.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=95)
    atomic_write_bytes(dst, buf.getvalue())


def _check(args: tuple) -> dict:
    sample_id, rel, abspath, min_size, repair = args
    info = check_image(abspath, min_size)
    issues = info["issues"]
    if any(i in DROP for i in issues):
        action = "dropped"
    elif any(i in CONVERT for i in issues) or (repair and "grayscale" in issues):
        action = "repair" if repair else "dropped"
    else:
        action = "kept"
    return {"sample_id": sample_id, "path": rel, "action": action, **info}


def _repair_job(args: tuple) -> str:
    src, dst = args
    try:
        _repair(src, Path(dst))
        return ""
    except Exception as e:  # a file PIL opened but cannot convert: report, do not crash the scan
        return f"; repair failed: {e}"


def _map(fn, jobs: list, workers: int, bar) -> list:
    """[fn(job) for job in jobs], in order, over ``workers`` processes, ticking ``bar``."""
    out: list = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            out.append(fn(job))
            bar.update()
        return out
    with ProcessPoolExecutor(workers) as ex:
        for r in ex.map(fn, jobs, chunksize=max(1, min(256, len(jobs) // (8 * workers)))):
            out.append(r)
            bar.update()
    return out


def scan_filelist(filelist: str | os.PathLike, out_dir: str | os.PathLike, *, root: str | os.PathLike | None = None,
                  workers: int | None = None, min_size: int = 32, repair: bool = False,
                  progress: bool = True) -> dict:
    """Scan every image of ``filelist``; write the clean list + JSON report into ``out_dir``.

    Returns the report dict (also written as JSON): counts per issue, the paths of the
    outputs, and one entry per file with an issue (sample id, path, issues, action).
    """
    fl = read_filelist(filelist, root)
    out = Path(out_dir)
    stem = fl.list_path.stem
    guard = InputGuard().add(fl.list_path, "the file list being scanned")
    guard.add(fl.list_path.parent / "classes.txt", "the class names of the list")
    guard.add_files(fl.abspaths(), "an image of the list")
    clean_path = guard.check(out / f"{stem}_clean.txt")
    report_path = guard.check(out / f"{stem}_scan.json")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, rel, fl.abspath(i), min_size, repair) for i, rel in enumerate(fl.paths)]
    workers = workers if workers is not None else (os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc=f"scan {fl.list_path.name}", unit="img", disable=not progress)
    results: list[dict] = _map(_check, jobs, workers, bar)
    bar.close()

    # Repairs run after the scan, so every destination is checked here, in one process:
    # under OUT/repaired/ whatever the list path, and never one of the list's images.
    to_repair = [r for r in results if r["action"] == "repair"]
    if to_repair:
        names = contained_names(fl.paths)
        repaired_dir = out / "repaired"
        for r in to_repair:
            r["repaired"] = "repaired/" + names[r["sample_id"]]
            dst = guard.check(path_under(repaired_dir, names[r["sample_id"]]))
            if dst.exists() and os.path.samefile(dst, fl.abspath(r["sample_id"])):  # reached through a link
                raise UnsafeWriteError(f"refusing to write {dst}: it is the image {fl.abspath(r['sample_id'])} "
                                       f"of the list, an input of this command; choose another --out")
            r["_dst"] = dst
        bar = tqdm(total=len(to_repair), desc="repair", unit="img", disable=not progress)
        failures = _map(_repair_job, [(fl.abspath(r["sample_id"]), str(r.pop("_dst"))) for r in to_repair],
                        workers, bar)
        bar.close()
        for r, fail in zip(to_repair, failures):
            r["action"] = "dropped" if fail else "repaired"
            r["detail"] += fail
            if fail:
                del r["repaired"]

    entries = []
    for r in results:
        y = fl.labels[r["sample_id"]]
        if r["action"] == "kept":
            entries.append((os.path.relpath(fl.abspath(r["sample_id"]), out), y))
        elif r["action"] == "repaired":
            entries.append((r["repaired"], y))
    if not entries:
        raise FileListError(f"{fl.list_path}: no usable image left after the scan; see the report in {out}")
    write_filelist(clean_path, entries)
    classes_src = fl.list_path.parent / "classes.txt"
    if classes_src.is_file() and classes_src.resolve() != (out / "classes.txt").resolve():
        atomic_copy(classes_src, guard.check(out / "classes.txt"))

    problems = [r for r in results if r["issues"]]
    report = {
        "list": str(fl.list_path),
        "root": str(fl.root),
        "num_files": len(results),
        "num_clean": len(entries),
        "counts": {k: sum(k in r["issues"] for r in results) for k in ISSUES},
        "actions": {a: sum(r["action"] == a for r in results) for a in ("kept", "repaired", "dropped")},
        "clean_list": str(clean_path),
        "min_size": min_size,
        "repair": repair,
        "problems": problems,
    }
    atomic_write_text(report_path, json.dumps(report, indent=1))
    report["report"] = str(report_path)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("filelist", help="file list to check (mapet_ds format)")
    ap.add_argument("--out", required=True, help="folder for the clean list, report and repaired copies")
    ap.add_argument("--root", default=None, help="image root (default: the list's folder)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    ap.add_argument("--min-size", type=int, default=32, help="report images whose shorter side is below this")
    ap.add_argument("--repair", action="store_true", help="write RGB JPEG copies of convertible files")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        report = scan_filelist(args.filelist, args.out, root=args.root, workers=args.workers,
                               min_size=args.min_size, repair=args.repair, progress=not args.no_progress)
    except (FileListError, UnsafeWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items() if v) or "no issues"
    print(f"{report['num_files']} files: {counts}; clean list {report['clean_list']} ({report['num_clean']} lines); "
          f"report {report['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
