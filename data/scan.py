#!/usr/bin/env python
"""Check every image of a file list; write a clean list and a JSON report.

DALI cannot skip a bad sample in the middle of a batch: one broken file stops a
training run. This scan finds them first (in parallel, with a progress bar):

  issue           what                                   clean list
  truncated       JPEG/PNG data ends early               dropped
  undecodable     empty, not an image, decoder error     dropped
  not_a_file      FIFO, device, socket, folder           dropped (never opened for reading)
  too_large       over --max-pixels (from the header:    dropped
                  decompression bombs) or --max-bytes
  cmyk            CMYK (or YCCK) JPEG                    dropped; with --repair an RGB copy
  wrong_format    e.g. a PNG behind a .JPEG name         dropped; with --repair an RGB JPEG copy
  unsupported     PIL opens it, DALI does not (32-bit    dropped; with --repair an RGB JPEG copy
                  or float TIFF, bilevel TIFF, GIF...)
  grayscale       one-channel image                      kept (decoded to RGB); --repair converts
  tiny            shorter side < --min-size px           kept (reported)

The rule is "DALI decodes it", not "PIL opens it" (mapet_ds/images.py: the format and
mode DALI takes, then a decode by DALI's own CPU decoder). Only regular files are read,
with a size cap.

Writes into OUT: ``<list stem>_clean.txt`` (paths relative to OUT, classes.txt copied
beside it), ``<list stem>_scan.json``, and with --repair the converted copies under
``OUT/repaired/<list path>``, where list paths that climb out (``../train/x.JPEG``,
absolute ones) lose their leading ``..`` and ``/`` parts (``OUT/repaired/train/x.JPEG``).
A copy is an RGB JPEG and its name says so: a name that does not end in .jpg/.jpeg gets
``.jpg`` appended (``train/x.png`` -> ``OUT/repaired/train/x.png.jpg``), so the next step
(make_shards, or a scan of the clean list) finds JPEG data behind a JPEG name. Nothing is
ever written outside OUT (a symlink at OUT/repaired or deeper that leads out is refused),
and the scan refuses to write onto any of its inputs (the list, its images). Sample ids of
the clean list are its own line indices: make token stores from the clean list.

``--shards DIR`` checks the images of a shard set (data/make_shards.py) instead and lists
the broken samples by shard and key (exit code 1 if there are any).

    python data/scan.py /data/imagenet/train.txt --out /data/imagenet_clean --repair
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mapet_ds.filelist import FileListError, read_filelist, write_filelist  # noqa: E402
from mapet_ds.images import (  # noqa: E402,F401  (the per-image check: re-exported for make_shards and tests)
    _PIL_FORMATS,
    CONVERT,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DROP,
    ISSUES,
    WARN,
    NotAnImage,
    _pixel_cap,
    check_bytes,
    check_image,
    read_image_bytes,
)
from mapet_ds.safe_io import (  # noqa: E402
    InputGuard,
    UnsafeWriteError,
    atomic_copy,
    atomic_write_bytes,
    atomic_write_text,
    contained_names,
    out_folder,
    path_under,
    print_error,
    sub_folder,
)

def repaired_name(rel: str) -> str:
    """Name of the RGB JPEG copy of ``rel``: the same name if it already says JPEG, else with
    ``.jpg`` appended (``x.png`` -> ``x.png.jpg``), so later checks find JPEG data behind a
    JPEG name."""
    return rel if os.path.splitext(rel)[1].lower() in (".jpg", ".jpeg") else rel + ".jpg"


def _repair(src: str, dst: Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Re-encode ``src`` as an RGB JPEG at ``dst`` (atomic)."""
    data = read_image_bytes(src, max_bytes)
    with _pixel_cap(max_pixels), Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
        rgb = img.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=95)
    atomic_write_bytes(dst, buf.getvalue())


def _check(args: tuple) -> dict:
    sample_id, rel, abspath, min_size, repair, max_pixels, max_bytes = args
    info = check_image(abspath, min_size, max_pixels, max_bytes)
    issues = info["issues"]
    if any(i in DROP for i in issues):
        action = "dropped"
    elif any(i in CONVERT for i in issues) or (repair and "grayscale" in issues):
        action = "repair" if repair else "dropped"
    else:
        action = "kept"
    return {"sample_id": sample_id, "path": rel, "action": action, **info}


