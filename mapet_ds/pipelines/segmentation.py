"""DALI image + mask pipelines for semantic segmentation (mmseg's ADE20K pipeline).

List format (``data/make_seglist.py``)::

    images/training/ADE_train_00000001.jpg\tannotations/training/ADE_train_00000001.png

Two DALI file readers, one over the images and one over the masks, get the same file
order, sharding and ``shuffle_after_epoch`` (DALI draws that reshuffle from a fixed seed
per epoch), so they stay in lockstep; both emit the sample id and the loader checks that
they agree. Every geometric op takes the same per-sample arguments for both.

Training view (per sample): random rescale ``r ~ U(ratio_range)`` of ``img_scale`` =
(long, short) keeping the aspect ratio (factor ``min(r*long/max(h,w), r*short/min(h,w))``,
bilinear for the image, nearest for the mask), a random ``crop`` x ``crop`` window
(trimmed at the border), horizontal flip, photometric distortion on the image only,
normalise, then pad to ``crop`` at the bottom/right (image: 0 after normalisation, i.e.
the mean colour; mask: the ignore label), as mmseg's Pad does after Normalize.

Crop choice (mmseg RandomCrop ``cat_max_ratio``, 0.75 for ADE20K; 1.0 = one uniform draw):
the first of 11 uniform anchors (1 + mmseg's 10 re-draws) whose crop holds more than one
class and no class on ``cat_max_ratio`` or more of its non-ignored pixels, else the last.
All 11 are evaluated inside the DALI graph with DALI ops (resize over the crop's ROI,
one_hot, sums; the pick is arithmetic), so exact checkpoint/resume still holds; the class
shares are counted on the crop sampled nearest-neighbour to at most 32x32 pixels, an
estimate of the full-resolution shares (``_cat_max_crop``).

Photometric distortion (mmseg PhotoMetricDistortion, each part with probability 0.5):
brightness +U(-32, 32), contrast xU(0.5, 1.5), saturation xU(0.5, 1.5), hue +U(-18, 18) in
OpenCV's 0..180 hue scale (+-36 degrees); DALI applies brightness+contrast as one
``brightness_contrast`` (x*c + b instead of mmseg's (x+b)*c) then one ``hsv``.

Eval view: the image rescaled to ``min(long/max(h,w), short/min(h,w))`` (mmseg Resize with
keep_ratio; shorter side = ``short`` unless the image is very elongated) and the mask at its
original size (metrics are computed at full resolution after resizing the logits back).
Batch size 1, images differ in size.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from mapet_ds.filelist import FileList, FileListError, shard_indices
from mapet_ds.pipelines import common as C
from mapet_ds.pipelines.graphs import _build
from mapet_ds.pipelines.loaders import TrainLoader

SEG_OUTPUTS = ("images", "masks", "sample_ids", "mask_ids")


@dataclass
class SegList:
    """Image list (``fl``: labels = sample ids) + the mask of each image."""

    fl: FileList
    masks: list[str]

    def __len__(self) -> int:
        return len(self.masks)

    def masks_digest(self) -> str:
        return hashlib.sha256("\n".join(self.masks).encode()).hexdigest()


def read_seglist(path: str | os.PathLike, root: str | os.PathLike | None = None, check: bool = True) -> SegList:
    """Read ``image<TAB>mask`` lines (paths relative to ``root``, default the list's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileListError(f"segmentation list {path} does not exist (make one with data/make_seglist.py)")
    root_dir = Path(root) if root is not None else path.parent
    images, masks, lines = [], [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FileListError(f"segmentation list {path} cannot be read ({e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise FileListError(f"{path}:{lineno}: expected '<image>\\t<mask>', got {line!r} "
                                f"(is this a classification list? make one with data/make_seglist.py)")
        if parts[1].strip().isdigit():
            raise FileListError(f"{path}:{lineno}: second column {parts[1].strip()!r} is a class index, not a mask: "
                                f"a classification list; segmentation needs '<image>\\t<mask>' lines "
                                f"(data/make_seglist.py, or make_demo.py --segmentation)")
        images.append(parts[0].strip())
        masks.append(parts[1].strip())
        lines.append(lineno)
    if not images:
        raise FileListError(f"segmentation list {path} is empty: check the dataset folder it was made from")
    fl = FileList(list_path=path, root=root_dir, paths=images, labels=list(range(len(images))), lines=lines)
    if check:
        fl.check_exists()
        FileList(list_path=path, root=root_dir, paths=masks, labels=list(range(len(masks))), lines=lines).check_exists()
    return SegList(fl, masks)


def _pair_reader(fl: FileList, masks: Sequence[str], *, shard_id: int, num_shards: int, shuffle_seed: int | None):
    """(encoded images, encoded masks, image ids, mask ids): two file readers in lockstep
    (same order, sharding and per-epoch reshuffle; see ``common.file_reader``)."""
    from nvidia.dali import fn

    order, extra = C.reader_order(len(fl), shard_id=shard_id, num_shards=num_shards, shuffle_seed=shuffle_seed)
    common = dict(file_root=str(fl.root), labels=[int(i) for i in order], pad_last_batch=True,
                  random_shuffle=False, **extra)
    jpegs, ids = fn.readers.file(name=C.READER_NAME, files=[fl.paths[i] for i in order], **common)
    # fl.labels hold the sample ids of the full list (a sub-list of an elastic tail keeps them)
    pngs, mids = fn.readers.file(name="mask_reader", files=[masks[fl.labels[i]] for i in order], **common)
    return jpegs, pngs, ids, mids


def _decode_mask(pngs, reduce_zero_label: bool):
    """-> uint8 HW1 on the CPU; ADE: 0 -> 255 (ignore), k -> k - 1."""
    from nvidia.dali import fn, types

    m = fn.decoders.image(pngs, device="cpu", output_type=types.GRAY)
    if reduce_zero_label:
        m = fn.lookup_table(m, keys=list(range(1, 256)), values=list(range(0, 255)), default_value=255,
                            dtype=types.UINT8)
    return m


def _keep_ratio_size(h, w, long_side, short_side):
    """mmseg Resize(keep_ratio): factor min(long/max(h,w), short/min(h,w)); int(x*f + 0.5)."""
    from nvidia.dali import fn, math as dmath, types

    hf, wf = fn.cast(h, dtype=types.FLOAT), fn.cast(w, dtype=types.FLOAT)
    f = dmath.min(long_side / dmath.max(hf, wf), short_side / dmath.min(hf, wf))
    return dmath.floor(hf * f + 0.5), dmath.floor(wf * f + 0.5)


def _photometric(img):
    from nvidia.dali import fn, types

    def maybe(lo, hi, neutral):
        coin = fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT)
        return coin * fn.random.uniform(range=[lo, hi]) + (1.0 - coin) * neutral

    img = fn.brightness_contrast(img, brightness_shift=maybe(-32.0, 32.0, 0.0) / 255.0,
                                 contrast=maybe(0.5, 1.5, 1.0), contrast_center=0.0)
    return fn.hsv(img, hue=maybe(-36.0, 36.0, 0.0), saturation=maybe(0.5, 1.5, 1.0))


CAT_MAX_REDRAWS = 10  # mmseg RandomCrop: re-draws after the first box
# side of the grid a candidate crop's class shares are counted on: at 512 px crops (16 images,
# 2 CPU threads) 32 costs ~+20% of the pipeline's time and 64 ~+95%; a simulation on random
# region masks flipped 1.3% (32) and 0.6% (64) of the accept/reject decisions of exact counts
CAT_MAX_GRID = 32


def _cat_max_crop(msk, start0, nh, nw, *, crop: int, ratio: float, ignore_index: int):
    """mmseg's RandomCrop(cat_max_ratio) choice. msk: uint8 [h,w,1] (already rescaled to
    nh x nw, float scalars); start0: float [2] (y, x), the first draw. -> float [2]: of
    start0 and CAT_MAX_REDRAWS more uniform anchors, the first whose ``crop`` window holds
    > 1 class and no class on >= ``ratio`` of its labelled pixels, else the last one.

    Every candidate is evaluated (a DALI graph cannot stop early) and the pick is arithmetic,
    so the graph holds no python op and resumes exactly. Class shares are counted on the
    window nearest-neighbour sampled to at most CAT_MAX_GRID x CAT_MAX_GRID pixels: a
    full-resolution one-hot would write crop * crop * classes bytes per candidate
    (512 * 512 * 255 = 67 MB), the grid 0.26 MB; near the threshold the estimate can decide
    differently from mmseg's exact count. Labels above ignore_index (invalid) are not counted.
    """
    from nvidia.dali import fn, math as dmath, types

    size = fn.stack(nh, nw)
    margin = dmath.max(size - crop, 0.0) + 1.0
    starts = [start0] + [dmath.floor(fn.random.uniform(range=[0.0, 1.0], shape=[2]) * margin)
                         for _ in range(CAT_MAX_REDRAWS)]
    oks = []
    for start in starts:
        end = dmath.min(start + crop, size)  # the crop is trimmed at the border
        grid = fn.resize(msk, roi_start=start, roi_end=end, size=dmath.min(end - start, float(CAT_MAX_GRID)),
                         interp_type=types.INTERP_NN, antialias=False)
        # labels >= ignore_index fall outside the one-hot (all zeros), so the ignore label is not counted
        counts = fn.reductions.sum(fn.one_hot(grid, num_classes=ignore_index, dtype=types.UINT8), axes=[0, 1, 2],
                                   dtype=types.FLOAT)  # [ignore_index]
        # mmseg's "more than one class" test is implied for ratio <= 1: one class has share 1, and
        # a crop of only ignore pixels gives 0 < 0
        oks.append(fn.reductions.max(counts) < ratio * fn.reductions.sum(counts))
    chosen = starts[-1]
    for ok, start in zip(reversed(oks[:-1]), reversed(starts[:-1])):  # first acceptable in draw order wins
        chosen = ok * start + (1 - ok) * chosen
    return chosen


def build_seg_train(sl: SegList, *, crop: int, img_scale: Sequence[int], ratio_range: Sequence[float],
                    hflip: float, photometric: bool, reduce_zero_label: bool, ignore_index: int,
                    mean: Sequence[float], std: Sequence[float], batch_size: int, shard_id: int, num_shards: int,
                    seed: int, num_threads: int, mode: str, checkpoint: bytes | None,
                    prefetch_queue_depth: int = 2, fl: FileList | None = None, cat_max_ratio: float = 1.0):
    """-> images float32 [B,3,crop,crop], masks uint8 [B,1,crop,crop], ids [B], mask ids [B].
    ``cat_max_ratio`` < 1 adds mmseg's crop re-draws (``_cat_max_crop``); 1.0 builds the
    single-draw graph."""
    from nvidia.dali import fn, types

    fl = fl if fl is not None else sl.fl
    long_side, short_side = float(max(img_scale)), float(min(img_scale))

    def graph():
        jpegs, pngs, ids, mids = _pair_reader(fl, sl.masks, shard_id=shard_id, num_shards=num_shards,
                                              shuffle_seed=seed)
        img = fn.decoders.image(jpegs, **C.decoder_kwargs(mode))
        msk = _decode_mask(pngs, reduce_zero_label)
        shape = fn.peek_image_shape(jpegs)
        lo, hi = ratio_range
        r = fn.random.uniform(range=[lo, hi]) if lo < hi else float(lo)  # DALI refuses an empty range
        nh, nw = _keep_ratio_size(shape[0], shape[1], long_side * r, short_side * r)
        img = fn.resize(img, resize_x=nw, resize_y=nh, interp_type=types.INTERP_LINEAR, antialias=False)
        msk = fn.resize(msk, resize_x=nw, resize_y=nh, interp_type=types.INTERP_NN, antialias=False)
        # crop anchor uniform over the valid positions (0 when the side is below the crop)
        from nvidia.dali import math as dmath

        ay = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (dmath.max(nh - crop, 0.0) + 1.0))
        ax = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (dmath.max(nw - crop, 0.0) + 1.0))
        start = fn.stack(ay, ax)
        if cat_max_ratio < 1:
            start = _cat_max_crop(msk, start, nh, nw, crop=crop, ratio=cat_max_ratio, ignore_index=ignore_index)
        start = fn.cast(start, dtype=types.INT32)
        img = fn.slice(img, start=start, shape=[crop, crop], axes=[0, 1], out_of_bounds_policy="trim_to_shape")
        msk = fn.slice(msk, start=start, shape=[crop, crop], axes=[0, 1], out_of_bounds_policy="trim_to_shape")
        if photometric:
            img = _photometric(img)
        flip = fn.random.coin_flip(probability=hflip) if hflip > 0 else None
        img = C.normalize_chw(img, mean=mean, std=std, mirror=flip)
        if flip is not None:
            msk = fn.flip(msk, horizontal=flip)
        if mode == "mixed":
            msk = msk.gpu()
        img = fn.pad(img, axes=[1, 2], shape=[crop, crop], fill_value=0.0)
        msk = fn.pad(fn.transpose(msk, perm=[2, 0, 1]), axes=[1, 2], shape=[crop, crop], fill_value=ignore_index)
        return img, msk, ids, mids

    return _build(graph, batch_size=batch_size, num_threads=num_threads, mode=mode,
                  seed=C.rank_seed(seed, shard_id, salt=5), checkpoint=checkpoint, checkpointing=True,
                  prefetch_queue_depth=prefetch_queue_depth)


