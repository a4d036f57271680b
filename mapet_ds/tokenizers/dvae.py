"""DALL-E dVAE encoder (the BEiT v1 tokenizer), from a local weight file.

The encoder is a ResNet-style conv net: a 7x7 input conv, four groups of residual
blocks (widths 1, 2, 4, 8 x ``n_hid``) with 2x max-pooling after the first three, and a
1x1 output conv to ``vocab_size`` logits per cell. BEiT v1 feeds it 112 x 112 images
mapped with the logit-Laplace rule ``x -> (1 - 2 eps) x + eps`` (eps = 0.1), giving a
14 x 14 grid that lines up with a patch-16 ViT at 224; a cell's token is the argmax of
its logits.

Published key layout (OpenAI ``encoder.pkl``, whose convs name their tensors w/b)::

    blocks.input.{w,b}                                    [n_hid, 3, 7, 7]
    blocks.group_{g}.block_{j}.id_path.{w,b}              (only when widths change)
    blocks.group_{g}.block_{j}.res_path.conv_{1..4}.{w,b}
    blocks.output.conv.{w,b}                              [vocab, 8 n_hid, 1, 1]

Weight files: OpenAI distributes ``encoder.pkl`` as a *pickled module* of the
``dall_e`` package. :meth:`DVAEEncoder.load` reads it directly, without that package
(a restricted unpickler maps the ``dall_e`` classes to an inert stand-in and admits
only torch tensor/module classes), and also reads a plain state dict in the same
layout. To convert once with the official package instead::

    python -c "import torch, dall_e; torch.save(dall_e.load_model('encoder.pkl').state_dict(), 'dvae_encoder.pth')"

Usage::

    tok = DVAEEncoder.load("encoder.pkl", device="cuda")
    ids = tok.tokenize(images_uint8)        # [B, 196] int64 in [0, 8192)
"""

from __future__ import annotations

import os
import pickle
import re
import types
from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from mapet_ds.tokenizers.weights import (
    TokenizerWeightsError,
    autocast_or_off,
    check_state_dict,
    file_sha256,
    first_items,
    prepare_images,
    unwrap_state_dict,
)

__all__ = ["DVAEEncoder", "map_pixels", "LOGIT_LAPLACE_EPS"]

LOGIT_LAPLACE_EPS = 0.1

