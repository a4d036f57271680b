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

The rule is "DALI decodes it", not "PIL opens it" (mapet_ds.filelist.DALI_MODES). Only
regular files are read, with a size cap.

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
import contextlib
import io
import json
import os
import stat
import sys
import tarfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mapet_ds.filelist import FileListError, read_filelist, write_filelist  # noqa: E402
from mapet_ds.images import DaliProbe, dali_takes, probe_safe  # noqa: E402
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

DROP = ("truncated", "undecodable", "not_a_file", "too_large")
CONVERT = ("cmyk", "wrong_format", "unsupported")
WARN = ("grayscale", "tiny")
ISSUES = DROP + CONVERT + WARN

# Defaults of the caps (--max-pixels, --max-bytes). A 100-megapixel image decodes to 300 MB of
# RGB; camera photos (ImageNet-21k's largest) stay well below, decompression bombs do not.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 256 * 2**20

_EXPECTED = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP",
             ".tif": "TIFF", ".tiff": "TIFF"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
# Formats PIL may identify: what DALI reads plus the few a mislabelled file tends to be. Never
# PIL's full plugin list: EPS would run Ghostscript on a hostile file.
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM")
_KIND = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


class NotAnImage(Exception):
    """A listed path that cannot be read as an image file: ``issue`` (one of DROP) and a detail."""

    def __init__(self, issue: str, detail: str):
        super().__init__(detail)
        self.issue, self.detail = issue, detail


def read_image_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, else NotAnImage.

    Only regular files are images: a FIFO would block a reader forever and ``/dev/zero``
    never ends, so the type is checked (``stat``, following links) before the file is
    opened, and again on the open descriptor (``O_NONBLOCK``: a FIFO swapped in meanwhile
    does not block); the read stops one byte past the cap.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise NotAnImage("undecodable", f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotAnImage("not_a_file", f"not a regular file ({_KIND.get(stat.S_IFMT(st.st_mode), 'special file')})")
    if st.st_size > max_bytes:
        raise NotAnImage("too_large", f"{st.st_size} bytes, over the cap of {max_bytes} (--max-bytes)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise NotAnImage("undecodable", f"cannot read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NotAnImage("not_a_file", "not a regular file (replaced while being checked)")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise NotAnImage("undecodable", f"cannot read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise NotAnImage("too_large", f"over the cap of {max_bytes} bytes (--max-bytes)")
    return data


@contextlib.contextmanager
def _pixel_cap(max_pixels: int):
    """PIL's own bomb check at our cap (PIL raises at twice it, we refuse above it ourselves)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(1, int(max_pixels))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


_PROBE = None  # this process's DaliProbe


def _dali_error(data: bytes) -> str | None:
    """DALI's CPU decoder on ``data``: None when it decodes (or no probe can run here), else why not."""
    global _PROBE
    if not probe_safe():
        # a worker forked from a process that already ran DALI (e.g. `tokens.py assign
        # --shards-out`, whose loader just decoded these images) checks by the rules only
        return None
    if _PROBE is None:
        _PROBE = DaliProbe()
    return _PROBE.error(data)


def check_bytes(data: bytes, name: str, min_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
                dali: bool = True) -> dict:
    """Inspect one image's bytes (``name`` only for its extension).
    -> {"issues": [...], "format", "mode", "size", "detail"}; never raises on bad data.

    After PIL's decode and the format/mode rule, an image that would be kept is decoded once
    more by DALI's own CPU decoder (``dali``, when DALI is installed; ~4 ms for an ImageNet
    JPEG): the rule is "DALI decodes it", and some damage only DALI's decoders notice."""
    info: dict = {"issues": [], "format": None, "mode": None, "size": None, "detail": ""}
    if not data:
        info["issues"].append("undecodable")
        info["detail"] = "empty file"
        return info
    try:
        with _pixel_cap(max_pixels), Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
            info.update(format=img.format, mode=img.mode, size=list(img.size))
            w, h = img.size
            if w * h > max_pixels:  # refused from the header, before anything is decoded
                info["issues"].append("too_large")
                info["detail"] = f"{w}x{h} = {w * h} pixels, over the cap of {max_pixels} (--max-pixels)"
                return info
            img.load()  # full decode: PIL raises on truncated data (LOAD_TRUNCATED_IMAGES is off)
    except UnidentifiedImageError:  # its message names our in-memory buffer, not the file
        info["issues"].append("undecodable")
        info["detail"] = "not an image (unknown format)"
        return info
    except Image.DecompressionBombError as e:
        info["issues"].append("too_large")
        info["detail"] = f"{e} (--max-pixels)"
        return info
    except OSError as e:
        info["issues"].append("truncated" if "truncated" in str(e).lower() or info["format"] else "undecodable")
        info["detail"] = str(e)
        return info
    except Exception as e:  # noqa: BLE001 - hostile bytes make PIL raise anything (struct.error, ...)
        info["issues"].append("undecodable")
        info["detail"] = f"{type(e).__name__}: {e}"
        return info
    expected = _EXPECTED.get(os.path.splitext(name)[1].lower())
    if expected and info["format"] != expected:
        info["issues"].append("wrong_format")
        info["detail"] = f"{info['format']} data behind a {os.path.splitext(name)[1]} name"
    elif not dali_takes(info["format"], info["mode"]) and info["mode"] != "CMYK":
        info["issues"].append("unsupported")
        info["detail"] = f"{info['format']} in PIL mode {info['mode']}, which DALI's decoders do not take"
    if info["mode"] == "CMYK":
        info["issues"].append("cmyk")
    if dali and not info["issues"] and (err := _dali_error(data)) is not None:
        # PIL decoded it, DALI does not (a PNG with a bad CRC, a damaged TIFF directory...)
        info["issues"].append("unsupported")
        info["detail"] = f"PIL decodes it, DALI does not ({err})"
    if info["mode"] in _GRAY_MODES:
        info["issues"].append("grayscale")
    if min(info["size"]) < min_size:
        info["issues"].append("tiny")
    return info


def check_image(path: str, min_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Inspect one file (a regular file, read with a size cap). -> check_bytes' dict."""
    try:
        data = read_image_bytes(path, max_bytes)
    except NotAnImage as e:
        return {"issues": [e.issue], "format": None, "mode": None, "size": None, "detail": e.detail}
    return check_bytes(data, path, min_size, max_pixels)


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
