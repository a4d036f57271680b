"""k-NN evaluation of a (pre-trained) backbone on frozen features, as in DINO's eval_knn.

    feats, labels, ids = extract_features(backbone, train_loader, device, pool="cls")
    test_feats, test_labels, _ = extract_features(backbone, val_loader, device, pool="cls")
    knn_eval(feats, labels, test_feats, test_labels, k=20, T=0.07)   # {"top1": .., "top5": ..}

Features (``pool``), both after the model's final LayerNorm:

- ``"cls"`` (default): the [CLS] token. MaPeT trains no CLS objective, but every
  position attends to [CLS] as context in all layers, so it becomes an image summary; on
  the demo data it probes better than the mean (500-step demo backbone: k-NN 64.2% vs
  56.4%, linear probe 71.2% vs 69.4%; bench/RESULTS.md), which is why it is the default (DINO's k-NN and MAE's linear probe also read [CLS]).
- ``"mean"``: the mean of the patch tokens, what the fine-tuning head sees (METHOD.md 5).
  For a pre-training backbone (``global_pool="token"``) that is ``mean(norm(tokens))``,
  the norm the token-prediction head was trained behind; for a classifier-style model
  (``global_pool="avg"``, ``fc_norm``) timm's own pre-logits, ``fc_norm(mean(tokens))``.

Everything here is local to one process: gathering features over ranks is the caller's job.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mapet_ds.transfer import to_device


def _vit(model: nn.Module) -> VisionTransformer:
    """The timm ViT inside ``model`` (itself, a PretrainModel's ``backbone``, or a DeepSpeed ``module``)."""
    for _ in range(3):
        if isinstance(model, VisionTransformer):
            return model
        inner = getattr(model, "backbone", None)
        model = inner if inner is not None else getattr(model, "module", None)
        if model is None:
            break
    raise TypeError("extract_features needs a timm VisionTransformer (or a PretrainModel / engine holding one)")


POOLS = ("cls", "mean")


def pooled_features(model: nn.Module, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """images [B, C, H, W] -> features [B, D]: [CLS] or the mean of patch tokens, after the final norm (module doc)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    vit = _vit(model)
    tokens = vit.forward_features(images)  # [B, 1+N, D]; final `norm` applied when it exists
    if pool == "cls":
        if vit.cls_token is None:
            raise ValueError("pool='cls' needs a ViT with a [CLS] token (class_token=True): use pool='mean'")
        return tokens[:, 0]
    if vit.global_pool == "avg":
        return vit.forward_head(tokens, pre_logits=True)  # fc_norm(mean of patch tokens)
    return tokens[:, vit.num_prefix_tokens:].mean(dim=1)


def _batch(item):
    # DALI iterators yield a list with one dict per pipeline
    return item[0] if isinstance(item, (list, tuple)) and len(item) == 1 and isinstance(item[0], dict) else item


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable[dict],
    device: torch.device | str,
    *,
    autocast_dtype: Optional[torch.dtype] = None,
    pool: str = "cls",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``backbone`` over ``loader`` -> (feats [N, D] float32, labels [N] int64, sample_ids [N] int64), on CPU.

    The loader yields dicts {"images": [B,C,H,W], "labels": [B], "sample_ids": [B],
    optional "valid": bool [B]}; rows with valid=False (padding of a last batch) are
    dropped. ``autocast_dtype`` (e.g. torch.bfloat16 on GPU) runs the forward in autocast.
    ``pool``: "cls" or "mean" (module doc).
    The model is put in eval mode and restored afterwards.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    feats, labels, ids = [], [], []
    try:
        for item in loader:
            batch = _batch(item)
            images = to_device(batch["images"], device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                f = pooled_features(backbone, images, pool)
            f = f.float().cpu()
            y = torch.as_tensor(batch["labels"]).reshape(-1).long().cpu()
            sid = torch.as_tensor(batch["sample_ids"]).reshape(-1).long().cpu()
            if "valid" in batch and batch["valid"] is not None:
                keep = torch.as_tensor(batch["valid"]).reshape(-1).bool().cpu()
                f, y, sid = f[keep], y[keep], sid[keep]
            feats.append(f)
            labels.append(y)
            ids.append(sid)
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels), torch.cat(ids)


@torch.no_grad()
def knn_eval(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    T: float = 0.07,
    num_classes: Optional[int] = None,
    batch_size: int = 256,
    device: Optional[torch.device | str] = None,
) -> dict[str, float]:
    """Weighted k-NN classification (DINO): top-1 / top-5 accuracy in percent.

    train_feats [N, D], train_labels [N] (int), test_feats [M, D], test_labels [M] (int).
    Features are L2-normalised, so the similarity is the cosine; each test sample's k
    nearest train samples vote for their label with weight exp(sim / T). Test samples
    are processed ``batch_size`` at a time (memory: batch_size x N similarities).
    ``num_classes`` defaults to 1 + the largest label; ``device`` to train_feats' device.
    Returns {"top1", "top5", "k", "T", "num_train", "num_test"}.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D] with the same D, got {tuple(train_feats.shape)} "
                         f"and {tuple(test_feats.shape)}")
    if train_labels.shape[0] != train_feats.shape[0] or test_labels.shape[0] != test_feats.shape[0]:
        raise ValueError(f"labels/features length mismatch: {train_labels.shape[0]} vs {train_feats.shape[0]} (train), "
                         f"{test_labels.shape[0]} vs {test_feats.shape[0]} (test)")
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("knn_eval needs at least one train and one test sample")
    if k < 1 or T <= 0:
        raise ValueError(f"k={k} must be >= 1 and T={T} > 0")
    device = torch.device(device) if device is not None else train_feats.device
    train = nn.functional.normalize(train_feats.to(device).float(), dim=1)
    train_y = train_labels.to(device).long()
    test_y = test_labels.to(device).long()
    c = int(num_classes) if num_classes is not None else int(max(train_y.max(), test_y.max())) + 1
    if int(train_y.min()) < 0 or int(train_y.max()) >= c:
        raise ValueError(f"train labels must be in [0, {c}), got [{int(train_y.min())}, {int(train_y.max())}]")
    k = min(k, train.shape[0])
    top = min(5, c)
    correct1 = correct5 = 0
    for start in range(0, test_feats.shape[0], batch_size):
        q = nn.functional.normalize(test_feats[start:start + batch_size].to(device).float(), dim=1)  # [b, D]
        y = test_y[start:start + batch_size]
        sim, idx = (q @ train.T).topk(k, dim=1)  # [b, k] cosine similarities of the k nearest
        votes = torch.zeros(q.shape[0], c, device=device)
        votes.scatter_add_(1, train_y[idx], (sim / T).exp())  # [b, C] weighted votes per class
        pred = votes.topk(top, dim=1).indices  # [b, top]
        correct1 += int((pred[:, 0] == y).sum())
        correct5 += int((pred == y[:, None]).any(dim=1).sum())
    m = test_feats.shape[0]
    return {"top1": 100.0 * correct1 / m, "top5": 100.0 * correct5 / m, "k": k, "T": T,
            "num_train": int(train.shape[0]), "num_test": int(m)}
