"""Pictures of what the tokenizer and the model do, as uint8 HWC arrays.

Every function returns a ``numpy.uint8 [H, W, 3]`` array, so the same picture goes to
TensorBoard (``writer.add_image(tag, img, step, dataformats="HWC")``) and to a PNG file
(:func:`save_png`). Grids are drawn with numpy (cheap enough to run every few hundred
steps); charts (histogram, confusion matrix, comparison) with matplotlib's Agg canvas,
never pyplot, so no global figure state leaks between calls.

    python -m mapet_ds.analysis.visualize tokens --store tokens/train --filelist train.txt --out vis/
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

PAD = 2  # px between the two halves of a tile and around panels
GAP = 6  # px between tiles of a grid
HEADER = 14  # px of the caption strip above plan panels
WHITE = np.array([255, 255, 255], np.uint8)
RED = np.array([230, 40, 40], np.uint8)
GREEN = np.array([40, 200, 60], np.uint8)
NAN_GREY = np.array([128, 128, 128], np.uint8)


def _np(x) -> np.ndarray:
    """torch tensor (any device) or array-like -> numpy array."""
    if hasattr(x, "detach"):
        x = x.detach()
        if x.is_floating_point():
            x = x.float()  # numpy has no bfloat16
        x = x.cpu().numpy()
    return np.asarray(x)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 [H, W, 3] (or [H, W]) array as a PNG, atomically (tmp + rename)."""
    from PIL import Image

    arr = _np(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"save_png needs a uint8 [H, W, 3] array, got {arr.dtype} {arr.shape}")
    from mapet_ds.safe_io import atomic_write

    return atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG", optimize=True))


# ---------------------------------------------------------------------------------------
# Colours and small drawing helpers


