"""Two-stream (content/query) transformer block with shared weights (METHOD.md 2).

Both streams live in one tensor ``z = [content; query]`` of length L = L_c + L_q.
Everything in a pre-norm block except attention is per-token, so LayerNorms, MLP,
LayerScale and drop-path run once over ``z`` (models/pretrain.py ``_block``); one
per-sample drop-path draw per branch then applies to both streams. Attention
takes queries from all L rows and keys/values from the first L_c (content) rows, in
one ``scaled_dot_product_attention`` call with a boolean mask broadcast over heads,
or (``model.attention=flex``) one FlexAttention call with a ``BlockMask`` built once
per step from the plan's per-row thresholds and per-key ranks (``build_block_mask``).
"""

from __future__ import annotations

import functools
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

from mapet_ds.models.objectives import Plan, attention_ranks

# a dense additive (or bool) mask [B, 1, L, K] (sdpa) or a FlexAttention BlockMask
TwoStreamMask = Union[torch.Tensor, BlockMask]


def flex_trains_on(device: torch.device) -> bool:
    """torch (2.14) has FlexAttention backward only on accelerators, not on the CPU."""
    return device.type not in ("cpu", "mps")


def plan_mask_mod(plan: Plan):
    """FlexAttention ``mask_mod`` of the two-stream mask: one threshold per row, one rank per key.

    Returns (mask_mod, rows, keys); mask_mod(b, h, q_idx, kv_idx) is True where row q_idx
    may attend to key kv_idx (METHOD.md 2, see ``attention_ranks``), no [B,L,K] tensor.
    """
    t, key_rank, num_x = attention_ranks(plan)

    def mask_mod(b, h, q_idx, kv_idx):
        return (key_rank[b, kv_idx] <= t[b, q_idx]) ^ (kv_idx >= num_x)

    return mask_mod, t.shape[1], key_rank.shape[1]


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def build_block_mask(plan: Plan, *, dense: bool = False) -> TwoStreamMask:
    """The step's mask for every layer: a BlockMask (compiled mask creation on CUDA), or with
    ``dense`` the same mask_mod materialised as bool [B, 1, L, K] for sdpa (CPU training)."""
    mask_mod, rows, keys = plan_mask_mod(plan)
    b, device = plan.predicted.shape[0], plan.predicted.device
    if dense:
        return create_mask(mask_mod, b, 1, rows, keys, device=device)
    make = _compiled(create_block_mask) if device.type == "cuda" else create_block_mask
    return make(mask_mod, b, None, rows, keys, device=device)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, 1, L, K] (True = may attend) -> additive [B, 1, L, K] in ``dtype``: 0 or -inf.

    What sdpa does to a bool mask inside every call (forward and backward): turn it into
    an additive mask in the query dtype and, for the memory-efficient kernel, copy it into
    a buffer whose key stride is a multiple of 8 (ViT-B mapet: 344 -> 352 keys). Built
    once per step here and shared by all layers: the result is a view of a [B, 1, L, K8]
    buffer (K8 = K rounded up to a multiple of 8) that sdpa takes as it is.
    """
    b, h, l, k = allowed.shape
    k8 = -(-k // 8) * 8
    buf = torch.zeros(b, h, l, k8, dtype=dtype, device=allowed.device)
    bias = buf[..., :k]
    return bias.masked_fill_(~allowed, float("-inf"))


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    # eager FlexAttention materialises the scores; on CUDA the fused kernel needs compile
    # (inside an already compiled block dynamo traces flex_attention itself)
    fn = flex_attention
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        fn = _compiled(flex_attention)
    if q.device.type == "cpu" and torch.compiler.is_compiling():
        # inductor's CPU FlexAttention template (torch 2.14) reads the sizes of q's buffer
        # and fails on the transposed views: give it dense tensors
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return fn(q, k, v, block_mask=block_mask)


def two_stream_attention(attn: nn.Module, x: torch.Tensor, num_keys: int, mask: TwoStreamMask) -> torch.Tensor:
    """Self-attention of a timm ``Attention`` with keys/values from the content rows.

    x: [B, L, D] normalised tokens, content stream first (``num_keys`` rows).
    mask: additive [B, 1, L, num_keys] in the compute dtype (``additive_mask``) or bool,
        True = may attend (sdpa), or a BlockMask of that shape.
    Returns [B, L, D] (after the output projection).
    """
    b, l, d = x.shape
    h = attn.num_heads
    hd = d // h
    w, bias = attn.qkv.weight, attn.qkv.bias
    # q for every row, k/v only for the content rows: no wasted k/v FLOPs for the
    # query stream and no concatenation of q pieces
    q = F.linear(x, w[:d], None if bias is None else bias[:d])
    kv = F.linear(x[:, :num_keys], w[d:], None if bias is None else bias[d:])
    q = q.view(b, l, h, hd).transpose(1, 2)  # [B, H, L, hd]
    kv = kv.view(b, num_keys, 2, h, hd).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]  # [B, H, num_keys, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if isinstance(mask, BlockMask):
        if attn.training and attn.attn_drop.p > 0:
            raise ValueError("model.attention=flex has no attention dropout; use model.attention=sdpa")
        out = _flex(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    out = out.transpose(1, 2).reshape(b, l, d)
    out = getattr(attn, "norm", nn.Identity())(out)
    return attn.proj_drop(attn.proj(out))
