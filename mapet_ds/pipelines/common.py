"""Shared pieces of the DALI pipelines: device choice, file-list checks, the reader,
crop geometry, and the copy of DALI outputs into torch tensors.

One code path for CPU and GPU: with a CUDA device the images are decoded in DALI's
"mixed" mode (nvJPEG) and every later op runs on the GPU; without one the whole
pipeline runs in DALI's CPU mode (``device_id=None``).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np
import torch

from mapet_ds.filelist import FileList, FileListError, read_filelist, scan_hint, shard_indices

# the failing-sample locator (re-exported: loaders call them as common.*)
from mapet_ds.images import dali_cause
from mapet_ds.pipelines.locate import (  # noqa: F401
    find_broken,
    locate_failure,
    locate_in_tars,
    shards_hint,
)

# Same values as timm.data.constants (not imported: importing timm costs seconds).
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

READER_NAME = "reader"


def resolve_device(device: str) -> str:
    """Map "auto" | "cpu" | "mixed" (alias "gpu", "cuda") to the DALI decode mode."""
    if device == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    if device in ("gpu", "cuda"):
        device = "mixed"
    if device not in ("cpu", "mixed"):
        raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'mixed'")
    if device == "mixed" and not torch.cuda.is_available():
        raise ValueError("device='mixed' needs a CUDA GPU, and torch sees none: use device='auto' or 'cpu'")
    return device


def pipeline_device_kwargs(mode: str) -> dict:
    """Pipeline constructor arguments for a decode mode (CPU-only DALI wants device_id=None)."""
    if mode == "cpu":
        return {"device_id": None}
    return {"device_id": torch.cuda.current_device()}


def torch_device(mode: str) -> torch.device:
    """Where the image tensors land: the current CUDA device in mixed mode, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if mode == "mixed" else torch.device("cpu")


def load_filelist(filelist: str | os.PathLike | FileList) -> FileList:
    """Read (if needed) and check a file list before any pipeline is built.

    Raises FileListError (one line, naming the file) for a missing or empty list, a
    missing image root, or listed images that no longer exist on disk. The existence
    check is one ``os.path.isfile`` per image: cheap next to decoding them.
    """
    fl = filelist if isinstance(filelist, FileList) else read_filelist(filelist)
    if len(fl) == 0:
        raise FileListError(f"file list {fl.list_path} is empty: check the dataset folder it was made from")
    if not os.path.isdir(fl.root):
        raise FileListError(f"image root {fl.root} for file list {fl.list_path} is not a directory")
    fl.check_exists()
    return fl


def check_shard(shard_id: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id}, num_shards={num_shards}: need 0 <= shard_id < num_shards")


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")


def checked_mode(batch_size: int, shard_id: int, num_shards: int, device: str) -> str:
    """A loader builder's common checks; -> DALI mode ("mixed" or "cpu")."""
    check_batch_size(batch_size)
    check_shard(shard_id, num_shards)
    return resolve_device(device)


def shard_size(n: int, shard_id: int, num_shards: int) -> int:
    """Samples in one rank's shard (DALI splits ``range(n)`` as ``shard_indices`` does)."""
    return len(shard_indices(n, shard_id, num_shards))


def train_reader_batches(n: int, num_shards: int, batch_size: int) -> int:
    """Batches a sharded training reader emits per epoch, the same on every rank.

    With ``pad_last_batch`` DALI pads every shard (repeating its last sample) up to the
    largest shard's size, then up to a whole batch: ``ceil(ceil(n / num_shards) / B)``.
    """
    return math.ceil(math.ceil(n / num_shards) / batch_size)


def rank_seed(seed: int, shard_id: int, salt: int = 0) -> int:
    """A distinct, deterministic augmentation seed per (seed, rank)."""
    return (int(seed) * 1_000_003 + int(shard_id) * 7_919 + salt) % (2**31 - 1)


def reader_order(n: int, *, shard_id: int, num_shards: int, shuffle_seed: int | None) -> tuple[np.ndarray, dict]:
    """The order of a list of ``n`` samples as ``fn.readers.file`` gets it, and the reader's
    sharding arguments (see ``file_reader``). Every reader over a file list uses this, so
    readers that must run in lockstep (image + mask) shard and reshuffle identically."""
    if shuffle_seed is None:
        return (np.asarray(shard_indices(n, shard_id, num_shards)),
                {"stick_to_shard": True, "shard_id": 0, "num_shards": 1})
    return (np.random.default_rng(int(shuffle_seed)).permutation(n),
            {"shuffle_after_epoch": True, "shard_id": shard_id, "num_shards": num_shards})


