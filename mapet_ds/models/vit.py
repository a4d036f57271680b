"""ViT backbone: timm's own VisionTransformer, so parameter names are timm's.

A backbone state dict loads with ``strict=True`` into
``timm.create_model(timm_name(cfg), pretrained=False, **timm_kwargs(cfg))``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from mapet_ds.config import ModelConfig

_TIMM_NAMES = {"tiny": "vit_tiny", "small": "vit_small", "base": "vit_base", "large": "vit_large"}


def timm_kwargs(cfg: ModelConfig, **overrides) -> dict:
    """Constructor arguments of timm's VisionTransformer for this config (METHOD.md 5)."""
    kw = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        init_values=cfg.layer_scale_init,
        class_token=True,
        no_embed_class=False,
        drop_path_rate=cfg.drop_path,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
        global_pool="token",
    )
    kw.update(overrides)
    return kw


def timm_name(cfg: ModelConfig) -> str:
    """Closest timm model name (sizes match exactly only for the named sizes)."""
    base = _TIMM_NAMES.get(cfg.size or "", "vit_base")
    return f"{base}_patch{cfg.patch_size}_{cfg.img_size}"


def build_backbone(cfg: ModelConfig, **overrides) -> VisionTransformer:
    """A timm VisionTransformer without head; truncated-normal(0.02) init (timm's 'jax'-free default)."""
    model = VisionTransformer(**timm_kwargs(cfg, **overrides))
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def resample_pos_embed(pos_embed: torch.Tensor, vit: VisionTransformer) -> torch.Tensor:
    """pos_embed [1, prefix + N_old, D] of a checkpoint -> [1, prefix + N, D] on ``vit``'s patch
    grid (timm's ``resample_abs_pos_embed``, bicubic, computed in fp32), in ``vit``'s dtype."""
    return resample_abs_pos_embed(pos_embed.float(), new_size=list(vit.patch_embed.grid_size),
                                  num_prefix_tokens=vit.num_prefix_tokens).to(vit.pos_embed.dtype)