_DVAE_LAYOUT = ("the DALL-E dVAE encoder: OpenAI encoder.pkl, or its state dict with keys "
                "blocks.input.w, blocks.group_1.block_1.res_path.conv_1.w, ..., "
                "blocks.output.conv.w")


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Logit-Laplace input mapping: x [B, 3, H, W] in [0, 1] -> [eps, 1 - eps]."""
    return (1.0 - 2.0 * eps) * x + eps


class _Conv2d(nn.Module):
    """'Same'-padded conv whose tensors are named ``w`` and ``b`` as in the release."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd, got {kw}")
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, n_in, H, W] -> [B, n_out, H, W]."""
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class _EncoderBlock(nn.Module):
    """Residual block: id_path(x) + post_gain * (ReLU-conv3 x3, ReLU-conv1)(x)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width {n_out} must be a multiple of 4")
        n_hid = n_out // 4
        # Scales each residual branch so the sum over all n_layers blocks stays O(1).
        self.post_gain = 1.0 / n_layers**2
        self.id_path = _Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", _Conv2d(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", _Conv2d(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", _Conv2d(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", _Conv2d(n_hid, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, n_in, H, W] -> [B, n_out, H, W]."""
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DVAEEncoder(nn.Module):
    """Frozen DALL-E dVAE encoder: images -> token ids on a ``grid`` x ``grid`` map.

    Defaults are OpenAI's released encoder (n_hid 256, 2 blocks per group, 8192 codes)
    at BEiT v1's 112 x 112 tokenizer input (grid 14). The module stays in eval mode and
    has no trainable parameters.

    Args:
        n_hid: width of the first group (groups are 1, 2, 4, 8 x n_hid wide).
        n_blk_per_group: residual blocks per group.
        vocab_size: number of codes (output channels).
        input_size: tokenizer input size (``input_size``); images are resized to it.
            Must be a multiple of 8 (three 2x poolings); grid = input_size // 8.
        amp: run the conv body under bf16 autocast (CUDA); the output conv and the
            argmax always run in float32. Off by default so tokens do not depend on the
            caller's precision.
        chunk_size: images per forward; bounds activation memory (group 1 alone is
            [chunk, n_hid, 112, 112]).
    """

    group_count = 4

    def __init__(self, *, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192,
                 input_size: int = 112, amp: bool = False, chunk_size: int = 64):
        super().__init__()
        if input_size % 8:
            raise ValueError(f"input_size {input_size} must be a multiple of 8")
        n_layers = self.group_count * n_blk_per_group
        widths = [n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
        groups: list[tuple[str, nn.Module]] = [("input", _Conv2d(3, n_hid, 7))]
        n_in = n_hid
        for g, width in enumerate(widths, start=1):
            layers: list[tuple[str, nn.Module]] = []
            for j in range(n_blk_per_group):
                layers.append((f"block_{j + 1}", _EncoderBlock(n_in, width, n_layers)))
                n_in = width
            if g < self.group_count:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(layers))))
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", _Conv2d(8 * n_hid, vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

        self.input_size = input_size
        self.grid = input_size // 8
        self.vocab_size = vocab_size
        self.amp = amp
        self.chunk_size = chunk_size
        self.config = dict(n_hid=n_hid, n_blk_per_group=n_blk_per_group,
                           vocab_size=vocab_size, input_size=input_size)
        # Set by `load`: where the weights came from and their digest.
        self.weights_path: str | None = None
        self.weights_sha256: str | None = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DVAEEncoder":
        # Frozen tokenizer: a parent's .train() must not change it.
        return super().train(False)

    def spec(self) -> dict[str, Any]:
        """What produces the tokens, for token-store metadata (JSON-able). Identifies
        the weights by digest, not path, so a moved file still matches."""
        return {"kind": "dvae", **self.config, "grid": self.grid,
                "weights_sha256": self.weights_sha256}

    @property
    def device(self) -> torch.device:
        return self.blocks.input.w.device

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, S, S] mapped pixels (see :func:`map_pixels`) -> logits
        [B, vocab_size, S/8, S/8] float32."""
        with autocast_or_off(x.device, self.amp and x.device.type == "cuda"):
            h = x
            for name, stage in self.blocks.named_children():
                if name == "output":
                    break
                h = stage(h)
        # The release keeps the output conv in float32 even in its fp16 mode: the
        # argmax over 8192 logits is where low precision would flip tokens.
        with autocast_or_off(x.device, False):
            return self.blocks.output(h.float())

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W] uint8 or float in [0, 1] -> logits [B, vocab, grid, grid]."""
        x = map_pixels(prepare_images(images, self.input_size, self.device))
        return torch.cat([self(chunk) for chunk in x.split(self.chunk_size)])

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W] uint8 or float in [0, 1] -> ids [B, grid*grid] int64.

        A cell's id is the argmax of its logits; ids are row-major over the grid.
        """
        x = map_pixels(prepare_images(images, self.input_size, self.device))
        ids = [self(chunk).argmax(dim=1).flatten(1) for chunk in x.split(self.chunk_size)]
        return torch.cat(ids).long()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
             input_size: int = 112, amp: bool = False,
             chunk_size: int = 64) -> "DVAEEncoder":
        """Build the encoder from OpenAI's ``encoder.pkl`` or a state dict in its layout.

        Sizes are read from the tensors. Raises :class:`TokenizerWeightsError` naming the
        file and the first few missing/unexpected keys on a layout mismatch.
        """
        path = os.fspath(path)
        state = _read_dvae_state(path)
        model = cls(**_infer_dvae_config(state), input_size=input_size, amp=amp,
                    chunk_size=chunk_size)
        check_state_dict(state, model, path=path, what="dVAE", layout=_DVAE_LAYOUT)
        model.load_state_dict(state, strict=True)
        model.weights_path, model.weights_sha256 = os.path.abspath(path), file_sha256(path)
        return model.to(device)


