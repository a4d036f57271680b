#!/usr/bin/env python
"""Generate the embedded demo dataset: procedural shapes and textures, ImageNet layout.

Ten classes, told apart by shape or texture only (colours, backgrounds, position, size,
rotation, noise and JPEG quality are random per image), so a small ViT must learn
shapes, not colour statistics, yet reaches far above chance in minutes::

    OUT/train/<class>/<class>_00000.JPEG ...   OUT/val/<class>/...
    OUT/train.txt  OUT/val.txt  OUT/classes.txt   (written by data/make_filelist.py)

Images are non-square (each side in [size, 1.25 * size]) with the object near the
centre square, so the centre-crop pipelines have real work to do. Output is a pure
function of the arguments: image ``i`` of class ``c`` in split ``s`` is drawn from its
own RNG seeded by (seed, s, c, i).

    python data/make_demo.py --out demo_data                  # ~3k images, 80 px
    python data/make_demo.py --out /tmp/d --num-train-per-class 4 --num-val-per-class 2 --size 48
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_filelist import make_filelists  # noqa: E402

from mapet_ds.safe_io import UnsafeWriteError, atomic_write_bytes  # noqa: E402  (make_filelist put the repo on the path)

CLASSES = (
    "checkerboard",
    "circle",
    "cross",
    "dots",
    "horizontal_stripes",
    "ring",
    "square",
    "star",
    "triangle",
    "vertical_stripes",
)
SPLITS = ("train", "val")


def _luma(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background and a foreground colour that differ clearly in brightness."""
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    while True:
        fg = tuple(int(v) for v in rng.integers(0, 256, 3))
        if abs(_luma(fg) - _luma(bg)) > 70:
            return bg, fg


