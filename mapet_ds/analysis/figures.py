"""Pictures that read on their own: the pre-training plan, per-position accuracy, token maps.

:mod:`mapet_ds.analysis.visualize` draws the panels (numpy, exact pixels, tested cell by
cell); this module lays them out in matplotlib figures (Agg, no pyplot state) at least
~900 px wide with a title (run, step), panel titles, colour bars with units and a legend,
and returns uint8 [H, W, 3] like every picture here, so TensorBoard and the PNG files get
the same image.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from mapet_ds.analysis.visualize import (
    GREEN,
    RED,
    WHITE,
    _np,
    figure_to_array,
    new_figure,
    plan_panel,
    token_map,
)

WIDTH = 1200  # px of the plan and token-map figures
PANEL_PX = 224  # each panel is drawn at >= this size so the 1-patch frames stay visible


def _title(what: str, run: Optional[str], step: Optional[int]) -> str:
    where = " | ".join(x for x in (run and f"run {run}", step is not None and f"step {step:,}") if x)
    return f"{what}" + (f" — {where}" if where else "")


def _scale_to(img_chw: np.ndarray, px: int) -> np.ndarray:
    """uint8 [3, H, W] -> nearest upscaled by an integer factor so the short side is >= px."""
    f = max(1, math.ceil(px / min(img_chw.shape[1:])))
    return np.repeat(np.repeat(img_chw, f, axis=1), f, axis=2)


def plan_figure(images, ranks, predicted, target_tokens, predicted_tokens, vocab: int, grid: int, *,
                objective: str = "", run: Optional[str] = None, step: Optional[int] = None,
                width: int = WIDTH) -> np.ndarray:
    """The plan of a few fixed images, one row each -> uint8 [H, width, 3].

    images uint8 [B, 3, H, W]; ranks int [B, N] (permutation step 1..N) or None (mim);
    predicted, target_tokens, predicted_tokens int [B, m]. Columns: image | prediction
    order (colour bar: step, white frames = predicted patches) | target codes at the
    predicted patches, context washed out | the model's codes, green frame = right, red
    = wrong, with the row's token accuracy.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch

    imgs = _np(images)
    b, n = imgs.shape[0], grid * grid
    m = _np(predicted).shape[1]
    row_px = (width - 160) / 4  # four square panels plus the colour bar
    height = int(110 + b * (row_px + 30))
    fig = new_figure(width, height)
    gs = fig.add_gridspec(b, 5, width_ratios=[1, 1, 1, 1, 0.06], left=0.04, right=0.93, top=1 - 80 / height,
                          bottom=60 / height, wspace=0.08, hspace=0.25)
    total_right = 0
    for i in range(b):
        img = _scale_to(imgs[i], PANEL_PX)
        rank = None if ranks is None else _np(ranks)[i]
        row = plan_panel(img, rank, _np(predicted)[i], _np(target_tokens)[i], _np(predicted_tokens)[i], vocab,
                         grid, caption=False, frame=max(2, img.shape[1] // (grid * 20)))
        h, w = img.shape[1:]
        pad = (row.shape[1] - 4 * w) // 3
        panels = [row[:, k * (w + pad): k * (w + pad) + w] for k in range(4)]
        right = int((_np(predicted_tokens)[i] == _np(target_tokens)[i]).sum())
        total_right += right
        titles = ["image", "prediction order" if rank is not None else "mask (mim: no order)",
                  "target codes (predicted patches)", f"model's codes: {right}/{m} right ({right / max(m, 1):.0%})"]
        for k, (panel, t) in enumerate(zip(panels, titles)):
            ax = fig.add_subplot(gs[i, k])
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(t, fontsize=10)
            if k == 0:
                ax.set_ylabel(f"image {i}", fontsize=10)
        cax = fig.add_subplot(gs[i, 4])
        if rank is not None:
            bar = fig.colorbar(ScalarMappable(Normalize(1, n), "viridis"), cax=cax)
            bar.set_label("permutation step (1 = first)", fontsize=9)
        else:
            bar = fig.colorbar(ScalarMappable(Normalize(0, 1), "viridis"), cax=cax, ticks=[0.15, 0.85])
            bar.ax.set_yticklabels(["visible", "masked"])
    acc = total_right / max(b * m, 1)
    fig.suptitle(_title(f"{objective + ' ' if objective else ''}plan on {b} fixed images: {m} of {n} patches "
                        f"predicted, token accuracy {acc:.1%}", run, step), fontsize=13)
    legend = [Patch(facecolor=(0.45, 0.45, 0.45), edgecolor=WHITE / 255, linewidth=2,
                    label="white frame: predicted patch"),
              Patch(facecolor=(0.85, 0.85, 0.85), label="washed out: context patch (given, not predicted)"),
              Patch(facecolor="none", edgecolor=GREEN / 255, label="green: model's code = target"),
              Patch(facecolor="none", edgecolor=RED / 255, label="red: wrong code")]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=9, frameon=False,
               title="colours in the code panels: one fixed colour per code id (same in every picture)",
               title_fontsize=9)
    return figure_to_array(fig)


def position_accuracy_figure(acc, grid: int, *, run: Optional[str] = None, step: Optional[int] = None,
                             source: str = "", width: int = 900, height: int = 800,
                             annotate_max_grid: int = 16) -> np.ndarray:
    """float [N] token accuracy per patch position (NaN = never predicted) -> uint8 [height, width, 3].

    A grid x grid map with patch row/column axes, a colour bar in percent, cell values
    when the grid is <= annotate_max_grid, the mean over predicted positions and ``source``
    (what the accuracy was measured on) in the title.
    """
    from matplotlib.colors import Normalize

    a = _np(acc).astype(np.float64).reshape(-1)
    if a.size != grid * grid:
        raise ValueError(f"accuracy has {a.size} positions, the grid {grid}x{grid} has {grid * grid}")
    pct = 100 * a.reshape(grid, grid)
    seen = np.isfinite(pct)
    mean = float(np.nanmean(pct)) if seen.any() else float("nan")
    fig = new_figure(width, height)
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    cmap = matplotlib.colormaps["magma"].with_extremes(bad=(0.6, 0.6, 0.6))
    im = ax.imshow(np.ma.masked_invalid(pct), cmap=cmap, norm=Normalize(0, 100), interpolation="nearest")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("token accuracy at this position (% of its predictions correct)", fontsize=10)
    ticks = range(0, grid, max(1, grid // 14))
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    if grid <= annotate_max_grid:
        for r in range(grid):
            for c in range(grid):
                v = pct[r, c]
                ax.text(c, r, "—" if not np.isfinite(v) else f"{v:.0f}", ha="center", va="center",
                        fontsize=max(7, 14 - grid // 2), color="black" if np.isfinite(v) and v > 55 else "white")
    unseen = int((~seen).sum())
    what = (f"token accuracy per position{' ' + source if source else ''}: mean {mean:.1f}% over positions"
            + (f", {unseen} never predicted (grey)" if unseen else ""))
    ax.set_title(_title(what, run, step), fontsize=11, wrap=True)
    fig.tight_layout()
    return figure_to_array(fig)


def token_maps_figure(images, tokens, vocab: int, *, cols: int = 4, title: str = "tokenizer",
                      run: Optional[str] = None, step: Optional[int] = None, width: int = WIDTH) -> np.ndarray:
    """Each image beside its token map -> uint8 [H, width, 3] (images uint8 [B, 3, H, W], tokens int [B, g*g])."""
    imgs, toks = _np(images), _np(tokens)
    if imgs.ndim != 4 or toks.ndim != 2 or imgs.shape[0] != toks.shape[0]:
        raise ValueError(f"images [B,3,H,W] and tokens [B,g*g] must share B, got {imgs.shape} and {toks.shape}")
    b = imgs.shape[0]
    cols = max(1, min(cols, b))
    rows = math.ceil(b / cols)
    tile_px = (width - 40) / (2 * cols)
    height = int(70 + rows * (tile_px + 24))
    fig = new_figure(width, height)
    gs = fig.add_gridspec(rows, 2 * cols, left=0.02, right=0.98, top=1 - 60 / height, bottom=0.01,
                          wspace=0.04, hspace=0.18)
    g = int(round(math.sqrt(toks.shape[1])))
    for i in range(b):
        r, c = divmod(i, cols)
        img = imgs[i].transpose(1, 2, 0)
        used = len(np.unique(toks[i]))
        for k, (pic, t) in enumerate([(img, f"image {i}"), (token_map(toks[i], vocab, *img.shape[:2]),
                                                              f"{g}x{g} tokens, {used} distinct")]):
            ax = fig.add_subplot(gs[r, 2 * c + k])
            ax.imshow(pic, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(t, fontsize=9)
    fig.suptitle(_title(f"{title}: each image beside its token map (one fixed colour per code id, vocab {vocab})",
                        run, step), fontsize=12)
    return figure_to_array(fig)