def file_reader(fl: FileList, *, shard_id: int, num_shards: int, shuffle_seed: int | None):
    """DALI file reader over ``fl`` emitting (encoded bytes, sample id).

    The reader's "label" is the sample id (line index of the list), so class labels
    and token-store rows are looked up from it.

    Without ``shuffle_seed`` (eval, tokenizer view) the reader gets only this rank's
    contiguous shard, in file-list order, last batch padded with the shard's last
    sample; this also works for more ranks than samples, which DALI's own sharding
    refuses. With it (training), the whole list is first permuted by the seed (the same
    on every rank), DALI shards it and reshuffles it globally after every epoch
    (``shuffle_after_epoch`` draws the same order on every rank), so shards stay disjoint.
    """
    from nvidia.dali import fn

    order, extra = reader_order(len(fl), shard_id=shard_id, num_shards=num_shards, shuffle_seed=shuffle_seed)
    return fn.readers.file(
        name=READER_NAME,
        file_root=str(fl.root),
        files=[fl.paths[i] for i in order],
        labels=[int(i) for i in order],
        pad_last_batch=True,
        random_shuffle=False,
        **extra,
    )


def round_half_even_div2(d):
    """``round(d / 2)`` with Python's (banker's) rounding, for an integer DataNode ``d >= 0``.

    torchvision's CenterCrop places the crop at ``int(round((H - h) / 2.0))``; DALI's
    relative crop position rounds halves away from zero, which shifts odd margins by
    one pixel. Computing the anchor ourselves keeps the geometry identical.
    """
    k = d // 2
    odd = d - 2 * k
    k_is_odd = k - 2 * (k // 2)
    return k + odd * k_is_odd


# How decode_center_square places the square: the release's view is timm's RandomResizedCrop at
# scale (1, 1), ratio (1, 1), whose fallback crop starts at ``(w - side) // 2`` (floor). Recorded
# in token stores' view spec; stores made with the older half-to-even anchor are refused.
CENTER_ANCHOR = "floor"


def decoder_kwargs(mode: str) -> dict:
    """Arguments of every ``fn.decoders.*`` call: device, RGB output and, in mixed mode,
    ``jpeg_fancy_upsampling=True``.

    nvJPEG (mixed) defaults to a different chroma upsampling from libjpeg-turbo (the CPU
    decoder) and PIL, so tokens made from one backend and training views decoded by the
    other would differ at colour edges; fancy upsampling makes GPU decode equal CPU decode.
    """
    from nvidia.dali import types

    kw = {"device": mode, "output_type": types.RGB}
    if mode == "mixed":
        kw["jpeg_fancy_upsampling"] = True
    return kw


def decode_center_square(jpegs, mode: str):
    """Decode only the centre square (side = shorter side) of each image. -> uint8 HWC, RGB.

    This is the pixel region the offline tokenizer sees and the pre-training view
    covers, so visual tokens stay aligned with patches. The anchor floors odd margins
    (``(w - side) // 2``) exactly as timm's RandomResizedCrop(scale=(1, 1), ratio=(1, 1)).
    """
    from nvidia.dali import fn, math as dmath

    shape = fn.peek_image_shape(jpegs)  # [H, W, C], int64, EXIF orientation applied like the decoder
    h, w = shape[0], shape[1]
    side = dmath.min(h, w)
    anchor = fn.stack((h - side) // 2, (w - side) // 2)
    return fn.decoders.image_slice(jpegs, anchor, fn.stack(side, side), axes=[0, 1], **decoder_kwargs(mode))


def decode_resize_shorter_center_crop(jpegs, mode: str, *, scale_size: int, crop: int, interp):
    """timm/torchvision eval geometry: Resize(scale_size) then CenterCrop(crop). -> uint8 HWC.

    Output sizes follow torchvision exactly: the shorter side becomes ``scale_size`` and
    the longer ``int(scale_size * long / short)``; the crop anchor is rounded the same way.
    """
    from nvidia.dali import fn, math as dmath, types

    shape = fn.peek_image_shape(jpegs)
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    new_h = (scale_size * h) // short
    new_w = (scale_size * w) // short
    img = fn.decoders.image(jpegs, **decoder_kwargs(mode))
    img = fn.resize(
        img,
        resize_x=fn.cast(new_w, dtype=types.FLOAT),
        resize_y=fn.cast(new_h, dtype=types.FLOAT),
        interp_type=interp,
        antialias=True,
    )
    anchor = fn.stack(round_half_even_div2(new_h - crop), round_half_even_div2(new_w - crop))
    # Named (argument) inputs always live on the CPU, also when ``img`` is on the GPU.
    return fn.slice(img, start=fn.cast(anchor, dtype=types.INT32), shape=[crop, crop], axes=[0, 1])


def normalize_chw(images, *, mean: Sequence[float], std: Sequence[float], mirror=None):
    """uint8 HWC in [0, 255] -> float32 CHW, ``(x / 255 - mean) / std``, optional flip."""
    from nvidia.dali import fn, types

    kwargs = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255.0 * m for m in mean],
        std=[255.0 * s for s in std],
        **kwargs,
    )