def build_seg_eval(sl: SegList, *, img_scale: Sequence[int], reduce_zero_label: bool, mean: Sequence[float],
                   std: Sequence[float], shard_id: int, num_shards: int, num_threads: int, mode: str):
    """Batch 1, file-list order within the shard. -> image float32 [1,3,h,w] (rescaled),
    mask uint8 [1,1,H,W] (original size), ids, mask ids."""
    from nvidia.dali import fn, types

    long_side, short_side = float(max(img_scale)), float(min(img_scale))

    def graph():
        jpegs, pngs, ids, mids = _pair_reader(sl.fl, sl.masks, shard_id=shard_id, num_shards=num_shards,
                                              shuffle_seed=None)
        img = fn.decoders.image(jpegs, **C.decoder_kwargs(mode))
        shape = fn.peek_image_shape(jpegs)
        nh, nw = _keep_ratio_size(shape[0], shape[1], long_side, short_side)
        img = fn.resize(img, resize_x=nw, resize_y=nh, interp_type=types.INTERP_LINEAR, antialias=False)
        msk = fn.transpose(_decode_mask(pngs, reduce_zero_label), perm=[2, 0, 1])
        return C.normalize_chw(img, mean=mean, std=std), msk, ids, mids

    return _build(graph, batch_size=1, num_threads=num_threads, mode=mode, seed=0, checkpoint=None,
                  checkpointing=False)


