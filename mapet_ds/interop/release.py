"""Import of foreign ViT checkpoint layouts: the MaPeT authors' release and BEiT-style keys.

Key-layout conversion only (state dict in, timm ``VisionTransformer`` names out); it
imports nothing of ours, so the classifier loader and the exporter both build on it.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

__all__ = ["CheckpointError", "strip_prefixes", "is_foreign_layout", "convert_mapet_release", "first_keys", "SUPPORTED_LAYOUTS"]


class CheckpointError(ValueError):
    """A checkpoint does not fit; the message is one line naming the file/keys and the fix."""


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str] = ("module.", "_orig_mod.")) -> dict:
    """Remove wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``) from keys."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def first_keys(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def state_mismatch(sd: dict, target: dict) -> tuple[list[str], list[str], list[str]]:
    """(unexpected keys, missing keys, "key shape vs shape" of mis-shaped ones) of a state dict
    ``sd`` against a model's ``target`` state dict, for the one-line CheckpointError."""
    unexpected = [k for k in sd if k not in target]
    missing = [k for k in target if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(target[k].shape)}" for k in sd
             if k in target and sd[k].shape != target[k].shape]
    return unexpected, missing, wrong


# ---------------------------------------------------------------------------------------
# The MaPeT authors' fine-tuned release (vit_standard_{tiny,small,base}_patch16_224_*.tar)
#
# Their ViT (models/vision_transformer/vision_transformer.py of aimagelab/MaPeT) is timm's
# with the fused ``attn.qkv`` split into ``attn.q`` (D -> D) and ``attn.kv`` (D -> 2D, k
# rows first, then v), LayerScale ``ls1/ls2.gamma`` (init 0.1), mean pooling + ``fc_norm``
# and ``head``. The .tar is a timm training checkpoint ({"state_dict": ..., "epoch": ...}).
# timm's fused qkv rows are [q; k; v], so qkv = cat(q, kv) row-wise reproduces it exactly.
# BEiT-style variants are accepted too: ``q_bias``/``v_bias`` (no k bias) and
# ``gamma_1``/``gamma_2`` layer scales.

_REL_POS = ("relative_position_bias_table", "relative_position_index", "rel_pos_bias")
_FOREIGN_SUFFIXES = (".attn.q.weight", ".attn.kv.weight", ".attn.k.weight", ".attn.q_bias", ".attn.v_bias",
                     ".gamma_1", ".gamma_2")
_BLOCK_PLAIN = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.weight", "attn.proj.bias",
                "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls1.gamma", "ls2.gamma",
                "attn.qkv.weight", "attn.qkv.bias")
_TOP_PLAIN = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
              "norm.bias", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")
SUPPORTED_LAYOUTS = ("mapet_ds/timm ViT (attn.qkv); MaPeT release (attn.q + attn.kv, ls1/ls2, fc_norm, head); "
                     "BEiT-style q_bias/v_bias and gamma_1/gamma_2")


def is_foreign_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for key layouts :func:`convert_mapet_release` handles (split q/kv, BEiT names, rel-pos)."""
    return any(k.endswith(_FOREIGN_SUFFIXES) or any(r in k for r in _REL_POS) for k in state_dict)


def _qkv(b: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pop this block's attention input projection(s) -> fused (weight [3D, D], bias [3D])."""
    if "attn.qkv.weight" in b:
        w = b.pop("attn.qkv.weight")
    elif "attn.q.weight" in b and "attn.kv.weight" in b:
        w = torch.cat([b.pop("attn.q.weight"), b.pop("attn.kv.weight")], 0)
    elif all(f"attn.{n}.weight" in b for n in "qkv"):
        w = torch.cat([b.pop(f"attn.{n}.weight") for n in "qkv"], 0)
    else:
        raise CheckpointError(f"blocks.{i}: no attention projection (attn.qkv, attn.q + attn.kv or attn.q/k/v weights)")
    d = w.shape[0] // 3
    zeros = w.new_zeros(d)
    if "attn.qkv.bias" in b:
        bias = b.pop("attn.qkv.bias")
    elif "attn.q_bias" in b:  # BEiT: learned q and v biases, k has none
        bias = torch.cat([b.pop("attn.q_bias"), zeros, b.pop("attn.v_bias", zeros)])
    elif all(f"attn.{n}.bias" in b for n in "qkv"):
        bias = torch.cat([b.pop(f"attn.{n}.bias") for n in "qkv"])
    else:  # release: q.bias + kv.bias; a missing part had no bias, i.e. zero
        q = b.pop("attn.q.bias", zeros)
        kv = b.pop("attn.kv.bias", torch.cat([zeros, zeros]))
        bias = torch.cat([q, kv])
    if bias.shape[0] != w.shape[0]:
        raise CheckpointError(f"blocks.{i}: qkv bias has {bias.shape[0]} entries for {w.shape[0]} output rows")
    return w, bias


def convert_mapet_release(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MaPeT release / BEiT-style key layout -> timm VisionTransformer names.

    Per block: ``attn.q`` [D, D] + ``attn.kv`` [2D, D] (and biases [D] + [2D]) -> ``attn.qkv``
    [3D, D] / [3D]; ``q_bias``/``v_bias`` -> qkv bias with zero k part; ``gamma_1/2`` ->
    ``ls1/ls2.gamma``. Relative position bias keys raise (we use absolute ``pos_embed``);
    any other unknown key raises a one-line :class:`CheckpointError` naming a few of them.
    """
    sd = strip_prefixes(state_dict)
    rel = sorted(k for k in sd if any(r in k for r in _REL_POS))
    if rel:
        raise CheckpointError(
            f"checkpoint uses relative position bias ({first_keys(rel, 2)}): mapet_ds ViTs have absolute position "
            f"embeddings only (pos_embed); supported layouts: {SUPPORTED_LAYOUTS}"
        )
    out, blocks, unknown = {}, {}, []
    for k, v in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = v
        elif k in _TOP_PLAIN:
            out[k] = v
        else:
            unknown.append(k)
    for i in sorted(blocks):
        b = dict(blocks[i])
        for old, new in (("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma")):
            if old in b:
                b[new] = b.pop(old)
        out[f"blocks.{i}.attn.qkv.weight"], out[f"blocks.{i}.attn.qkv.bias"] = _qkv(b, i)
        for name, v in b.items():
            if name in _BLOCK_PLAIN:
                out[f"blocks.{i}.{name}"] = v
            else:
                unknown.append(f"blocks.{i}.{name}")
    if unknown:
        raise CheckpointError(
            f"unknown checkpoint layout, unexpected keys {first_keys(unknown, 4)}; supported layouts: {SUPPORTED_LAYOUTS}"
        )
    if not blocks or "pos_embed" not in out:
        raise CheckpointError(
            f"not a ViT checkpoint (no blocks.* or pos_embed); supported layouts: {SUPPORTED_LAYOUTS}"
        )
    return out
