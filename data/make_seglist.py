#!/usr/bin/env python
"""Write ``image<TAB>mask`` lists for semantic segmentation from the ADE20K layout.

    ADE_ROOT/images/training/ADE_train_00000001.jpg   ADE_ROOT/annotations/training/ADE_train_00000001.png
    ADE_ROOT/images/validation/...                    ADE_ROOT/annotations/validation/...

    python data/make_seglist.py /data/ADEChallengeData2016 --out /data/ade20k/lists
    -> LISTS/train.txt, LISTS/val.txt (paths relative to LISTS; launch/segment.py reads them)

Every pair is checked before anything is written, the way data/scan.py checks images:
a missing mask, an image and mask of different sizes, a mask that is not single-channel
8-bit, or a label above ``--num-classes`` (ADE: 0 = ignore, 1..150 are the classes, so
labels must be <= 150 with the default reduce_zero_label convention) is a one-line error
naming the file, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mapet_ds.filelist import FileListError  # noqa: E402
from mapet_ds.safe_io import UnsafeWriteError, atomic_write_text, out_folder, print_error  # noqa: E402

SPLITS = {"train": "training", "val": "validation"}
IMAGE_EXT = (".jpg", ".jpeg", ".png")


def check_pair(image: str, mask: str, max_label: int, ignore: int) -> str | None:
    """None if the pair is usable, else the problem (one line)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(image) as im:
            isize = im.size
        with Image.open(mask) as m:
            msize, mode = m.size, m.mode
            if mode != "L":
                # a palette PNG would be decoded through its palette (colours, not indices) by DALI
                return (f"mask {mask} has mode {mode}: expected a greyscale 8-bit PNG holding the label per pixel "
                        f"(convert palette masks with PIL: Image.fromarray(np.asarray(im)).save(...))")
            arr = np.asarray(m)
    except OSError as e:
        return f"cannot read {e.filename or image}: {e}"
    if isize != msize:
        return f"image {image} is {isize[0]}x{isize[1]} but its mask {mask} is {msize[0]}x{msize[1]}"
    labels = np.unique(arr)
    bad = labels[(labels > max_label) & (labels != ignore)]
    if bad.size:
        return (f"mask {mask} has label {int(bad[0])} > {max_label} (the largest class id): wrong --num-classes "
                f"or not an ADE-style mask")
    return None


def _check(args):
    return check_pair(*args)


def make_seglists(root: str | os.PathLike, out: str | os.PathLike, *, num_classes: int = 150,
                  reduce_zero_label: bool = True, workers: int | None = None) -> dict[str, Path]:
    root, out = Path(root), Path(out)
    if not (root / "images").is_dir():
        raise FileListError(f"{root} has no images/ folder: expected ADE20K's images/{{training,validation}} and "
                            f"annotations/{{training,validation}}")
    max_label = num_classes if reduce_zero_label else num_classes - 1
    pairs: dict[str, list[tuple[str, str]]] = {}
    for split, folder in SPLITS.items():
        img_dir, ann_dir = root / "images" / folder, root / "annotations" / folder
        if not img_dir.is_dir():
            continue
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXT and p.is_file())
        if not images:
            raise FileListError(f"no images ({', '.join(IMAGE_EXT)}) in {img_dir}")
        found = []
        for p in images:
            m = ann_dir / (p.stem + ".png")
            if not m.is_file():
                raise FileListError(f"image {p} has no mask: {m} does not exist")
            found.append((str(p), str(m)))
        pairs[split] = found
    if not pairs:
        raise FileListError(f"{root}/images has neither training/ nor validation/")
    jobs = [(i, m, max_label, 255) for split in pairs for i, m in pairs[split]]
    with ProcessPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as ex:
        for problem in ex.map(_check, jobs, chunksize=64):
            if problem:
                raise FileListError(problem)
    # the lists (*.txt) cannot be one of the inputs (images and .png masks); the folder is checked
    out_folder(out)
    written = {}
    for split, found in pairs.items():
        lines = [f"{os.path.relpath(i, out)}\t{os.path.relpath(m, out)}\n" for i, m in found]
        if any("\t" in i or "\n" in i for pair in found for i in pair):
            raise FileListError(f"a path under {root} contains a tab or newline; rename it")
        written[split] = atomic_write_text(out / f"{split}.txt", "".join(lines))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="ADE20K folder (ADEChallengeData2016) holding images/ and annotations/")
    ap.add_argument("--out", required=True, help="folder for train.txt / val.txt")
    ap.add_argument("--num-classes", type=int, default=150, help="classes after reduce_zero_label (ADE: 150)")
    ap.add_argument("--no-reduce-zero-label", action="store_true", help="masks hold 0..K-1 directly (255 = ignore)")
    ap.add_argument("--workers", type=int, default=None, help="processes checking masks (default: min(8, CPUs))")
    args = ap.parse_args(argv)
    try:
        written = make_seglists(args.root, args.out, num_classes=args.num_classes,
                                reduce_zero_label=not args.no_reduce_zero_label, workers=args.workers)
    except (FileListError, UnsafeWriteError) as e:
        print_error(e)
        return 2
    for split, path in written.items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{split}: {path} ({n} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