def code_colors(vocab: int) -> np.ndarray:
    """A stable colour per code id -> uint8 [vocab, 3].

    Colour i is a pure function of i (a splitmix64 hash of the id picks hue, saturation
    and value), so code 17 has the same colour in every picture, run and vocabulary size
    (``code_colors(v)[:k] == code_colors(k)``), and neighbouring ids look unrelated.
    """
    from matplotlib.colors import hsv_to_rgb

    z = np.arange(vocab, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    h = (z & np.uint64(0xFFFF)).astype(np.float64) / 65536.0
    s = 0.45 + 0.55 * ((z >> np.uint64(16)) & np.uint64(0xFF)).astype(np.float64) / 255.0
    v = 0.55 + 0.45 * ((z >> np.uint64(24)) & np.uint64(0xFF)).astype(np.float64) / 255.0
    return np.round(hsv_to_rgb(np.stack([h, s, v], axis=1)) * 255).astype(np.uint8)


def _colormap(values: np.ndarray, name: str = "viridis") -> np.ndarray:
    """values in [0, 1] (NaN -> grey) [...] -> uint8 [..., 3]."""
    import matplotlib

    v = np.asarray(values, dtype=np.float64)
    out = matplotlib.colormaps[name](np.nan_to_num(np.clip(v, 0, 1)), bytes=True)[..., :3]
    out[np.isnan(v)] = NAN_GREY
    return out


def _upsample(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """[g, g, 3] cell colours -> [height, width, 3], nearest (works for sizes not divisible by g)."""
    g = cells.shape[0]
    rows = np.arange(height) * g // height
    cols = np.arange(width) * g // width
    return cells[rows[:, None], cols[None, :]]


def _cell_bounds(index: int, grid: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel box (top, bottom, left, right) of patch ``index`` (row-major) in an HxW picture."""
    r, c = divmod(int(index), grid)
    return r * height // grid, (r + 1) * height // grid, c * width // grid, (c + 1) * width // grid


def _outline(img: np.ndarray, indices, grid: int, colour, width: int = 1) -> None:
    """Draw a ``width``-px frame in place around each listed patch cell of img [H, W, 3]."""
    h, w = img.shape[:2]
    colours = np.broadcast_to(np.asarray(colour, np.uint8), (len(indices), 3))
    for idx, col in zip(indices, colours):
        t, b, l, r = _cell_bounds(idx, grid, h, w)
        img[t : t + width, l:r] = col
        img[b - width : b, l:r] = col
        img[t:b, l : l + width] = col
        img[t:b, r - width : r] = col


def _hwc(image) -> np.ndarray:
    """uint8 [3, H, W] -> [H, W, 3]."""
    arr = _np(image)
    if arr.ndim != 3 or arr.shape[0] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {arr.dtype} {arr.shape} (see denormalize())")
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


def _hstack(tiles: Sequence[np.ndarray], pad: int = PAD) -> np.ndarray:
    h = max(t.shape[0] for t in tiles)
    out = np.full((h, sum(t.shape[1] for t in tiles) + pad * (len(tiles) - 1), 3), 255, np.uint8)
    x = 0
    for t in tiles:
        out[: t.shape[0], x : x + t.shape[1]] = t
        x += t.shape[1] + pad
    return out


def tile_grid(tiles: Sequence[np.ndarray], cols: int, gap: int = GAP) -> np.ndarray:
    """Equal-size uint8 [h, w, 3] tiles -> one picture, ``cols`` per row, white ``gap`` around each.

    Size: rows*h + (rows+1)*gap by cols*w + (cols+1)*gap, rows = ceil(len(tiles) / cols).
    """
    if not tiles:
        raise ValueError("tile_grid needs at least one tile")
    h, w = tiles[0].shape[:2]
    cols = max(1, min(cols, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    out = np.full((rows * h + (rows + 1) * gap, cols * w + (cols + 1) * gap, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        out[y : y + h, x : x + w] = t
    return out


def _caption(width: int, labels: Sequence[str], starts: Sequence[int]) -> np.ndarray:
    """A white strip HEADER px high with each label written at its x offset (PIL's built-in font)."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, HEADER), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for text, x in zip(labels, starts):
        draw.text((x + 1, 1), text, fill=(0, 0, 0))
    return np.asarray(strip, dtype=np.uint8).copy()


def denormalize(images, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised float images [B, 3, H, W] (the pipelines' output) -> uint8 [B, 3, H, W]."""
    x = _np(images).astype(np.float32)
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return np.clip(np.round((x * s + m) * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Tokenizer pictures


def token_map(tokens, vocab: int, height: int, width: int) -> np.ndarray:
    """tokens int [g*g] (row-major) -> uint8 [height, width, 3] in code colours."""
    t = _np(tokens).astype(np.int64).reshape(-1)
    g = int(round(math.sqrt(t.size)))
    if g * g != t.size:
        raise ValueError(f"token row of length {t.size} is not a square grid")
    if t.size and (t.min() < 0 or t.max() >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}), got [{t.min()}, {t.max()}]")
    return _upsample(code_colors(vocab)[t].reshape(g, g, 3), height, width)


def token_map_grid(images, tokens, vocab: int, cols: int = 4) -> np.ndarray:
    """Each image beside its token map, in a grid.

    images: uint8 [B, 3, H, W]; tokens: int [B, g*g] -> uint8 array of
    rows*H + (rows+1)*GAP by cols*(2W+PAD) + (cols+1)*GAP, rows = ceil(B / cols)
    (cols is capped at B).
    """
    imgs, toks = _np(images), _np(tokens)
    if imgs.ndim != 4 or toks.ndim != 2 or imgs.shape[0] != toks.shape[0]:
        raise ValueError(f"images [B,3,H,W] and tokens [B,g*g] must share B, got {imgs.shape} and {toks.shape}")
    h, w = imgs.shape[2:]
    tiles = [_hstack([_hwc(im), token_map(t, vocab, h, w)]) for im, t in zip(imgs, toks)]
    return tile_grid(tiles, cols)


def new_figure(width: int, height: int, dpi: int = 100):
    """A matplotlib Figure of exactly width x height px on its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_to_array(fig) -> np.ndarray:
    """Draw a new_figure() figure -> uint8 [height, width, 3]."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def code_usage_histogram(counts, width: int = 900, height: int = 420, title: str = "code usage") -> np.ndarray:
    """counts [V] (how often each code occurs) -> uint8 [height, width, 3]: usage sorted
    from most to least used, log y; unused codes and the perplexity are in the title."""
    c = _np(counts).astype(np.float64).reshape(-1)
    total = c.sum()
    used = int((c > 0).sum())
    p = c[c > 0] / max(total, 1.0)
    ppl = float(np.exp(-(p * np.log(p)).sum())) if used else 0.0
    fig = new_figure(width, height)
    ax = fig.add_subplot(1, 1, 1)
    srt = np.sort(c)[::-1][:used]
    if used:
        ax.fill_between(np.arange(used), srt, step="post", alpha=0.5, color="tab:blue")
        ax.step(np.arange(used), srt, where="post", color="tab:blue", lw=1)
        ax.set_yscale("log")
    ax.set_xlim(0, max(c.size, 1))
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("occurrences")
    ax.set_title(f"{title}: {used}/{c.size} codes used, {c.size - used} unused, perplexity {ppl:.1f}", fontsize=11)
    fig.tight_layout()
    return figure_to_array(fig)


# ---------------------------------------------------------------------------------------
# Pre-training pictures


class PositionAccuracy:
    """Token accuracy per grid position, accumulated over batches (see position_accuracy).

    Given torch tensors it accumulates with torch on their device (no host sync per
    step, so it can run inside the training step); :meth:`value` copies to the host.
    """

    def __init__(self, num_patches: int):
        self.num_patches = num_patches
        self.hits = None  # float [N] sums, numpy or torch (the type of the first update)
        self.counts = None

    def update(self, hits, predicted) -> None:
        """hits: bool [B, m] (prediction == target); predicted: int [B, m] patch indices."""
        n = self.num_patches
        if hasattr(hits, "detach") and hasattr(predicted, "detach"):
            import torch

            idx = predicted.detach().reshape(-1).long()
            h = hits.detach().reshape(-1).to(torch.float64)
            if h.numel() != idx.numel():
                raise ValueError(f"hits and predicted must have the same shape, got {tuple(hits.shape)} vs "
                                 f"{tuple(predicted.shape)}")
            add_h = torch.bincount(idx, weights=h, minlength=n)[:n]
            add_c = torch.bincount(idx, minlength=n)[:n].to(torch.float64)
        else:
            idx = _np(predicted).reshape(-1).astype(np.int64)
            h = _np(hits).reshape(-1).astype(np.float64)
            if h.size != idx.size:
                raise ValueError(f"hits and predicted must have the same shape, got {h.size} vs {idx.size} elements")
            add_h = np.bincount(idx, weights=h, minlength=n)[:n]
            add_c = np.bincount(idx, minlength=n)[:n].astype(np.float64)
        self.hits = add_h if self.hits is None else self.hits + add_h
        self.counts = add_c if self.counts is None else self.counts + add_c

    def reset(self) -> None:
        self.hits = self.counts = None

    def value(self) -> np.ndarray:
        """float [N]: accuracy per position, NaN where nothing was predicted yet (host copy)."""
        if self.hits is None:
            return np.full(self.num_patches, np.nan)
        hits, counts = _np(self.hits).astype(np.float64), _np(self.counts).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def position_accuracy(hits, predicted, num_patches: int, acc: Optional[PositionAccuracy] = None) -> np.ndarray:
    """Accuracy over the grid: hits bool [B, m], predicted int [B, m] -> float [N] (NaN = never predicted).

    Pass the same ``acc`` (a PositionAccuracy) on every batch to accumulate over batches;
    the return value is then the accuracy over everything seen so far.
    """
    acc = acc if acc is not None else PositionAccuracy(num_patches)
    acc.update(hits, predicted)
    return acc.value()


def position_accuracy_map(acc, grid: int, size: int = 128, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """float [N] per-position accuracy -> uint8 [size, size, 3] heat map ('magma'; NaN grey)."""
    a = _np(acc).astype(np.float64).reshape(-1)
    if a.size != grid * grid:
        raise ValueError(f"accuracy has {a.size} positions, the grid {grid}x{grid} has {grid * grid}")
    scaled = (a - vmin) / max(vmax - vmin, 1e-12)
    return _upsample(_colormap(scaled.reshape(grid, grid), "magma"), size, size)


def plan_panel(image, rank, predicted, target_tokens, predicted_tokens, vocab: int, grid: int,
               caption: bool = True, frame: int = 1) -> np.ndarray:
    """One validation image and what the objective did with it, four panels side by side.

    image: uint8 [3, H, W]; rank: int [N] permutation step of each patch (1..N; None for
    mim, whose masked patches are then shown as the predicted set); predicted: int [m]
    patch indices; target_tokens / predicted_tokens: int [m] code ids at those positions.
    Panels: the image | rank as a heat map (dark = early), predicted patches framed white and
    context patches washed out |
    target tokens at the predicted positions (context dimmed) | the model's tokens,
    framed green where right and red where wrong (frames ``frame`` px wide). Returns uint8
    [HEADER + H, 4W + 3*PAD, 3] (without the caption strip when ``caption`` is False).
    :func:`mapet_ds.analysis.figures.plan_figure` lays these out with titles and legends.
    """
    img = _hwc(image)
    h, w = img.shape[:2]
    n = grid * grid
    pred = _np(predicted).astype(np.int64).reshape(-1)
    tgt = _np(target_tokens).astype(np.int64).reshape(-1)
    out = _np(predicted_tokens).astype(np.int64).reshape(-1)
    if not (pred.size == tgt.size == out.size):
        raise ValueError(f"predicted, target_tokens, predicted_tokens must have the same length m, got "
                         f"{pred.size}, {tgt.size}, {out.size}")
    if pred.size and (pred.min() < 0 or pred.max() >= n):
        raise ValueError(f"predicted patch indices must be in [0, {n}) for a {grid}x{grid} grid")
    is_pred = np.zeros(n, bool)
    is_pred[pred] = True
    if rank is not None:
        r = _np(rank).astype(np.float64).reshape(-1)
        if r.size != n:
            raise ValueError(f"rank has {r.size} entries, the {grid}x{grid} grid has {n}")
        heat = _colormap(((r - 1) / max(n - 1, 1)).reshape(grid, grid))
    else:  # mim: no order, only masked (predicted) vs visible
        heat = _colormap(np.where(is_pred, 0.85, 0.15).reshape(grid, grid))
    heat = _upsample(heat, h, w)
    cell_mask = _upsample(is_pred.reshape(grid, grid), h, w)  # bool [H, W]: pixel lies in a predicted cell
    heat = np.where(cell_mask[..., None], heat, (heat.astype(np.uint16) // 3 + 170).astype(np.uint8))
    _outline(heat, pred, grid, WHITE, frame)

    dim = (img.astype(np.uint16) // 3 + 170).astype(np.uint8)  # a washed-out context background
    colours = code_colors(vocab)

    def tokens_panel(codes: np.ndarray) -> np.ndarray:
        cells = np.zeros((n, 3), np.uint8)
        cells[pred] = colours[np.clip(codes, 0, vocab - 1)]
        return np.where(cell_mask[..., None], _upsample(cells.reshape(grid, grid, 3), h, w), dim)

    target_panel = tokens_panel(tgt)
    output_panel = tokens_panel(out)
    right = out == tgt
    _outline(output_panel, pred[right], grid, GREEN, frame)
    _outline(output_panel, pred[~right], grid, RED, frame)
    row = _hstack([img, heat, target_panel, output_panel])
    if not caption:
        return row
    acc = float(right.mean()) if right.size else float("nan")
    labels = ["image", "rank" if rank is not None else "mask", "target", f"pred {acc:.0%}"]
    cap = _caption(row.shape[1], labels, [i * (w + PAD) for i in range(4)])
    return np.concatenate([cap, row], axis=0)


def plan_panels(images, ranks, predicted, target_tokens, predicted_tokens, vocab: int, grid: int) -> np.ndarray:
    """plan_panel for a batch, one row per image, caption on the first row only.

    images uint8 [B,3,H,W]; ranks int [B,N] or None (mim); predicted, target_tokens,
    predicted_tokens int [B,m] -> uint8 [HEADER + B*H + (B-1)*PAD, 4W + 3*PAD, 3].
    """
    imgs = _np(images)
    rows = [plan_panel(imgs[i], None if ranks is None else _np(ranks)[i], _np(predicted)[i],
                       _np(target_tokens)[i], _np(predicted_tokens)[i], vocab, grid, caption=i == 0)
            for i in range(imgs.shape[0])]
    pad = np.full((PAD, rows[0].shape[1], 3), 255, np.uint8)
    parts = [rows[0]]
    for r in rows[1:]:
        parts += [pad, r]
    return np.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------
# Fine-tuning pictures


def confusion_matrix_image(conf, class_names: Optional[Sequence[str]] = None, size: Optional[int] = None,
                           max_labels: int = 40, title: str = "") -> np.ndarray:
    """conf int [C, C] (rows = true class, columns = predicted) -> uint8 [S, S, 3].

    Rows are normalised to recall; the title gives the overall accuracy. Class names are
    written when C <= max_labels, cell values when C <= 12. S defaults to
    clamp(600 + 14*C, 800, 1400) px. ``title`` (e.g. run and step) leads the title line.
    """
    m = _np(conf).astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be [C, C], got {m.shape}")
    c = m.shape[0]
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for a {c}x{c} confusion matrix")
    s = size or int(min(max(600 + 14 * c, 800), 1400))
    recall = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    acc = np.trace(m) / max(m.sum(), 1)
    fig = new_figure(s, s)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label("recall (fraction of the true class)", fontsize=10)
    ax.set_title(f"{title + ': ' if title else ''}confusion (row-normalised), top-1 {100 * acc:.1f}% of "
                 f"{int(m.sum())} images", fontsize=11)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= max_labels:
        names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
        ax.set_xticks(range(c), names, rotation=90, fontsize=9 if c <= 20 else 7)
        ax.set_yticks(range(c), names, fontsize=9 if c <= 20 else 7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if c <= 12:
        for i in range(c):
            for j in range(c):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=9,
                            color="white" if recall[i, j] > 0.5 else "black")
    fig.tight_layout()
    return figure_to_array(fig)


# ---------------------------------------------------------------------------------------
# CLI: tokenizer pictures of a token store


def tokenizer_pictures(store_dir: str, filelist: str, out_dir: str, *, root: Optional[str] = None, num: int = 16,
                       cols: int = 4, size: Optional[int] = None) -> dict[str, Path]:
    """Write token_maps.png (``num`` images spread over the list, beside their token maps)
    and code_usage.png (usage over the whole store) into ``out_dir``."""
    from mapet_ds.filelist import FileList, read_filelist
    from mapet_ds.pipelines import tokenizer_view_loader
    from mapet_ds.tokenizers import TokenStore

    fl = read_filelist(filelist, root)
    store = TokenStore.open(store_dir, filelist=fl, allow_incomplete=True)
    rows = store.complete_rows()
    done = np.flatnonzero(rows)
    if done.size == 0:
        raise ValueError(f"token store {store_dir} has no complete rows yet (run launch/tokens.py assign)")
    ids = done[np.linspace(0, done.size - 1, min(num, done.size)).round().astype(np.int64)]
    ids = np.unique(ids)  # spread over the list, so over the classes of a class-sorted list
    extractor = (store.spec.get("extractor") or {}) if isinstance(store.spec, dict) else {}
    view = size or int(extractor.get("input_size") or 16 * store.grid)
    sub = FileList(fl.list_path, fl.root, [fl.paths[i] for i in ids], [fl.labels[i] for i in ids], fl.classes)
    images = []
    for batch in tokenizer_view_loader(sub, size=view, batch_size=len(ids), num_threads=2):
        images.append(_np(batch["images"]))
    from mapet_ds.analysis.figures import token_maps_figure

    grid_img = token_maps_figure(np.concatenate(images)[: len(ids)], np.asarray(store.tokens[ids]), store.vocab,
                                 cols=cols, title=f"token store {Path(store_dir).name}")
    counts = np.zeros(store.vocab, np.int64)
    for start in range(0, done.size, 1 << 16):  # a memory-mapped ImageNet store, in slices
        chunk = np.asarray(store.tokens[done[start : start + (1 << 16)]]).reshape(-1).astype(np.int64)
        counts += np.bincount(chunk[chunk >= 0], minlength=store.vocab)[: store.vocab]
    out = Path(out_dir)
    paths = {"token_maps": save_png(grid_img, out / "token_maps.png"),
             "code_usage": save_png(code_usage_histogram(counts, title=f"{Path(store_dir).name}"),
                                    out / "code_usage.png")}
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mapet_ds.analysis.visualize", description="Write pictures as PNG files")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokens", help="token maps of a few images and the code usage of a token store")
    t.add_argument("--store", required=True, help="token store directory (launch/tokens.py assign --out)")
    t.add_argument("--filelist", required=True, help="the file list the store was made from")
    t.add_argument("--root", default=None)
    t.add_argument("--num", type=int, default=16, help="images in the grid")
    t.add_argument("--cols", type=int, default=4)
    t.add_argument("--size", type=int, default=None, help="image side px (default: the tokenizer's input size)")
    t.add_argument("--out", default="vis", help="output folder")
    a = ap.parse_args(argv)
    from mapet_ds.filelist import FileListError
    from mapet_ds.tokenizers import TokenStoreError

    try:
        paths = tokenizer_pictures(a.store, a.filelist, a.out, root=a.root, num=a.num, cols=a.cols, size=a.size)
    except (FileListError, TokenStoreError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