def _check_pairs(batch: dict, sl: SegList) -> None:
    if not torch.equal(batch["sample_ids"], batch.pop("mask_ids").reshape(-1).to(torch.int64)):
        raise RuntimeError(f"{sl.fl.list_path}: image and mask readers went out of step (a DALI reader bug)")


class SegTrainLoader(TrainLoader):
    """TrainLoader (exact and elastic resume, see its docstring) over image + mask pairs.
    Batches: images float32 [B,3,S,S], masks int64 [B,S,S] (255 = ignore), sample_ids [B]."""

    def __init__(self, sl: SegList, **kw):
        self._sl = sl
        super().__init__(fl=sl.fl, **kw)

    def __next__(self) -> dict:
        batch = super().__next__()
        _check_pairs(batch, self._sl)
        batch["masks"] = batch["masks"][:, 0].long()
        return batch


def seg_train_loader(sl: SegList, *, crop: int, img_scale: Sequence[int], ratio_range: Sequence[float],
                     hflip: float, photometric: bool, reduce_zero_label: bool, ignore_index: int,
                     batch_size: int, shard_id: int, num_shards: int, seed: int, num_threads: int = 2,
                     device: str = "auto", mean: Sequence[float] = C.IMAGENET_DEFAULT_MEAN,
                     std: Sequence[float] = C.IMAGENET_DEFAULT_STD, checkpoint: str | bytes | None = None,
                     prefetch_queue_depth: int = 2, cat_max_ratio: float = 1.0) -> SegTrainLoader:
    mode = C.checked_mode(batch_size, shard_id, num_shards, device)
    view = dict(crop=crop, img_scale=list(img_scale), ratio_range=list(ratio_range), hflip=hflip,
                photometric=photometric, reduce_zero_label=reduce_zero_label, ignore_index=ignore_index,
                mean=list(mean), std=list(std), cat_max_ratio=float(cat_max_ratio))
    return SegTrainLoader(
        sl, kind="segment_train", batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, mode=mode,
        signature={"seed": seed, "masks_digest": sl.masks_digest(), **view}, outputs=SEG_OUTPUTS, with_labels=False,
        checkpoint=checkpoint, prefetch_depth=prefetch_queue_depth,
        build=lambda ck, fl=None, seed=seed: build_seg_train(
            sl, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed, num_threads=num_threads,
            mode=mode, checkpoint=ck, prefetch_queue_depth=prefetch_queue_depth, fl=fl, **view))


