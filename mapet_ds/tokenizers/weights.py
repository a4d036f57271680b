"""Reading tokenizer weight files: the helpers the VQ-KD and dVAE encoders share.

Local files only (nothing is downloaded); every failure is one
:class:`TokenizerWeightsError` line naming the file and the layout that was expected.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from mapet_ds.transfer import to_device

__all__ = [
    "TokenizerWeightsError", "file_sha256", "unwrap_state_dict", "read_state_dict", "check_state_dict",
    "prepare_images", "autocast_or_off", "first_items",
]


class TokenizerWeightsError(ValueError):
    """A tokenizer weight file is missing, unreadable, or not in the expected layout."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, streamed (weight files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """Find the tensor dict inside a checkpoint: itself, ``["model"]`` or ``["state_dict"]``.

    A DistributedDataParallel ``module.`` prefix on every key is removed. Returns None
    when no tensor dict is found.
    """
    if not isinstance(obj, Mapping):
        return None
    for wrapper in ("model", "state_dict", "module"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            obj = inner
            break
    state = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not state:
        return None
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike, *, what: str, layout: str) -> dict[str, torch.Tensor]:
    """Read a local checkpoint with ``torch.load(weights_only=True)`` and unwrap it.

    ``what`` names the tokenizer and ``layout`` describes the expected file, both for
    error messages. Raises :class:`TokenizerWeightsError` (one line) when the file is
    missing, unreadable, or holds no tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TokenizerWeightsError(
            f"{what} weights file not found: {path!r} (expected {layout}; pass a local path, "
            "nothing is downloaded)")
    try:
        # The BEiT v2 training checkpoints also pickle their argparse Namespace.
        allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - turned into a one-line user error
        raise TokenizerWeightsError(
            f"cannot read {what} weights {path!r} as a torch state dict "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); expected "
            f"{layout}") from e
    state = unwrap_state_dict(obj)
    if state is None:
        raise TokenizerWeightsError(
            f"{what} weights {path!r} hold no tensor dict (top-level keys: "
            f"{first_items(list(obj) if isinstance(obj, Mapping) else [type(obj).__name__])}); "
            f"expected {layout}")
    return state


def first_items(items: list, n: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    module: nn.Module,
    *,
    path: str,
    what: str,
    layout: str,
) -> None:
    """Raise one clear :class:`TokenizerWeightsError` unless ``state`` fits ``module``.

    Lists the first few missing keys, unexpected keys and shape mismatches together, so a
    renamed key shows up as one missing + one unexpected name.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {first_items(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {first_items(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es) (file vs model): {first_items(mismatched)}")
    raise TokenizerWeightsError(
        f"{what} weights {path!r} do not match the expected layout ({layout}): "
        + "; ".join(parts))


def prepare_images(images: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """RGB images -> float32 ``[B, 3, size, size]`` in [0, 1] on ``device``.

    images: ``[B, 3, H, W]`` uint8 (0..255) or floating point in [0, 1], any H, W.
    Images not already ``size`` x ``size`` are resized (bicubic, antialiased, then
    clamped since bicubic overshoots); non-square inputs are squashed, so pass the
    centre-square crop the ViT sees if tokens must line up with its patches.
    """
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images: expected an RGB tensor [B, 3, H, W], got {shape}")
    if images.dtype == torch.uint8:
        x = to_device(images, device).float().div_(255.0)
    elif images.is_floating_point():
        x = to_device(images, device).float()
        # One host sync; negligible next to the encoder forward, and it catches the
        # common mistake of passing 0..255 floats (the tokens would be garbage).
        lo, hi = torch.aminmax(x)
        if lo.item() < -1e-3 or hi.item() > 1.0 + 1e-3:
            raise ValueError(
                f"images: float images must be in [0, 1], got range [{lo.item():.3g}, "
                f"{hi.item():.3g}]; divide 0..255 data by 255 or pass uint8")
    else:
        raise ValueError(f"images: expected uint8 or float dtype, got {images.dtype}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                          antialias=True).clamp_(0.0, 1.0)
    return x


def autocast_or_off(device: torch.device, enabled: bool):
    """bf16 autocast when ``enabled``; otherwise *disables* any autocast the caller set."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
