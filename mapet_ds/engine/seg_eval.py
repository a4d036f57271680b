"""Segmentation evaluation: sliding-window inference (BEiT/mmseg ``mode='slide'``), the
distributed confusion histogram, and the overlay picture.

Every validation pixel is counted once at any world size: each rank evaluates its
contiguous shard of the list (``SegEvalLoader``) at full mask resolution, the [K, K]
histograms are summed over ranks, then the metrics are computed once.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mapet_ds.engine.dist import all_reduce_sum
from mapet_ds.engine.seg_metrics import confusion_histogram, seg_metrics
from mapet_ds.models.segmentation import upsample_logits
from mapet_ds.pipelines.segmentation import eval_windows
from mapet_ds.transfer import to_device


@torch.no_grad()
def slide_logits(model: torch.nn.Module, image: torch.Tensor, crop: int, stride: int, dtype=torch.float32,
                 flip: bool = False) -> torch.Tensor:
    """image [1,3,h,w] (any size) -> class scores [1,K,h,w]: mean of the logits of every
    ``crop`` window covering a pixel (windows past a border are zero-padded, as mmseg's
    model pads them); ``flip`` adds the flipped image's logits, flipped back."""
    _, _, h, w = image.shape
    wins = eval_windows(h, w, crop, stride)
    tiles = []
    for y, x in wins:
        t = image[:, :, y:y + crop, x:x + crop]
        tiles.append(F.pad(t, (0, crop - t.shape[3], 0, crop - t.shape[2])))
    batch = torch.cat(tiles)
    out = upsample_logits(model(batch.to(dtype))[0].float(), (crop, crop))
    if flip:
        out = out + upsample_logits(model(batch.flip(3).to(dtype))[0].float(), (crop, crop)).flip(3)
    total = torch.zeros(1, out.shape[1], h, w, device=out.device)
    count = torch.zeros(1, 1, h, w, device=out.device)
    for (y, x), o in zip(wins, out):
        hh, ww = min(crop, h - y), min(crop, w - x)
        total[0, :, y:y + hh, x:x + ww] += o[:, :hh, :ww]
        count[0, :, y:y + hh, x:x + ww] += 1
    return total / count


@torch.no_grad()
def predict(model, image: torch.Tensor, out_size: Sequence[int], *, crop: int, stride: int, scales=(1.0,),
            flip: bool = False, dtype=torch.float32) -> torch.Tensor:
    """image [1,3,h,w] (eval view) -> class map int64 [H, W] at the mask's ``out_size``;
    several ``scales`` average softmax scores (mmseg aug_test)."""
    probs = 0
    for s in scales:
        img = image if s == 1.0 else F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False)
        logits = slide_logits(model, img, crop, stride, dtype, flip)
        probs = probs + upsample_logits(logits, out_size).softmax(1)
    return probs.argmax(1)[0]


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, loader, device: torch.device, *, num_classes: int,
                          ignore_index: int, crop: int, stride: int, scales=(1.0,), flip: bool = False,
                          dtype=torch.float32, keep: int = 0) -> dict:
    """Metrics over the whole list (all ranks); ``keep`` images of this rank, evenly spread over
    its shard, are returned for the picture as (image [3,h,w] normalised, mask [H,W], prediction [H,W])."""
    was_training = model.training
    model.eval()
    hist = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    kept = []
    images = 0
    # spread, not the first ones: lists sorted by scene or class (the demo's) would show one kind only
    n_local = len(loader) if hasattr(loader, "__len__") else keep
    k = min(keep, n_local)
    picks = {round(i * (n_local - 1) / max(k - 1, 1)) for i in range(k)}
    for i, batch in enumerate(loader):
        image, mask = to_device(batch["images"], device), to_device(batch["masks"], device)
        pred = predict(model, image, mask.shape[-2:], crop=crop, stride=stride, scales=scales, flip=flip, dtype=dtype)
        hist += confusion_histogram(pred, mask[0], num_classes, ignore_index)
        images += 1
        if i in picks:
            kept.append((image[0].cpu(), mask[0].cpu(), pred.cpu()))
    model.train(was_training)
    hist = all_reduce_sum(hist)
    n = all_reduce_sum(torch.tensor([images], dtype=torch.int64, device=device))
    out = seg_metrics(hist)
    out.update(hist=hist.cpu(), images=int(n[0]), kept=kept)
    return out


def palette(num_classes: int) -> np.ndarray:
    """uint8 [K, 3]: distinct colours (matplotlib tab20, then a fixed random draw)."""
    from matplotlib import colormaps

    base = (np.asarray(colormaps["tab20"].colors) * 255).astype(np.uint8)
    extra = np.random.default_rng(0).integers(0, 256, (max(0, num_classes - len(base)), 3), dtype=np.uint8)
    return np.concatenate([base, extra])[:num_classes]


def overlay_picture(kept, mean, std, num_classes: int, ignore_index: int,
                    class_names: Optional[Sequence[str]] = None, title: str = "") -> np.ndarray:
    """Rows of (image | ground truth over it | prediction over it) + a legend of the classes
    shown. -> uint8 [H, W>=900, 3]."""
    from mapet_ds.analysis.visualize import figure_to_array, new_figure

    pal = palette(num_classes)
    rows = max(1, len(kept))
    fig = new_figure(1200, 40 + 300 * rows + 60)
    shown: set[int] = set()
    for r, (img, mask, pred) in enumerate(kept):
        rgb = (img.permute(1, 2, 0).numpy() * np.asarray(std) + np.asarray(mean)).clip(0, 1)
        rgb = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), size=tuple(mask.shape),
                            mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy().clip(0, 1)
        for c, (what, lab) in enumerate((("image", None), ("ground truth", mask), ("prediction", pred))):
            ax = fig.add_axes((c / 3 + 0.005, 1 - (40 + 300 * (r + 1)) / fig.bbox.height, 1 / 3 - 0.01,
                               290 / fig.bbox.height))
            pic = rgb
            if lab is not None:
                lab = lab.numpy()
                valid = lab != ignore_index
                col = pal[np.where(valid, lab, 0).clip(0, num_classes - 1)] / 255.0
                pic = np.where(valid[..., None], 0.45 * rgb + 0.55 * col, rgb)
                shown |= set(np.unique(lab[valid]).tolist())
            ax.imshow(pic, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(what, fontsize=12)
    if title:
        fig.suptitle(title, fontsize=12, y=1 - 8 / fig.bbox.height, va="top")
    from matplotlib.patches import Patch

    names = [class_names[c] if class_names and c < len(class_names) else f"class {c}" for c in sorted(shown)]
    handles = [Patch(color=pal[c] / 255.0, label=n) for c, n in zip(sorted(shown), names)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=10, frameon=False)
    return figure_to_array(fig)
