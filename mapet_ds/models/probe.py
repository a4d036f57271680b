"""Linear probe: a frozen timm ViT, pooled features, BatchNorm without affine, one Linear.

MAE's protocol (main_linprobe.py): ``head = Sequential(BatchNorm1d(D, affine=False,
eps=1e-6), Linear(D, C))`` with the Linear initialised ``trunc_normal_(std=0.01)``, bias 0;
only the head trains. Parameter names follow MAE's probe (``head.0`` the BatchNorm,
``head.1`` the Linear), the backbone keeps timm's names under ``backbone.``.

Pooling (``pool``):

- ``"cls"``  -- the [CLS] output token after the final norm (MAE's default, ``--cls_token``);
- ``"mean"`` -- the mean of the patch tokens;

both exactly the k-NN features of mapet_ds.analysis.knn (``pooled_features``); "mean" is
``mean(norm(tokens))`` for a pre-training backbone and timm's pre-logits
``fc_norm(mean(tokens))`` for a fine-tuned classifier.

The backbone runs under ``torch.no_grad`` and stays in eval mode whatever ``train()``
says (it is built with drop_path 0, as MAE's probe, so eval and train mode agree anyway).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mapet_ds.analysis.knn import POOLS, pooled_features
from mapet_ds.config import ModelConfig
from mapet_ds.interop.release import CheckpointError, first_keys, state_mismatch
from mapet_ds.models.vit import build_backbone, resample_pos_embed

# MAE main_linprobe.py: trunc_normal_(model.head.weight, std=0.01)
PROBE_HEAD_INIT_STD = 0.01
# keys of a checkpoint a probe backbone never uses (pre-training heads, classifier heads)
_UNUSED_PREFIXES = ("mask_token", "lm_head.", "head.")


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """features [B, D] -> logits [B, C]: BatchNorm1d(affine=False, eps=1e-6) then Linear (MAE)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    trunc_normal_(head[1].weight, std=PROBE_HEAD_INIT_STD)
    nn.init.zeros_(head[1].bias)
    return head


class LinearProbe(nn.Module):
    """``backbone`` (frozen) -> pooled features -> ``head``; ``backbone=None`` takes features.

    forward: images [B, 3, S, S] (or features [B, D] without backbone) -> logits [B, C].
    ``autocast_dtype``: the frozen backbone's forward runs in autocast with it (bf16 on GPUs);
    the head always runs in fp32.
    """

    def __init__(self, backbone: Optional[VisionTransformer], dim: int, num_classes: int, pool: str = "mean",
                 autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: must be 'cls' or 'mean'")
        self.pool = pool
        self.autocast_dtype = autocast_dtype
        self.backbone = backbone
        if backbone is not None:
            backbone.requires_grad_(False)
            backbone.eval()
        self.head = probe_head(dim, num_classes)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> pooled features [B, D] float32 (no augmentation, no grad)."""
        dev = images.device.type
        with torch.autocast(dev, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return pooled_features(self.backbone, images, self.pool).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x) if self.backbone is not None else x.float()
        return self.head(feats)


def build_probe_backbone(model_cfg: ModelConfig,
                         state: Optional[Mapping[str, torch.Tensor]]) -> tuple[VisionTransformer, dict]:
    """The frozen backbone: ``state`` (timm names, from ``load_any_checkpoint``) or, with
    ``state=None``, a randomly initialised ViT of ``model_cfg`` (the random-init baseline).

    A fine-tuned classifier (``fc_norm.*`` in the state) is rebuilt with timm's avg pooling
    and ``fc_norm`` so its own pre-logits are used; a pre-training backbone keeps its final
    ``norm``. ``pos_embed`` is resampled to the configured grid (timm's helper). Anything
    missing, unexpected or of the wrong shape is a one-line :class:`CheckpointError`.
    Returns (backbone, report {"kind", "dropped", "resampled"}).
    """
    if state is None:
        return build_backbone(model_cfg, drop_path_rate=0.0), {"kind": "random", "dropped": [], "resampled": []}
    sd = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in state.items()}
    dropped = sorted(k for k in sd if k.startswith(_UNUSED_PREFIXES))
    sd = {k: v for k, v in sd.items() if not k.startswith(_UNUSED_PREFIXES)}
    classifier = any(k.startswith("fc_norm.") for k in sd)
    kw = dict(global_pool="avg", fc_norm=True) if classifier else {}
    vit = build_backbone(model_cfg, drop_path_rate=0.0, **kw)
    target = vit.state_dict()
    resampled = []
    if "pos_embed" in sd and sd["pos_embed"].shape != target["pos_embed"].shape:
        old = sd["pos_embed"]
        if old.shape[-1] != target["pos_embed"].shape[-1]:
            raise CheckpointError(f"pos_embed has width {old.shape[-1]} but model.embed_dim is "
                                  f"{target['pos_embed'].shape[-1]}: set the model section of the checkpoint's run")
        sd["pos_embed"] = resample_pos_embed(old, vit)
        resampled.append(f"pos_embed {tuple(old.shape)} -> {tuple(sd['pos_embed'].shape)}")
    unexpected, missing, wrong = state_mismatch(sd, target)
    if unexpected or missing or wrong:
        what = "; ".join(x for x in (f"unexpected {first_keys(unexpected)}" if unexpected else "",
                                     f"missing {first_keys(missing)}" if missing else "",
                                     f"shape mismatch {first_keys(wrong, 3)}" if wrong else "") if x)
        raise CheckpointError(f"checkpoint does not fit the configured model ({what}): use the model section of "
                              f"the run it comes from (size, patch_size, layer_scale_init)")
    vit.load_state_dict(sd, strict=True)
    return vit, {"kind": "classifier" if classifier else "backbone", "dropped": dropped, "resampled": resampled}
