"""UperNet on the timm ViT for semantic segmentation (BEiT's ADE20K set-up).

Who does what:

* backbone: timm's ``VisionTransformer`` (``models/vit.py``) built at the crop size; a
  pre-trained ``pos_embed`` is resampled to the crop grid with timm's
  ``resample_abs_pos_embed``; block outputs come from timm's ``forward_intermediates``.
* ``ViTPyramid`` (ours, the only part no library has for a plain ViT): BEiT's
  ``fpn1..fpn4`` turning four 1/16 maps into 1/4, 1/8, 1/16, 1/32 (transposed convs up,
  identity, max-pool down).
* decoder: segmentation_models_pytorch's ``UPerNetDecoder`` (PPM on the 1/32 level + FPN,
  fused at 1/4). It adds a LayerNorm per input level, which mmseg's UPerHead has not.
* heads: a dropout + 1x1 conv classifier on the decoder, and the auxiliary FCN head on the
  third level (mmseg ``FCNHead(num_convs=1, concat_input=False)``: 3x3 conv-BN-ReLU,
  dropout, 1x1 conv); smp has no FCN head and it is three layers.

Parameter names: ``backbone.*`` are timm's, so a backbone loads/export stays timm-compatible.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import nn

from mapet_ds.config import ConfigError, ModelConfig
from mapet_ds.interop.release import (CheckpointError, convert_mapet_release, first_keys, is_foreign_layout,
                                      state_mismatch, strip_prefixes)
from mapet_ds.models.vit import build_backbone, resample_pos_embed

# Keys of a pre-training / classifier checkpoint the segmenter has no use for.
_UNUSED_PREFIXES = ("mask_token", "lm_head.", "head.", "fc_norm.", "norm.")


class ViTPyramid(nn.Module):
    """Four [B,D,H/16,W/16] maps -> [B,D,H/4,W/4], [B,D,H/8,W/8], [B,D,H/16,W/16], [B,D,H/32,W/32].

    BEiT's semantic_segmentation backbone (fpn1: two stride-2 transposed convs with BN +
    GELU between; fpn2: one; fpn3: identity; fpn4: 2x2 max-pool). The rescales are of the
    token grid: with another patch size p the levels are 1/(p/4) .. 1/(2p).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


class FCNHead(nn.Module):
    """Auxiliary head: [B,D,h,w] -> logits [B,K,h,w]."""

    def __init__(self, in_ch: int, ch: int, num_classes: int, dropout: float):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch),
                                  nn.ReLU(inplace=True))
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(ch, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.drop(self.conv(x)))


