"""VQ-KD visual tokenizer (BEiT v2): encoder + normalised codebook, from a local file.

BEiT v2 trains a ViT encoder whose patch features, after a small "task layer"
(Linear-Tanh-Linear down to the code dimension), are L2-normalised and snapped to
the nearest entry of an L2-normalised codebook (8192 x 32 for the released
tokenizers). Only that encoder half is needed to produce targets: the decoder and
the distillation teacher stored in the release checkpoint are ignored.

Published key layout (the BEiT v2 checkpoint, optionally under ``"model"``)::

    encoder.patch_embed.proj.{weight,bias}     [D,3,p,p], [D]
    encoder.cls_token, encoder.pos_embed       [1,1,D], [1,1+g*g,D]
    encoder.blocks.{i}.norm1.{weight,bias}
    encoder.blocks.{i}.attn.qkv.weight         [3D,D]  (no bias: q_bias / v_bias below)
    encoder.blocks.{i}.attn.{q_bias,v_bias}    [D]
    encoder.blocks.{i}.attn.proj.{weight,bias}
    encoder.blocks.{i}.norm2.{weight,bias}
    encoder.blocks.{i}.mlp.fc{1,2}.{weight,bias}
    encoder.fc_norm.{weight,bias}              (mean-pooling ViT: no final `norm`)
    encode_task_layer.{0,2}.{weight,bias}      [D,D], [code_dim,D]
    quantize.embedding.weight                  [n_codes, code_dim]
    ignored: decoder.*, decode_task_layer.*, teacher_model.*, scaling_layer.*, loss*,
             and the codebook's EMA statistics (cluster_size, embed_avg, initted)

This module also holds the helpers shared with :mod:`mapet_ds.tokenizers.dvae`
(checkpoint reading, key checking, image preparation).

Usage::

    tok = VQKDEncoder.load("vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth",
                           device="cuda")
    ids = tok.tokenize(images_uint8)        # [B, 196] int64 in [0, 8192)
"""

from __future__ import annotations

import math
import os
import re
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.beit import Block as BeitBlock

from mapet_ds.tokenizers.weights import (
    TokenizerWeightsError,
    autocast_or_off,
    check_state_dict,
    file_sha256,
    prepare_images,
    read_state_dict,
)

__all__ = [
    "TokenizerWeightsError",
    "VQKDEncoder",
    "vqkd_published_state_dict",
    "prepare_images",
    "read_state_dict",
    "check_state_dict",
    "file_sha256",
]


# --------------------------------------------------------------------------- model
class _BeitEncoder(nn.Module):
    """BEiT-style ViT encoder: q/v biases, no LayerScale, ``fc_norm`` on the patch tokens."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        # timm's BEiT block has exactly the release's parameter names (qkv without bias,
        # q_bias/v_bias, norm1/norm2, mlp.fc1/fc2); init_values=None -> no gamma_1/2.
        self.blocks = nn.ModuleList([
            BeitBlock(dim=embed_dim, num_heads=num_heads, qkv_bias=True, mlp_ratio=mlp_ratio,
                      init_values=None, norm_layer=norm_layer, window_size=None)
            for _ in range(depth)
        ])
        self.fc_norm = norm_layer(embed_dim)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, S, S] in [-1, 1] -> patch features [B, (S/p)^2, D] (row-major)."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:])


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class _Codebook(nn.Module):
    """Holds ``weight`` [n_codes, code_dim] under the release's name ``quantize.embedding``."""

    def __init__(self, n_codes: int, code_dim: int):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(n_codes, code_dim), dim=-1))


