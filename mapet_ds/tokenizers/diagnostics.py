"""Codebook usage: how many codes a tokenizer really uses.

Codebook collapse (a few codes covering most patches, many never used) is the known
failure of k-means and VQ tokenizers; it makes the pre-training targets easy and
uninformative. ``code_usage`` summarises a batch or a whole token store; the training
loop can log its scalars.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def code_usage(tokens, vocab: int, top: int = 5) -> dict[str, Any]:
    """tokens: int [...] (tensor or array, any shape; negatives = unwritten, ignored) ->
    {"vocab", "num_tokens", "codes_used", "used_fraction", "perplexity",
     "perplexity_fraction", "max_share", "most_used": [[code, count], ...],
     "least_used": [[code, count], ...] (among used codes)}.

    perplexity = exp(entropy of the code histogram): the number of equally used codes
    that would give the same entropy; ``vocab`` when usage is uniform.
    """
    counts = _histogram(tokens, vocab)
    total = float(counts.sum())
    used = int((counts > 0).sum())
    if total > 0:
        p = counts[counts > 0] / total
        perplexity = float(torch.exp(-(p * p.log()).sum()))
    else:
        perplexity = 0.0
    order = torch.argsort(counts, descending=True, stable=True)
    most = [[int(c), int(counts[c])] for c in order[:top]]
    used_order = [int(c) for c in order[:used]]
    least = [[c, int(counts[c])] for c in reversed(used_order[-top:])]
    return {
        "vocab": int(vocab),
        "num_tokens": int(total),
        "codes_used": used,
        "used_fraction": used / vocab,
        "perplexity": perplexity,
        "perplexity_fraction": perplexity / vocab,
        "max_share": (float(counts.max()) / total) if total else 0.0,
        "most_used": most,
        "least_used": least,
    }


def _histogram(tokens, vocab: int) -> torch.Tensor:
    """float64 [vocab] counts; numpy (e.g. a whole memory-mapped store) in slices, so
    ImageNet's 250M int16 tokens are never widened to int64 all at once."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    if isinstance(tokens, torch.Tensor):
        parts = [tokens.reshape(-1)]
    else:
        flat = np.asarray(tokens).reshape(-1)
        parts = (torch.from_numpy(np.array(flat[i : i + (1 << 24)], dtype=np.int64)) for i in range(0, flat.size, 1 << 24))
    for t in parts:
        t = t.long()
        t = t[t >= 0]  # -1 = unwritten row of an incomplete store
        if t.numel() and int(t.max()) >= vocab:
            raise ValueError(f"token id {int(t.max())} >= vocab {vocab}: the tokens and the vocab size do not belong together")
        counts += torch.bincount(t, minlength=vocab).cpu().double()
    return counts


def format_usage(usage: dict[str, Any]) -> str:
    """A short human-readable table of ``code_usage``'s result."""
    total = max(usage["num_tokens"], 1)
    lines = [
        f"codebook usage over {usage['num_tokens']:,} tokens",
        f"  codes used      {usage['codes_used']:>8} / {usage['vocab']} ({100 * usage['used_fraction']:.1f}%)",
        f"  perplexity      {usage['perplexity']:>8.1f}   ({100 * usage['perplexity_fraction']:.1f}% of vocab)",
        f"  top code share  {100 * usage['max_share']:>7.2f}%",
        "  most used   " + ", ".join(f"{c}:{100 * n / total:.2f}%" for c, n in usage["most_used"]),
        "  least used  " + ", ".join(f"{c}:{n}" for c, n in usage["least_used"]),
    ]
    if usage["vocab"] and math.isfinite(usage["perplexity"]) and usage["perplexity_fraction"] < 0.1:
        lines.append("  warning: perplexity below 10% of the vocabulary, the codebook is close to collapse")
    return "\n".join(lines)


def usage_scalars(usage: dict[str, Any], prefix: str = "tokens/") -> dict[str, float]:
    """The scalar part of ``code_usage`` for a TensorBoard writer."""
    keys = ("codes_used", "used_fraction", "perplexity", "perplexity_fraction", "max_share")
    return {prefix + k: float(usage[k]) for k in keys}