def _repair_job(args: tuple) -> str:
    src, dst, max_pixels, max_bytes = args
    try:
        _repair(src, Path(dst), max_pixels, max_bytes)
        return ""
    except NotAnImage as e:
        return f"; repair failed: {e.detail}"
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
                  progress: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
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
    out_folder(out, guard)
    clean_path = guard.check(out / f"{stem}_clean.txt")
    report_path = guard.check(out / f"{stem}_scan.json")
    jobs = [(i, rel, fl.abspath(i), min_size, repair, max_pixels, max_bytes) for i, rel in enumerate(fl.paths)]
    workers = workers if workers is not None else (os.cpu_count() or 1)
    with tqdm(total=len(jobs), desc=f"scan {fl.list_path.name}", unit="img", disable=not progress) as bar:
        results: list[dict] = _map(_check, jobs, workers, bar)

    # Repairs run after the scan, so every destination is checked here, in one process: under
    # OUT/repaired/ whatever the list path, real path inside OUT (a link at OUT/repaired or
    # deeper is refused), never one of the list's images, named after the new format.
    to_repair = [r for r in results if r["action"] == "repair"]
    if to_repair:
        names = contained_names([repaired_name(p) for p in fl.paths])
        sub_folder(out, "repaired")
        for r in to_repair:
            r["repaired"] = "repaired/" + names[r["sample_id"]]
            dst = guard.check(path_under(out, r["repaired"]))
            if dst.exists() and os.path.samefile(dst, fl.abspath(r["sample_id"])):  # reached through a link
                raise UnsafeWriteError(f"refusing to write {dst}: it is the image {fl.abspath(r['sample_id'])} "
                                       f"of the list, an input of this command; choose another --out")
            r["_dst"] = dst
        with tqdm(total=len(to_repair), desc="repair", unit="img", disable=not progress) as bar:
            failures = _map(_repair_job, [(fl.abspath(r["sample_id"]), str(r.pop("_dst")), max_pixels, max_bytes)
                                          for r in to_repair], workers, bar)
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
        "max_pixels": max_pixels,
        "max_bytes": max_bytes,
        "repair": repair,
        "problems": problems,
    }
    atomic_write_text(report_path, json.dumps(report, indent=1))
    report["report"] = str(report_path)
    return report


def scan_shards(shards: str | os.PathLike, *, min_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
                progress: bool = True) -> tuple[int, list[dict]]:
    """The scan's check over every image of a shard set (data/make_shards.py).
    -> (number of samples, problems: [{"tar", "member", "sample_id", "issues", "detail"}]) where
    an issue is one that drops or converts an image (training would stop on it)."""
    from mapet_ds.pipelines.shardset import IMAGE_EXTS, open_shards

    ss = open_shards(shards)
    problems, n = [], 0
    for tar_path in tqdm(ss.tars, desc=f"scan {ss.path.name}", unit="shard", disable=not progress):
        try:
            with tarfile.open(tar_path) as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if not m.isfile() or ext not in IMAGE_EXTS:
                        continue
                    n += 1
                    info = check_bytes(tar.extractfile(m).read(), m.name, min_size, max_pixels)
                    bad = [i for i in info["issues"] if i in DROP or i in CONVERT]
                    if bad:
                        problems.append({"tar": tar_path, "member": m.name, "issues": bad, "detail": info["detail"],
                                         "sample_id": int(key) if key.isdigit() else None})
        except (OSError, tarfile.TarError) as e:
            raise FileListError(f"shard {tar_path} cannot be read ({e}): make the shards again with "
                                f"data/make_shards.py") from None
    return n, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("filelist", nargs="?", help="file list to check (mapet_ds format)")
    ap.add_argument("--out", help="folder for the clean list, report and repaired copies")
    ap.add_argument("--shards", default=None, help="check the images of a shard set (data/make_shards.py) instead: "
                                                   "lists the broken samples, exit code 1 if there are any")
    ap.add_argument("--root", default=None, help="image root (default: the list's folder)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    ap.add_argument("--min-size", type=int, default=32, help="report images whose shorter side is below this")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help="images larger than this (width x height, read from the header) are dropped as too_large "
                         "(decompression bombs)")
    ap.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="files larger than this are dropped")
    ap.add_argument("--repair", action="store_true", help="write RGB JPEG copies of convertible files")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.shards is not None:
        from mapet_ds.pipelines.shardset import ShardSetError

        if args.filelist or args.out or args.repair:
            ap.error("--shards DIR checks a shard set: pass no file list, --out or --repair with it")
        try:
            n, problems = scan_shards(args.shards, min_size=args.min_size, max_pixels=args.max_pixels,
                                      progress=not args.no_progress)
        except (FileListError, ShardSetError) as e:
            print_error(e)
            return 2
        for p in problems:
            sid = f", sample id {p['sample_id']}" if p["sample_id"] is not None else ""
            print(f"{p['tar']}: {p['member']}{sid}: {', '.join(p['issues'])}: {p['detail']}")
        print(f"{n} samples in {args.shards}: {len(problems)} broken"
              + (" (make the shards again from a scanned list, without --no-check)" if problems else ""))
        return 1 if problems else 0
    if not args.filelist or not args.out:
        ap.error("a file list and --out are required (or --shards DIR)")
    try:
        report = scan_filelist(args.filelist, args.out, root=args.root, workers=args.workers,
                               min_size=args.min_size, repair=args.repair, progress=not args.no_progress,
                               max_pixels=args.max_pixels, max_bytes=args.max_bytes)
    except (FileListError, UnsafeWriteError) as e:
        print_error(e)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items() if v) or "no issues"
    print(f"{report['num_files']} files: {counts}; clean list {report['clean_list']} ({report['num_clean']} lines); "
          f"report {report['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
