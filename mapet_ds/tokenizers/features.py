"""Patch feature extractors for k-means visual tokenizers (METHOD.md section 4).

Every extractor maps a batch of images to one feature vector per patch cell, on the
same grid as the ViT's patches, so that token ``j`` of an image is the target of
patch ``j``::

    extractor.extract(images: uint8 [B, 3, S, S]) -> float32 [B, grid*grid, dim]

``S == extractor.input_size`` (the centre-square crop resized to it, RGB) and the
``grid*grid`` cells are in row-major order, the order of a flattened conv patch
embedding. ``extractor.spec()`` is a JSON-able description stored with codebooks and
token stores; ``build_extractor(spec)`` rebuilds the same extractor from it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
import torch.nn.functional as F

from mapet_ds.transfer import to_device


class FeatureError(ValueError):
    """An extractor cannot be built as asked (weights, model name, grid, input size)."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> the rank's GPU when CUDA is present, else the CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(device)


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """{"path", "size", "sha256"} of a weights file: identifies the exact weights used."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"path": os.path.abspath(path), "size": os.path.getsize(path), "sha256": h.hexdigest()}


def _is_torchscript(path: str) -> bool:
    """True for a TorchScript zip archive (it holds code/ and constants.pkl)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def _check_images(images: torch.Tensor, size: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise FeatureError(f"images must be a uint8 tensor [B, 3, {size}, {size}], got {shape}")
    if images.shape[2] != size or images.shape[3] != size:
        raise FeatureError(
            f"images are {images.shape[2]}x{images.shape[3]} but this extractor takes {size}x{size} "
            f"(load them at extractor.input_size)"
        )


PIXEL_NORMS = ("patch", "channel", "luma")
# ITU-R BT.601 luma weights (what PIL's "L" conversion uses).
_LUMA = (0.299, 0.587, 0.114)


class PixelPatchExtractor:
    """Weight-free features: each patch's pixels, normalised per patch (``norm``).

    ``norm`` says which values share one mean/std (``var + eps`` floor):

    - ``"patch"``: all ``3*p*p`` values of the patch together (MAE's normalised-pixel
      target). Brightness and contrast go, but the *relative* colour of the channels
      stays: a flat red patch is not a flat blue one, so k-means spends codes on hue.
      Codebooks fitted before the option existed (no ``pixel_norm`` in their spec) are
      this mode.
    - ``"channel"``: each channel of the patch on its own (``3*p*p`` dims). A flat patch
      of any colour maps to the zero vector; colour edges keep their structure.
    - ``"luma"``: the patch converted to luma (0.299 R + 0.587 G + 0.114 B), then one
      mean/std (``p*p`` dims). Structure tokens: a flat patch of any colour maps to
      zero and iso-luminant colour changes vanish, so codes describe edges and texture.

    Why normalise at all: on raw pixels the largest distances between patches are
    brightness and contrast, so k-means would spend most codes on intensity levels.
    """

    kind = "pixel"

    def __init__(self, patch_size: int = 16, img_size: int = 224, *, eps: float = 1e-2, norm: str = "patch",
                 device="auto"):
        if patch_size <= 0 or img_size <= 0 or img_size % patch_size:
            raise FeatureError(f"img_size {img_size} must be a positive multiple of patch_size {patch_size}")
        if norm not in PIXEL_NORMS:
            raise FeatureError(f"pixel normalisation {norm!r} is not one of {', '.join(PIXEL_NORMS)}")
        self.patch_size = int(patch_size)
        self.input_size = int(img_size)
        self.grid = self.input_size // self.patch_size
        self.norm = norm
        self.channels = 1 if norm == "luma" else 3
        self.dim = self.channels * self.patch_size * self.patch_size
        # Variance floor on [0, 1] pixels: keeps near-flat patches (JPEG noise) from being
        # blown up to unit contrast.
        self.eps = float(eps)
        self.device = resolve_device(device)

    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 [B, 3, S, S] -> float32 [B, grid*grid, C*p*p] (C = 1 for luma, else 3; on self.device)."""
        _check_images(images, self.input_size)
        x = to_device(images, self.device).float().div_(255.0)
        if self.norm == "luma":
            x = (x * x.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)  # [B, 1, S, S]
        p = self.patch_size
        # [B, C*p*p, grid*grid] with each column one patch, channel-major; cells in row-major order.
        cols = F.unfold(x, kernel_size=p, stride=p)
        patches = cols.transpose(1, 2)  # [B, grid*grid, C*p*p]
        if self.norm == "channel":
            patches = patches.unflatten(-1, (3, p * p))  # [B, cells, 3, p*p]
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True, unbiased=False)
        out = (patches - mean) / (var + self.eps).sqrt()
        return out.flatten(2).contiguous()

    def spec(self) -> dict[str, Any]:
        spec = {
            "kind": self.kind,
            "patch_size": self.patch_size,
            "input_size": self.input_size,
            "grid": self.grid,
            "dim": self.dim,
            "eps": self.eps,
            "normalisation": "per-patch mean/std",
        }
        if self.norm != "patch":
            # "patch" leaves the key out so the specs (and fingerprints) of codebooks, token
            # stores and shards made before the option existed stay what they were.
            spec["pixel_norm"] = self.norm
            spec["normalisation"] = {"channel": "per-patch per-channel mean/std",
                                     "luma": "per-patch mean/std of luma"}[self.norm]
        return spec


def pixel_norm_of(spec: dict[str, Any]) -> str | None:
    """The pixel normalisation of an extractor spec ("patch" when it predates the option); None if not pixel."""
    return spec.get("pixel_norm", "patch") if spec.get("kind") == "pixel" else None


class ClipExtractor:
    """Frozen CLIP image tower (open_clip) giving one feature per patch cell.

    ResNet towers (the release: RN50x64 at 448 px): the ``layer4`` map before
    attention pooling, [B, C, H/32, W/32] -> [B, cells, C], as is (no normalisation).
    ViT towers: the patch tokens (after ``ln_post``, before the projection).

    ``pretrained`` is a local weights file, or an open_clip tag (e.g. "openai") when
    the machine can download. ``grid`` is the ViT patch grid the tokens must align
    with; the tower's real output grid at ``input_size`` is probed once and checked.
    """

    kind = "clip"

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        input_size: int | None = None,
        grid: int = 14,
        *,
        device="auto",
        amp: str = "auto",
    ):
        try:
            import open_clip
        except ImportError as e:  # pragma: no cover - a dependency of the project
            raise FeatureError("the clip extractor needs open_clip (pip install open_clip_torch)") from e
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = resolve_device(device)
        if model_name not in open_clip.list_models():
            raise FeatureError(
                f"unknown open_clip model {model_name!r} (see open_clip.list_models(); "
                f"register a custom config with open_clip.add_model_config)"
            )
        self.weights = None
        looks_like_file = bool(pretrained) and (
            os.path.sep in str(pretrained)
            or os.path.exists(pretrained)
            or str(pretrained).endswith((".pt", ".pth", ".bin", ".safetensors"))
        )
        if looks_like_file:
            if not os.path.isfile(pretrained):
                raise FeatureError(f"CLIP weights file {pretrained} does not exist (pass --clip-weights /path/to/file)")
            self.weights = file_fingerprint(pretrained)
        model_cfg = open_clip.get_model_config(model_name) or {}
        vision_cfg = model_cfg.get("vision_cfg", {})
        self.tower_type = "resnet" if isinstance(vision_cfg.get("layers"), (list, tuple)) else "vit"
        kwargs: dict[str, Any] = {}
        native = vision_cfg.get("image_size", 224)
        native = native[0] if isinstance(native, (list, tuple)) else native
        if input_size is not None and input_size != native and self.tower_type == "vit":
            # open_clip interpolates the ViT position embedding to the new size on load;
            # the ResNet trunk is convolutional and takes any multiple of 32 as it is.
            kwargs["force_image_size"] = input_size
        if self.weights is not None and _is_torchscript(pretrained):
            # OpenAI's released CLIP files are TorchScript archives, which torch.load refuses
            # under weights_only=True; open_clip reads their state dict when allowed to.
            kwargs["weights_only"] = False
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, device="cpu", **kwargs)
        except Exception as e:
            raise FeatureError(
                f"could not build open_clip {model_name!r} with pretrained={pretrained!r}: "
                f"{type(e).__name__}: {' '.join(str(e).split())[:300]} "
                f"(check that the weights file belongs to this model)"
            ) from e
        visual = model.visual.eval().requires_grad_(False)
        del model  # the text tower is not needed
        pre = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(float(m) for m in pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(float(s) for s in pre.get("std", open_clip.OPENAI_DATASET_STD))
        self.input_size = int(input_size or native)
        if self.tower_type == "resnet":
            if not all(hasattr(visual, a) for a in ("stem", "layer4", "attnpool")):
                raise FeatureError(f"{model_name}: expected an open_clip ModifiedResNet tower, got {type(visual).__name__}")
            self.layer = "layer4"
        else:
            if not hasattr(visual, "output_tokens"):
                raise FeatureError(f"{model_name}: tower {type(visual).__name__} cannot return patch tokens")
            visual.output_tokens = True
            self.layer = "patch_tokens"
        self.visual = visual.to(self.device)
        if self.device.type == "cuda" and self.tower_type == "resnet":
            self.visual = self.visual.to(memory_format=torch.channels_last)
        # fp16 autocast on GPUs as in the release (amp="bf16" to choose bf16); fp32 on the CPU.
        if amp == "auto":
            amp = "fp16" if self.device.type == "cuda" else "none"
        if amp not in ("fp16", "bf16", "none"):
            raise FeatureError(f"amp must be auto, fp16, bf16 or none, got {amp!r}")
        self.amp = amp
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        # Probe the real output grid once: the only reliable check that cell j of the
        # tokenizer is patch j of the ViT.
        probe = self._features(torch.zeros(1, 3, self.input_size, self.input_size, device=self.device))
        cells, self.dim = probe.shape[1], probe.shape[2]
        side = int(round(cells**0.5))
        if side * side != cells or side != grid:
            stride = self.input_size // max(side, 1)
            raise FeatureError(
                f"CLIP {model_name} at {self.input_size}px gives a {side}x{side} feature grid ({cells} cells) but the "
                f"ViT patch grid is {grid}x{grid}: set the CLIP input size to {stride * grid} "
                f"(--clip-input-size; {stride} px per cell) or change the ViT's img/patch size"
            )
        self.grid = side

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [B, 3, S, S] normalised -> float32 [B, cells, dim]."""
        enabled = self.amp != "none"
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        with torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
            if self.tower_type == "resnet":
                v = self.visual
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                # The trunk only: stem and the four stages, stopping before attnpool.
                y = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # [B, C, h, w]
                feats = y.flatten(2).transpose(1, 2)
            else:
                out = self.visual(x)
                feats = out[1] if isinstance(out, tuple) else out
        return feats.float().contiguous()

    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 [B, 3, S, S] RGB -> float32 [B, grid*grid, dim] (on self.device)."""
        _check_images(images, self.input_size)
        x = to_device(images, self.device).float().div_(255.0)
        x = (x - self._mean) / self._std
        return self._features(x)

    def spec(self) -> dict[str, Any]:
        weights = self.weights if self.weights is not None else {"tag": self.pretrained}
        return {
            "kind": self.kind,
            "model": self.model_name,
            "tower": self.tower_type,
            "layer": self.layer,
            "weights": weights,
            "input_size": self.input_size,
            "grid": self.grid,
            "dim": self.dim,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def build_extractor(spec: dict[str, Any], *, clip_weights: str | None = None, device="auto"):
    """Rebuild the extractor a codebook was fitted with from its ``spec()``.

    clip_weights: a new location of the same weights file (checked by sha256).
    """
    kind = spec.get("kind")
    if kind == "pixel":
        norm = pixel_norm_of(spec)
        if norm not in PIXEL_NORMS:
            raise FeatureError(f"tokenizer spec has pixel_norm {norm!r}: expected one of {', '.join(PIXEL_NORMS)} "
                               f"(a codebook from a newer mapet_ds?)")
        return PixelPatchExtractor(spec["patch_size"], spec["input_size"], eps=spec.get("eps", 1e-2), norm=norm,
                                   device=device)
    if kind == "clip":
        weights = spec.get("weights") or {}
        pretrained = clip_weights or weights.get("path") or weights.get("tag")
        ext = ClipExtractor(spec["model"], pretrained, spec["input_size"], spec["grid"], device=device)
        want, got = weights.get("sha256"), (ext.weights or {}).get("sha256")
        if want and got and want != got:
            raise FeatureError(
                f"CLIP weights {pretrained} (sha256 {got[:12]}) are not the weights the codebook was fitted "
                f"with (sha256 {want[:12]}, {weights.get('path')}): pass the original file with --clip-weights"
            )
        return ext
    raise FeatureError(f"unknown extractor kind {kind!r} in tokenizer spec (expected 'pixel' or 'clip')")
