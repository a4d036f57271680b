#!/usr/bin/env python
"""Write DALI file lists (train.txt, val.txt, classes.txt) for an ImageNet-style folder.

Layout read::

    ROOT/train/<class>/**/<image>      class names = sorted sub-folders of train/
    ROOT/val/<class>/**/<image>        or a flat ROOT/val/<image> plus --val-labels FILE

Lists are written to OUT (default ROOT) in the format of mapet_ds.filelist: one
``<path relative to OUT>\\t<class index>`` line per image, sorted by relative path, so
the sample id (line index) of an image is stable across runs and machines.

--val-labels accepts: ``<file name or stem> <class name or index>`` lines (space, tab or
comma separated), or Kaggle's LOC_val_solution.csv (``ImageId,PredictionString``, the
first word of PredictionString is the class).

    python data/make_filelist.py /data/imagenet
    python data/make_filelist.py /data/imagenet --out lists/ --val-labels val_labels.txt
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mapet_ds.filelist import FileListError, _unreadable_as_filelist_error, write_filelist  # noqa: E402
from mapet_ds.safe_io import InputGuard, UnsafeWriteError, out_folder, print_error  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _images_under(folder: Path, extensions=IMAGE_EXTENSIONS) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(extensions))
    return found


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _read_val_labels(path: Path, classes: list[str]) -> dict[str, int]:
    """file name or stem -> class index, from one of the accepted label-file formats."""
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, int] = {}
    if not path.is_file():
        raise FileListError(f"--val-labels {path} is not a file ({'a folder' if path.is_dir() else 'missing'}): "
                            f"pass the label file of the flat val/ folder")
    with _unreadable_as_filelist_error(path, "--val-labels file", "save it as UTF-8"), \
            open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#") or (lineno == 1 and line.lower().startswith("imageid,")):
                continue
            parts = line.replace(",", " ").split()
            if len(parts) < 2:
                raise FileListError(f"{path}:{lineno}: expected '<file> <class>', got {line!r}")
            name, label = parts[0], parts[1]
            if label in index:
                y = index[label]
            elif label.isdigit() and int(label) < len(classes):
                y = int(label)
            else:
                raise FileListError(f"{path}:{lineno}: class {label!r} is not one of the {len(classes)} train classes")
            out[name] = y
    return out


def make_filelists(root: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                   val_labels: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write train.txt / val.txt (those splits that exist) and classes.txt; return their paths."""
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root
    train_dir, val_dir = root / "train", root / "val"
    if not root.is_dir():
        raise FileListError(f"dataset folder {root} does not exist")
    if not train_dir.is_dir() and not val_dir.is_dir():
        raise FileListError(f"{root} has neither train/ nor val/: expected the ImageNet layout train/<class>/*.JPEG")
    classes = _class_dirs(train_dir) if train_dir.is_dir() else _class_dirs(val_dir)
    if not classes:
        raise FileListError(f"no class folders in {train_dir if train_dir.is_dir() else val_dir}")
    index = {c: i for i, c in enumerate(classes)}

    def rel(p: Path) -> str:
        return os.path.relpath(p, out)

    # The lists are the only files written; the label file is the one input they could hit.
    guard = InputGuard().add(val_labels, "the --val-labels file")
    out_folder(out, guard)
    for name in ("train.txt", "val.txt", "classes.txt"):
        guard.check(out / name)

    written: dict[str, Path] = {}
    if train_dir.is_dir():
        entries = [(rel(p), index[c]) for c in classes for p in _images_under(train_dir / c)]
        if not entries:
            raise FileListError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {train_dir}")
        written["train"] = write_filelist(out / "train.txt", sorted(entries), classes=classes)
    if val_dir.is_dir():
        val_classes = _class_dirs(val_dir)
        if val_classes:
            unknown = [c for c in val_classes if c not in index]
            if unknown:
                raise FileListError(f"{val_dir}: class folders not in train/: {', '.join(unknown[:5])}")
            entries = [(rel(p), index[c]) for c in val_classes for p in _images_under(val_dir / c)]
        else:
            if val_labels is None:
                raise FileListError(f"{val_dir} is flat (no class folders): pass --val-labels FILE")
            labels = _read_val_labels(Path(val_labels), classes)
            entries = []
            for p in _images_under(val_dir):
                y = labels.get(p.name, labels.get(p.stem))
                if y is None:
                    raise FileListError(f"{val_labels}: no label for {p.name}")
                entries.append((rel(p), y))
        if not entries:
            raise FileListError(f"no images under {val_dir}")
        written["val"] = write_filelist(out / "val.txt", sorted(entries), classes=classes)
    written["classes"] = out / "classes.txt"  # written beside the lists by write_filelist
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="dataset folder holding train/ and/or val/")
    ap.add_argument("--out", default=None, help="where to write the lists (default: ROOT)")
    ap.add_argument("--val-labels", default=None, help="label file for a flat val/ folder")
    args = ap.parse_args(argv)
    try:
        written = make_filelists(args.root, args.out, val_labels=args.val_labels)
    except (FileListError, UnsafeWriteError) as e:
        print_error(e)
        return 2
    for split, path in written.items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{split}: {path} ({n} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