class _NormQuantizer(nn.Module):
    """Nearest L2-normalised code for L2-normalised features (inference only, no EMA)."""

    def __init__(self, n_codes: int, code_dim: int):
        super().__init__()
        self.embedding = _Codebook(n_codes, code_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, N, code_dim] features -> ids [B, N] int64.

        For unit vectors ||z - e||^2 = 2 - 2 z.e, so the nearest code is the argmax of
        the dot product. The release's codebook is already unit-norm (its EMA update
        renormalises), so normalising it again here changes nothing for it and keeps
        the rule exact for any file.
        """
        z = F.normalize(z.float(), dim=-1)
        codes = F.normalize(self.embedding.weight.float(), dim=-1)
        return (z @ codes.t()).argmax(dim=-1)


_VQKD_LAYOUT = ("the BEiT v2 VQ-KD checkpoint: keys encoder.*, encode_task_layer.*, "
                "quantize.embedding.weight, optionally under 'model'")
_VQKD_IGNORED = re.compile(
    r"^(decoder\.|decode_task_layer\.|teacher_model\.|scaling_layer\.|loss"
    r"|quantize\.cluster_size$|quantize\.embedding\.(cluster_size|embed_avg|initted)$)")


class VQKDEncoder(nn.Module):
    """Frozen VQ-KD tokenizer encoder: images -> token ids on a ``grid`` x ``grid`` map.

    Defaults are the released base tokenizer (ViT-B/16 at 224, codebook 8192 x 32). The
    module stays in eval mode (``train()`` is a no-op) and has no trainable parameters.

    Args:
        img_size: encoder input size (``input_size``); images are resized to it.
        patch_size, embed_dim, depth, num_heads, mlp_ratio: ViT encoder sizes.
        n_codes, code_dim: codebook size (``vocab_size``) and code dimension.
        amp: run the ViT body under bf16 autocast (CUDA); the task layer and the code
            search always run in float32. Off by default so tokens do not depend on the
            caller's precision.
        chunk_size: images per forward; bounds the [chunk*N, n_codes] score matrix.
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 n_codes: int = 8192, code_dim: int = 32, amp: bool = False,
                 chunk_size: int = 64):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.encoder = _BeitEncoder(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Linear(embed_dim, code_dim))
        self.encode_task_layer.apply(_init_weights)
        self.quantize = _NormQuantizer(n_codes, code_dim)

        self.input_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.vocab_size = n_codes
        self.code_dim = code_dim
        self.amp = amp
        self.chunk_size = chunk_size
        self.config = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           n_codes=n_codes, code_dim=code_dim)
        # Set by `load`: where the weights came from and their digest.
        self.weights_path: str | None = None
        self.weights_sha256: str | None = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VQKDEncoder":
        # Frozen tokenizer: a parent's .train() must not change it.
        return super().train(False)

    def spec(self) -> dict[str, Any]:
        """What produces the tokens, for token-store metadata (JSON-able). Identifies
        the weights by digest, not path, so a moved file still matches."""
        return {"kind": "vqkd", **self.config, "grid": self.grid,
                "weights_sha256": self.weights_sha256}

    @property
    def device(self) -> torch.device:
        return self.quantize.embedding.weight.device

    # ------------------------------------------------------------------ forward
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, S, S] in [-1, 1] -> pre-quantiser features [B, N, code_dim] float32."""
        with autocast_or_off(pixels.device, self.amp and pixels.device.type == "cuda"):
            feats = self.encoder(pixels)
        # The release runs the task layer in float32 too (autocast off).
        with autocast_or_off(pixels.device, False):
            return self.encode_task_layer(feats.float())

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W] uint8 or float in [0, 1] -> ids [B, grid*grid] int64.

        Ids are row-major over the patch grid (the order of a flattened conv patch
        embedding) and lie in [0, vocab_size). Runs on the module's device.
        """
        x = prepare_images(images, self.input_size, self.device)
        x = x * 2.0 - 1.0  # the release's tokenizer input: [0, 1] -> [-1, 1]
        ids = []
        for chunk in x.split(self.chunk_size):
            z = self.encode(chunk)
            with autocast_or_off(chunk.device, False):
                ids.append(self.quantize(z))
        return torch.cat(ids).long()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`tokenize`."""
        return self.tokenize(images)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
             num_heads: int | None = None, amp: bool = False,
             chunk_size: int = 64) -> "VQKDEncoder":
        """Build the tokenizer from a local BEiT v2 VQ-KD checkpoint.

        Sizes (width, depth, patch, input size, MLP ratio, codebook) are read from the
        tensors; ``num_heads`` cannot be, and defaults to ``embed_dim // 64`` (12 for
        ViT-B). Decoder/teacher keys are ignored. Raises :class:`TokenizerWeightsError`
        naming the file and the first few missing/unexpected keys on a layout mismatch.
        """
        path = os.fspath(path)
        state = read_state_dict(path, what="VQ-KD", layout=_VQKD_LAYOUT)
        initted = state.get("quantize.embedding.initted")
        if initted is not None and initted.numel() and not bool(initted.flatten()[0]):
            raise TokenizerWeightsError(
                f"VQ-KD weights {path!r}: the codebook was never initialised "
                "(quantize.embedding.initted = 0); use a trained tokenizer checkpoint")
        state = {k: v for k, v in state.items() if not _VQKD_IGNORED.match(k)}
        config = _infer_vqkd_config(state)
        config["num_heads"] = num_heads or max(1, config["embed_dim"] // 64)
        model = cls(**config, amp=amp, chunk_size=chunk_size)
        check_state_dict(state, model, path=path, what="VQ-KD", layout=_VQKD_LAYOUT)
        model.load_state_dict(state, strict=True)
        model.weights_path, model.weights_sha256 = os.path.abspath(path), file_sha256(path)
        return model.to(device)


def _infer_vqkd_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture sizes from tensor shapes; defaults where a key is absent (the key
    check that follows then reports it)."""
    cfg: dict[str, Any] = {}
    w = state.get("encoder.patch_embed.proj.weight")
    if w is not None and w.ndim == 4:
        cfg["embed_dim"], cfg["patch_size"] = int(w.shape[0]), int(w.shape[-1])
    depth = {int(m.group(1)) for k in state
             if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))}
    if depth:
        cfg["depth"] = max(depth) + 1
    pos = state.get("encoder.pos_embed")
    if pos is not None and pos.ndim == 3:
        grid = math.isqrt(int(pos.shape[1]) - 1)
        cfg["img_size"] = grid * cfg.get("patch_size", 16)
    fc1 = state.get("encoder.blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.ndim == 2:
        cfg["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    codes = state.get("quantize.embedding.weight")
    if codes is not None and codes.ndim == 2:
        cfg["n_codes"], cfg["code_dim"] = int(codes.shape[0]), int(codes.shape[1])
    defaults = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, mlp_ratio=4.0,
                    n_codes=8192, code_dim=32)
    return {**defaults, **cfg}


def vqkd_published_state_dict(model: VQKDEncoder) -> dict[str, torch.Tensor]:
    """``model``'s weights in the release layout, EMA statistics included.

    Our state dict is already the encoder half of the release's key layout; this adds
    the codebook bookkeeping buffers a release file carries, so tools that expect the
    full quantiser state can read what we write.
    """
    state = dict(model.state_dict())
    codes = state["quantize.embedding.weight"]
    state["quantize.embedding.cluster_size"] = torch.zeros(codes.shape[0])
    state["quantize.embedding.embed_avg"] = codes.clone()
    state["quantize.embedding.initted"] = torch.ones(1)
    state["quantize.cluster_size"] = torch.zeros(codes.shape[0])
    return state
