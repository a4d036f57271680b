"""Segmentation metrics from a per-class confusion histogram (mmseg's definitions).

``hist[t, p]`` counts pixels of ground-truth class ``t`` predicted as ``p`` (ignored pixels
never enter). Summed over images and all-reduced over ranks it is the whole validation
set, so the metrics do not depend on the world size or on how images were sharded:

* IoU_c = hist[c,c] / (row_c + col_c - hist[c,c]); NaN when class c is neither in the
  ground truth nor predicted (excluded from the mean, mmseg's ``nanmean``)
* Acc_c = hist[c,c] / row_c; NaN when class c has no ground-truth pixel
* mIoU, mAcc = nan-means (in %); aAcc = trace / total (in %)
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch


def confusion_histogram(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = 255) -> torch.Tensor:
    """pred, label int [...] (same shape) -> int64 [K, K]; pixels with label == ignore_index
    (or any label outside 0..K-1) are skipped."""
    keep = (label >= 0) & (label < num_classes) & (label != ignore_index)
    idx = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def seg_metrics(hist: torch.Tensor | np.ndarray) -> dict:
    """[K, K] histogram -> {"mIoU", "mAcc", "aAcc" (%), "iou", "acc" (per class, fraction or NaN),
    "pixels" (ground-truth pixels per class)}."""
    h = np.asarray(hist.cpu() if isinstance(hist, torch.Tensor) else hist, dtype=np.float64)
    inter = np.diag(h)
    gt, pr = h.sum(1), h.sum(0)
    union = gt + pr - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(gt > 0, inter / gt, np.nan)
    total = h.sum()
    return {"mIoU": 100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "mAcc": 100.0 * float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
            "aAcc": 100.0 * float(inter.sum() / total) if total > 0 else float("nan"),
            "iou": iou, "acc": acc, "pixels": gt.astype(np.int64)}


def iou_table(metrics: dict, class_names: Optional[Sequence[str]] = None) -> str:
    """Tab-separated per-class table (class, name, IoU %, Acc %, GT pixels) + the means."""
    rows = ["class\tname\tIoU\tAcc\tpixels"]
    for c, (i, a, n) in enumerate(zip(metrics["iou"], metrics["acc"], metrics["pixels"])):
        name = class_names[c] if class_names is not None and c < len(class_names) else f"class_{c}"
        fmt = lambda v: "nan" if not np.isfinite(v) else f"{100 * v:.2f}"  # noqa: E731
        rows.append(f"{c}\t{name}\t{fmt(i)}\t{fmt(a)}\t{int(n)}")
    rows.append(f"mean\t-\t{metrics['mIoU']:.2f}\t{metrics['mAcc']:.2f}\t{int(np.sum(metrics['pixels']))}")
    rows.append(f"aAcc\t-\t{metrics['aAcc']:.2f}\t-\t-")
    return "\n".join(rows) + "\n"


def read_class_names(path: Optional[str | os.PathLike]) -> Optional[list[str]]:
    if not path:
        return None
    from mapet_ds.config import ConfigError

    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"segment.class_names={str(path)!r}: cannot be read ({e}); one class name per line") \
            from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]
