"""Analytic FLOP counts of the pre-training and classifier forward passes.

Counted as 2 x multiply-adds of the matrix products (linear layers, attention scores
and attention-weighted values, patch embedding, head); norms, softmax and GELU are
ignored, as in the usual 6N-per-token estimates. A training step costs 3x the forward
(backward = 2x forward); activation checkpointing recomputes one more forward, which
MFU deliberately does not count (it is overhead, not useful work).
"""

from __future__ import annotations

from dataclasses import dataclass

from mapet_ds.config import ModelConfig


@dataclass(frozen=True)
class FlopCount:
    linear: float  # qkv, proj, mlp, patch embedding, head
    attention: float  # QK^T and AV

    @property
    def total(self) -> float:
        return self.linear + self.attention


def _blocks(cfg: ModelConfig, rows: int, keys: int) -> FlopCount:
    """One pass of all blocks: ``rows`` query rows, of which ``keys`` content rows."""
    d = cfg.embed_dim
    per_block_linear = keys * 3 * d * d + (rows - keys) * d * d + rows * d * d + rows * 2 * cfg.mlp_ratio * d * d
    per_block_attn = 2 * rows * keys * d
    return FlopCount(2 * cfg.depth * per_block_linear, 2 * cfg.depth * per_block_attn)


def pretrain_forward_flops(cfg: ModelConfig, objective: str, num_predicted: int, vocab_size: int) -> FlopCount:
    """Forward FLOPs per image of PretrainModel for one objective."""
    n = cfg.num_patches
    m = num_predicted
    if objective == "mim":
        rows = keys = 1 + n
    elif objective == "mapet":
        keys, rows = 1 + n + m, 1 + n + 2 * m
    elif objective == "pet":
        keys, rows = 1 + n, 1 + n + m
    else:
        raise ValueError(f"unknown objective {objective!r}")
    blocks = _blocks(cfg, rows, keys)
    embed = 2 * n * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim
    head = 2 * m * cfg.embed_dim * vocab_size
    return FlopCount(blocks.linear + embed + head, blocks.attention)


def classifier_forward_flops(cfg: ModelConfig, num_classes: int) -> FlopCount:
    """Forward FLOPs per image of the fine-tuning classifier."""
    n = cfg.num_patches
    blocks = _blocks(cfg, 1 + n, 1 + n)
    embed = 2 * n * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim
    return FlopCount(blocks.linear + embed + 2 * cfg.embed_dim * num_classes, blocks.attention)