def _infer_dvae_config(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Sizes from tensor shapes; defaults where a key is absent (the key check reports it)."""
    cfg = dict(n_hid=256, n_blk_per_group=2, vocab_size=8192)
    w_in = state.get("blocks.input.w")
    if w_in is not None and w_in.ndim == 4:
        cfg["n_hid"] = int(w_in.shape[0])
    w_out = state.get("blocks.output.conv.w")
    if w_out is not None and w_out.ndim == 4:
        cfg["vocab_size"] = int(w_out.shape[0])
    blocks = {int(m.group(1)) for k in state
              if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    if blocks:
        cfg["n_blk_per_group"] = max(blocks)
    return cfg


# --------------------------------------------------------------------------- reading
def _read_dvae_state(path: str) -> dict[str, torch.Tensor]:
    """State dict from a plain torch state dict, or from OpenAI's pickled module."""
    if not os.path.isfile(path):
        raise TokenizerWeightsError(
            f"dVAE weights file not found: {path!r} (expected {_DVAE_LAYOUT}; pass a local "
            "path, nothing is downloaded)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses the dall_e classes of encoder.pkl: read it our way.
        obj = _load_pickled_module(path)
    except Exception as e:  # noqa: BLE001 - turned into a one-line user error
        raise TokenizerWeightsError(
            f"cannot read dVAE weights {path!r} ({type(e).__name__}: {_line(e)}); expected "
            f"{_DVAE_LAYOUT}") from e
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    state = unwrap_state_dict(obj)
    if state is None:
        raise TokenizerWeightsError(
            f"dVAE weights {path!r} hold no tensor dict (top level: "
            f"{first_items(list(obj) if isinstance(obj, Mapping) else [type(obj).__name__])}); "
            f"expected {_DVAE_LAYOUT}")
    return state


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


class _PickledDallEModule(nn.Module):
    """Inert stand-in for any ``dall_e`` module class: it only carries the unpickled
    ``_parameters``/``_modules`` so that ``state_dict()`` works."""

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("stand-in for a dall_e module; load its state dict into DVAEEncoder")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for ``encoder.pkl``: dall_e classes -> stand-in; only torch tensor and
    module classes otherwise (a pickle may name any callable, so nothing else passes)."""

    _ALLOWED = {
        ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
        ("builtins", "object"), ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"),
        ("torch.nn.parameter", "Parameter"),
    }

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles spell Python 2 module names (fix_imports maps them later).
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        if module == "dall_e" or module.startswith("dall_e."):
            return _PickledDallEModule
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module in ("torch._utils", "torch._tensor") and name.startswith("_rebuild"):
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.device)) or name in ("device", "Size") \
                    or name.endswith("Storage"):
                return obj
        if module.startswith("torch.nn.modules."):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                return obj
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: not a torch tensor/module class or a "
            "dall_e class")


def _load_pickled_module(path: str) -> Any:
    """torch.load with the restricted unpickler (both zip and legacy torch formats)."""
    restricted = types.ModuleType("mapet_ds_dvae_pickle")
    restricted.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
    restricted.load = (  # type: ignore[attr-defined]
        lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    restricted.__name__ = "mapet_ds_dvae_pickle"
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=restricted)
    except Exception as e:  # noqa: BLE001 - turned into a one-line user error
        raise TokenizerWeightsError(
            f"cannot read dVAE weights {path!r} ({type(e).__name__}: {_line(e)}); expected "
            f"{_DVAE_LAYOUT}") from e