def color_jitter(images, *, brightness, contrast, saturation):
    """torchvision ``ColorJitter`` with given factors on uint8 HWC images (per-sample DataNodes).

    Contrast pivots on each image's mean grey level (0.299 R + 0.587 G + 0.114 B), as
    torchvision and PIL do, not on 128 as DALI's ``color_twist`` does (a pixel of 40 in an
    image of mean 120 at contrast 0.5: 80, not 84); DALI's auto-augment contrast op does
    exactly this. Order: brightness and saturation (one ``color_twist``), then contrast.
    torchvision draws a random order, but with the mean pivot the three commute except for
    clipping to [0, 255] between steps, so a fixed order differs only there.
    """
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import augmentations as aa

    images = fn.color_twist(images, brightness=brightness, saturation=saturation)
    if images.device == "gpu":  # argument inputs (contrast_center) must live on the CPU
        return aa.contrast.op(images, contrast)
    # CPU: the same result as the op above, at color_twist's cost (measured 196 vs 117 img/s)
    channel_means = fn.reductions.mean(images, axis_names="HW")  # [3]
    grey = types.Constant(np.array([0.299, 0.587, 0.114], dtype=np.float32))
    return fn.contrast(images, contrast=contrast, contrast_center=fn.reductions.sum(channel_means * grey, axes=0))


def to_chw_uint8(images):
    """uint8 HWC -> uint8 CHW (the tokenizer views stay unnormalised)."""
    from nvidia.dali import fn

    return fn.transpose(images, perm=[2, 0, 1])


class PipelineRunError(RuntimeError):
    """A DALI pipeline failed on a sample (typically a corrupt image)."""


# DALI keeps this many batches in flight ahead of the one ``run`` returns (its default).
PREFETCH_DEPTH = 2


def run_pipeline(pipe, list_path, locate: Callable[[str], str | None] | None = None,
                 hint: str | None = None) -> tuple:
    """``pipe.run()`` with DALI's multi-line error cut down to the line that matters.

    ``locate(cause)`` may name the sample behind the failure; the message always ends with
    ``hint`` (default: the scan hint of a file list).
    """
    try:
        return pipe.run()
    except RuntimeError as e:
        cause = dali_cause(e)
        where = None
        if locate is not None:
            try:
                where = locate(cause)
            except Exception:  # noqa: BLE001 - a failed diagnosis must not hide the failure itself
                where = None
        where = f"; {where}" if where else ""
        raise PipelineRunError(f"DALI pipeline over {list_path} failed: {cause}{where} "
                               f"({hint or scan_hint(list_path)})") from e


def dali_to_torch(outputs, device: torch.device) -> list[torch.Tensor]:
    """Copy a pipeline's outputs (one TensorList each) into fresh torch tensors.

    A copy is required: DALI reuses its output buffers on the next ``run``. GPU copies
    go on torch's current stream, so later torch work is ordered after them.
    """
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    from nvidia.dali.tensors import TensorListGPU

    result = []
    for tl in outputs:
        t = tl.as_tensor()
        on_gpu = isinstance(tl, TensorListGPU)
        dst = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device if on_gpu else "cpu")
        if on_gpu:
            feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(device))
        else:
            feed_ndarray(t, dst)
        result.append(dst)
    return result