class ViTUperNet(nn.Module):
    """images [B,3,S,S] -> (logits [B,K,S/4,S/4], aux logits [B,K,S/16,S/16] or None in eval).

    ``S`` is the crop size the backbone was built for (sliding-window eval feeds windows of
    exactly that size, so the position embedding never needs resampling at run time).
    """

    def __init__(self, model_cfg: ModelConfig, num_classes: int, *, crop_size: int,
                 out_indices: Sequence[int] = (3, 5, 7, 11), decoder_channels: int = 768,
                 aux_channels: int = 256, dropout: float = 0.1):
        super().__init__()
        p = model_cfg.patch_size
        if crop_size % (2 * p):
            raise ConfigError(f"segment.crop_size={crop_size}: must be a multiple of 2 x model.patch_size={2 * p} "
                              f"(the pyramid's max-pooled level halves the token grid)")
        if max(out_indices) >= model_cfg.depth:
            raise ConfigError(f"segment.out_indices={list(out_indices)}: the backbone has only {model_cfg.depth} "
                              f"blocks (indices 0..{model_cfg.depth - 1})")
        self.out_indices = list(out_indices)
        self.crop_size = crop_size
        self.num_classes = num_classes
        # blocks after the last tapped one would be dead weight (and unused DeepSpeed grads)
        self.backbone = build_backbone(model_cfg, img_size=crop_size, depth=max(out_indices) + 1)
        self.backbone.norm = nn.Identity()  # features are taken before the final norm (BEiT)
        dim = model_cfg.embed_dim
        self.pyramid = ViTPyramid(dim)
        # smp's decoder takes [1, 1/2, 1/4, 1/8, 1/16, 1/32] and drops the first two
        self.decoder = UPerNetDecoder(encoder_channels=(3, 0, dim, dim, dim, dim), encoder_depth=5,
                                      decoder_channels=decoder_channels)
        self.cls_drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(decoder_channels, num_classes, 1)
        self.aux = FCNHead(dim, aux_channels, num_classes, dropout)

    # -- timm layer decay / weight decay hooks (the backbone keeps timm's groups) ----------
    def group_matcher(self, coarse: bool = False) -> dict:
        """stem -> layer 0, ``backbone.blocks.i`` -> i + 1, the rest (adapter, decoder, heads)
        -> the last layer (lr scale 1), as BEiT's layer-decay constructor does."""
        return dict(stem=r"^backbone\.(?:cls_token|pos_embed|patch_embed)",
                    blocks=[(r"^backbone\.blocks\.(\d+)", None), (r"^backbone\.norm", (99999,))])

    def no_weight_decay(self) -> set[str]:
        return {"backbone.pos_embed", "backbone.cls_token"}

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B,3,S,S] -> the 4 pyramid levels (see ViTPyramid)."""
        taps = sorted(set(self.out_indices))  # timm returns each block once (tiny test models repeat one)
        feats = self.backbone.forward_intermediates(images, indices=taps, norm=False,
                                                    output_fmt="NCHW", intermediates_only=True)
        by_block = dict(zip(taps, feats))
        return self.pyramid([by_block[i] for i in self.out_indices])

    def forward(self, images: torch.Tensor):
        levels = self.features(images)
        dec = self.decoder([images, images, *levels])  # the first two entries are skipped by smp
        logits = self.cls(self.cls_drop(dec))
        aux = self.aux(levels[2]) if self.training else None
        return logits, aux


def build_segmenter(model_cfg: ModelConfig, seg) -> ViTUperNet:
    """From ``cfg.model`` and ``cfg.segment`` (SegmentConfig)."""
    return ViTUperNet(model_cfg, seg.num_classes, crop_size=seg.crop_size, out_indices=seg.out_indices,
                      decoder_channels=seg.decoder_channels, aux_channels=seg.aux_channels, dropout=seg.dropout)


def load_backbone_into_segmenter(model: ViTUperNet, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Pre-trained / fine-tuned / exported / release ViT weights -> ``model.backbone``.

    pos_embed [1, 1+N_old, D] is resampled (timm, bicubic) to the crop grid; heads, the final
    norm, mask token and blocks past the last tapped one are dropped. Anything else missing,
    unexpected or mis-shaped is a one-line CheckpointError. -> {"dropped", "resampled"}.
    """
    sd = strip_prefixes(state_dict)
    if is_foreign_layout(sd):
        sd = convert_mapet_release(sd)
    sd = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in sd.items()}
    target = model.backbone.state_dict()
    depth = len(model.backbone.blocks)
    dropped = sorted(k for k in sd if k.startswith(_UNUSED_PREFIXES)
                     or (k.startswith("blocks.") and int(k.split(".")[1]) >= depth))
    sd = {k: v for k, v in sd.items() if k not in set(dropped)}
    resampled = []
    if "pos_embed" in sd and sd["pos_embed"].shape != target["pos_embed"].shape:
        old, new = sd["pos_embed"], target["pos_embed"]
        if old.shape[-1] != new.shape[-1]:
            raise CheckpointError(f"pos_embed has width {old.shape[-1]} but the segmenter's backbone has "
                                  f"{new.shape[-1]}: the checkpoint is another model size (check model.size)")
        sd["pos_embed"] = resample_pos_embed(old, model.backbone)
        resampled.append(f"pos_embed {tuple(old.shape)} -> {tuple(sd['pos_embed'].shape)}")
    unexpected, missing, wrong = state_mismatch(sd, target)
    if unexpected or missing or wrong:
        what = (f"unexpected keys {first_keys(unexpected)}" if unexpected else
                f"missing backbone weights {first_keys(missing)}" if missing else f"shape mismatch {first_keys(wrong, 3)}")
        raise CheckpointError(f"checkpoint does not fit the segmenter's backbone: {what}; build it with the "
                              f"pre-training model config (model.size, patch_size, layer_scale_init)")
    model.backbone.load_state_dict(sd, strict=False)
    return {"dropped": dropped, "resampled": resampled}


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[B,K,h,w] -> [B,K,*size], bilinear, align_corners=False (mmseg's ``resize``)."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
