"""Two-stream (content/query) transformer block with shared weights (METHOD.md 2).

Both streams live in one tensor ``z = [content; query]`` of length L = L_c + L_q.
Everything in a pre-norm block except attention is per-token, so LayerNorms, MLP,
LayerScale and drop-path run once over ``z``; timm's per-sample DropPath over ``z``
is then exactly "one draw per sample per branch, applied to both streams". Attention
takes queries from all L rows and keys/values from the first L_c (content) rows, in
one ``scaled_dot_product_attention`` call with a boolean mask broadcast over heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def two_stream_attention(attn: nn.Module, x: torch.Tensor, num_keys: int, mask: torch.Tensor) -> torch.Tensor:
    """Self-attention of a timm ``Attention`` with keys/values from the content rows.

    x: [B, L, D] normalised tokens, content stream first (``num_keys`` rows).
    mask: bool [B, 1, L, num_keys], True = may attend.
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
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0
    )
    out = out.transpose(1, 2).reshape(b, l, d)
    out = getattr(attn, "norm", nn.Identity())(out)
    return attn.proj_drop(attn.proj(out))


def two_stream_block(blk: nn.Module, z: torch.Tensor, num_keys: int, mask: torch.Tensor) -> torch.Tensor:
    """One timm ``Block`` applied to both streams.

    z: [B, L, D] = [content (num_keys rows); query rows]; mask: bool [B, 1, L, num_keys].
    Returns [B, L, D].
    """
    z = z + blk.drop_path1(blk.ls1(two_stream_attention(blk.attn, blk.norm1(z), num_keys, mask)))
    z = z + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(z))))
    return z