def _background(rng: np.random.Generator, w: int, h: int, bg: tuple[int, ...]) -> Image.Image:
    kind = rng.integers(0, 3)
    base = np.array(bg, dtype=np.float32)
    if kind == 0:  # flat
        arr = np.broadcast_to(base, (h, w, 3)).copy()
    elif kind == 1:  # linear gradient toward a second colour
        other = base + rng.uniform(-60, 60, 3)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        arr = base + t[..., None] * (other - base)
    else:  # smooth blotches: a coarse random grid upsampled
        coarse = rng.uniform(-50, 50, (4, 4, 3)).astype(np.float32)
        up = np.array(Image.fromarray(((coarse + 128)).clip(0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                      dtype=np.float32) - 128
        arr = base + up
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
        rad = (inner if inner and k % 2 else r)
        a = rot + k * math.pi / (n if inner else n / 2)
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


class _Both:
    """Draws every shape on the image and, with the class's label as fill, on its mask."""

    def __init__(self, img: Image.Image, mask: Image.Image | None, label: int):
        self.d, self.m, self.label = ImageDraw.Draw(img), (ImageDraw.Draw(mask) if mask is not None else None), label

    def __getattr__(self, op):
        def draw(*args, **kw):
            getattr(self.d, op)(*args, **kw)
            if self.m is not None:
                getattr(self.m, op)(*args, **{k: (self.label if k in ("fill", "outline") else v) for k, v in kw.items()})
        return draw


def draw_sample(cls: str, rng: np.random.Generator, size: int, with_mask: bool = False):
    """One RGB image of class ``cls``, sides in [size, 1.25 * size]; with ``with_mask`` also its
    mask (PIL "L"): ADE convention, 1 = background, 2 + class index = the shape's pixels
    (0, ignore, is not used). Drawing the mask draws no random numbers: images are unchanged."""
    w, h = (int(v) for v in rng.integers(size, int(size * 1.25) + 1, 2))
    bg, fg = _colours(rng)
    img = _background(rng, w, h, bg)
    mask = Image.new("L", (w, h), 1) if with_mask else None
    d = _Both(img, mask, 2 + CLASSES.index(cls))
    s = min(w, h)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * s
    cy = h / 2 + rng.uniform(-0.12, 0.12) * s
    r = rng.uniform(0.22, 0.38) * s
    rot = rng.uniform(0, 2 * math.pi)
    period = max(4, int(s * rng.uniform(0.1, 0.18)))
    if cls == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif cls == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r * 0.3)))
    elif cls == "square":
        d.polygon(_polygon(cx, cy, r * 1.1, 4, rot), fill=fg)
    elif cls == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.2, 3, rot), fill=fg)
    elif cls == "star":
        d.polygon(_polygon(cx, cy, r * 1.2, 5, rot, inner=r * 0.45), fill=fg)
    elif cls == "cross":
        t = r * 0.3
        arm = [(-r, -t), (r, -t), (r, t), (-r, t)]
        c, sn = math.cos(rot), math.sin(rot)
        for pts in (arm, [(y, x) for x, y in arm]):
            d.polygon([(cx + x * c - y * sn, cy + x * sn + y * c) for x, y in pts], fill=fg)
    elif cls in ("horizontal_stripes", "vertical_stripes"):
        offset = int(rng.integers(0, period))
        for k in range(-1, (h if cls[0] == "h" else w) // period + 2):
            a = k * period + offset
            box = [0, a, w, a + period // 2] if cls[0] == "h" else [a, 0, a + period // 2, h]
            d.rectangle(box, fill=fg)
    elif cls == "checkerboard":
        ox, oy = (int(v) for v in rng.integers(0, period, 2))
        for i in range(-1, h // period + 2):
            for j in range(-1, w // period + 2):
                if (i + j) % 2 == 0:
                    x0, y0 = j * period + ox, i * period + oy
                    d.rectangle([x0, y0, x0 + period - 1, y0 + period - 1], fill=fg)
    elif cls == "dots":
        dr = max(1.5, period * 0.28)
        ox, oy = rng.uniform(0, period, 2)
        for i in range(-1, h // period + 2):
            for j in range(-1, w // period + 2):
                x0, y0 = j * period + ox, i * period + oy
                d.ellipse([x0 - dr, y0 - dr, x0 + dr, y0 + dr], fill=fg)
    else:
        raise ValueError(f"unknown demo class {cls!r}")
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(0, 8), arr.shape)
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return (out, mask) if with_mask else out


def _save_jpeg(img: Image.Image, path: Path, quality: int) -> None:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    atomic_write_bytes(path, buf.getvalue())


def _refuse_foreign_dataset(out: Path, classes: tuple[str, ...]) -> None:
    """The demo rewrites OUT/{train,val}/<demo class>/ and OUT/*.txt: never inside someone's real data set."""
    for split in SPLITS:
        d = out / split
        foreign = sorted(c.name for c in d.iterdir() if c.is_dir() and c.name not in classes) if d.is_dir() else []
        if foreign:
            raise UnsafeWriteError(f"refusing to write the demo into {out}: {d / foreign[0]} is not a demo class "
                                   f"folder (another data set is there); choose an empty --out")


def make_demo(out_dir: str | os.PathLike, *, num_train_per_class: int = 260, num_val_per_class: int = 50,
              size: int = 80, seed: int = 0, classes: tuple[str, ...] = CLASSES,
              segmentation: bool = False) -> dict[str, Path]:
    """Write the demo images and their file lists under ``out_dir``; return the list paths."""
    if size < 16:
        raise ValueError(f"size={size}: use at least 16 px")
    out = Path(out_dir)
    _refuse_foreign_dataset(out, classes)
    counts = {"train": num_train_per_class, "val": num_val_per_class}
    for split_idx, split in enumerate(SPLITS):
        for cls_idx, cls in enumerate(classes):
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, split_idx, cls_idx, i])
                img = draw_sample(cls, rng, size, with_mask=segmentation)
                if segmentation:
                    img, mask = img
                    buf = io.BytesIO()
                    mask.save(buf, format="PNG")
                    (out / "masks" / split / cls).mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(out / "masks" / split / cls / f"{cls}_{i:05d}.png", buf.getvalue())
                _save_jpeg(img, folder / f"{cls}_{i:05d}.JPEG", quality=int(rng.integers(80, 96)))
    written = make_filelists(out)
    if segmentation:
        written.update(_write_seglists(out, classes, counts))
    return written


def _write_seglists(out: Path, classes: tuple[str, ...], counts: dict[str, int]) -> dict[str, Path]:
    """OUT/seg_{train,val}.txt (``image<TAB>mask``) and OUT/seg_classes.txt (after reduce_zero_label)."""
    from mapet_ds.safe_io import atomic_write_text

    written = {}
    for split in SPLITS:
        lines = [f"{split}/{c}/{c}_{i:05d}.JPEG\tmasks/{split}/{c}/{c}_{i:05d}.png\n"
                 for c in classes for i in range(counts[split])]
        written[f"seg_{split}"] = atomic_write_text(out / f"seg_{split}.txt", "".join(lines))
    atomic_write_text(out / "seg_classes.txt", "".join(f"{c}\n" for c in ("background", *classes)))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_data", help="output folder (default: demo_data)")
    ap.add_argument("--num-train-per-class", type=int, default=260)
    ap.add_argument("--num-val-per-class", type=int, default=50)
    ap.add_argument("--size", type=int, default=80, help="shorter image side lower bound, px (default 80)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segmentation", action="store_true",
                    help="also write each image's shape mask (OUT/masks/...) and OUT/seg_{train,val}.txt")
    args = ap.parse_args(argv)
    try:
        written = make_demo(args.out, num_train_per_class=args.num_train_per_class,
                            num_val_per_class=args.num_val_per_class, size=args.size, seed=args.seed,
                            segmentation=args.segmentation)
    except UnsafeWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_train, n_val = args.num_train_per_class * len(CLASSES), args.num_val_per_class * len(CLASSES)
    print(f"demo dataset in {args.out}: {len(CLASSES)} classes, {n_train} train + {n_val} val images; "
          f"lists: {', '.join(str(p) for p in written.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