class SegEvalLoader:
    """This rank's contiguous shard of the list, one image per batch, once per ``iter()``:
    {"images" float32 [1,3,h,w], "masks" int64 [1,H,W], "sample_ids" [1]}. No padding:
    the eval loop has no collective inside, only the final all-reduce of the histogram."""

    def __init__(self, sl: SegList, *, img_scale: Sequence[int], reduce_zero_label: bool, shard_id: int,
                 num_shards: int, num_threads: int = 2, device: str = "auto",
                 mean: Sequence[float] = C.IMAGENET_DEFAULT_MEAN, std: Sequence[float] = C.IMAGENET_DEFAULT_STD):
        mode = C.checked_mode(1, shard_id, num_shards, device)
        self._sl = sl
        self.sample_ids = shard_indices(len(sl), shard_id, num_shards)
        self._device = C.torch_device(mode)
        self._pipe = build_seg_eval(sl, img_scale=img_scale, reduce_zero_label=reduce_zero_label, mean=mean,
                                    std=std, shard_id=shard_id, num_shards=num_shards, num_threads=num_threads,
                                    mode=mode) if len(self.sample_ids) else None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _locate(self, cause: str) -> str | None:
        return C.locate_failure(self._sl.fl, cause, list(self.sample_ids))

    def __iter__(self) -> Iterator[dict]:
        # the reader's epoch is exactly the shard (batch 1): every pass starts at its top
        for _ in range(len(self.sample_ids)):
            out = C.run_pipeline(self._pipe, self._sl.fl.list_path, self._locate)
            images, masks, ids, mids = C.dali_to_torch(out, self._device)
            batch = {"images": images, "masks": masks[:, 0].long(), "sample_ids": ids.reshape(-1).to(torch.int64),
                     "mask_ids": mids}
            _check_pairs(batch, self._sl)
            yield batch


def eval_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of mmseg's slide_inference windows; together they cover every pixel."""
    def starts(n: int) -> list[int]:
        grids = max(math.ceil((n - crop) / stride), 0) + 1
        return sorted({max(min(i * stride, n - crop), 0) for i in range(grids)})
    return [(y, x) for y in starts(height) for x in starts(width)]
