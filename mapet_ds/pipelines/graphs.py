"""The four DALI graphs: tokenizer view, pre-training, fine-tune train, eval.

Each builder returns a built ``nvidia.dali.Pipeline`` whose outputs are, in order,
the names in its ``OUTPUTS`` tuple. Image outputs are CHW; sample ids come from the
reader (its "label" is the line index of the file list).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

from mapet_ds.filelist import FileList
from mapet_ds.pipelines import common as C
from mapet_ds.pipelines.randaugment import RandAugmentSpec, apply_rand_augment, timm_fill

TOKENIZER_VIEW_OUTPUTS = ("images", "sample_ids")
EVAL_OUTPUTS = ("images", "sample_ids")
FINETUNE_OUTPUTS = ("images", "sample_ids")


def tokenizer_view_spec(size: int) -> dict:
    """What ``build_tokenizer_view`` shows the offline tokenizer; recorded in token stores.

    ``crop_anchor``: odd margins of the centre square are floored (``common.CENTER_ANCHOR``).
    """
    return {"crop": "center_square", "size": int(size), "interpolation": "bicubic", "crop_anchor": C.CENTER_ANCHOR}


def pretrain_view_spec(random_resized_crop: bool) -> dict:
    """The pixel region and kernel of ``build_pretrain``'s ViT view (its size is the model's).

    Offline tokens fit it only when crop and interpolation match the store's tokenizer
    view; sizes differ by design (the store's token grid is checked against the model).
    """
    if random_resized_crop:
        return {"crop": "random_resized_crop", "interpolation": "bicubic"}
    return {"crop": "center_square", "interpolation": "bicubic", "crop_anchor": C.CENTER_ANCHOR}


def pretrain_outputs(with_tok_view: bool) -> tuple[str, ...]:
    return ("images", "sample_ids", "tok_images") if with_tok_view else ("images", "sample_ids")


def _build(graph: Callable[[], tuple], *, batch_size: int, num_threads: int, mode: str, seed: int,
           checkpoint: bytes | None, checkpointing: bool, conditionals: bool = False,
           prefetch_queue_depth: int = C.PREFETCH_DEPTH):
    """Trace ``graph`` (a function returning the pipeline outputs) into a built Pipeline."""
    from nvidia.dali import pipeline_def

    # DALI's own auto-augment ops still call deprecated fn.experimental aliases and force
    # those warnings on; record them here and pass on only the others.
    with warnings.catch_warnings(record=True) as caught:
        pipe = pipeline_def(graph, enable_conditionals=conditionals)(
            batch_size=batch_size,
            num_threads=num_threads,
            seed=seed,
            # Training pipelines track reader position + RNG states so a run can resume exactly.
            enable_checkpointing=checkpointing,
            checkpoint=checkpoint,
            prefetch_queue_depth=prefetch_queue_depth,
            **C.pipeline_device_kwargs(mode),
        )
        pipe.build()
    for w in caught:
        if not (issubclass(w.category, DeprecationWarning) and "fn.experimental" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return pipe


def _interp(name: str):
    from nvidia.dali import types

    table = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR, "nearest": types.INTERP_NN,
             "lanczos": types.INTERP_LANCZOS3}
    if name not in table:
        raise ValueError(f"interpolation={name!r}: expected one of {sorted(table)}")
    return table[name]


def build_tokenizer_view(fl: FileList, *, size: int, batch_size: int, shard_id: int, num_shards: int,
                         num_threads: int, mode: str):
    """Centre square crop resized to ``size``; file-list order; -> uint8 [B,3,size,size], ids [B]."""
    from nvidia.dali import fn, types

    def graph():
        jpegs, ids = C.file_reader(fl, shard_id=shard_id, num_shards=num_shards, shuffle_seed=None)
        img = C.decode_center_square(jpegs, mode)
        img = fn.resize(img, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
        return C.to_chw_uint8(img), ids

    return _build(graph, batch_size=batch_size, num_threads=num_threads, mode=mode, seed=0, checkpoint=None,
                  checkpointing=False)


def build_pretrain(fl: FileList, *, img_size: int, batch_size: int, shard_id: int, num_shards: int, seed: int,
                   num_threads: int, mode: str, color_jitter: float, mean: Sequence[float], std: Sequence[float],
                   tokenizer_view_size: int | None, random_resized_crop: bool, checkpoint: bytes | None,
                   prefetch_queue_depth: int = 2, reader: Callable[[], tuple] | None = None):
    """Pre-training views. -> images float32 [B,3,S,S] normalised, ids [B], tok uint8 [B,3,T,T].

    Default (offline tokens): the tokenizer's centre square crop + colour jitter, no flip.
    ``random_resized_crop``: one RRC window + one flip coin shared by both views (online
    tokenizers). The colour jitter factors are drawn once per sample and applied to
    both views, so the tokenizer view shows the same pixels as the ViT input.

    ``reader`` (shards): returns (encoded images, ids, *extra) instead of the file reader;
    the extra outputs (labels, tokens) are appended to the pipeline's outputs.
    """
    from nvidia.dali import fn, types

    def graph():
        jpegs, ids, *extra = reader() if reader is not None else \
            C.file_reader(fl, shard_id=shard_id, num_shards=num_shards, shuffle_seed=seed)
        flip = None
        if random_resized_crop:
            img = fn.decoders.image_random_crop(jpegs, random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                num_attempts=10, **C.decoder_kwargs(mode))
            flip = fn.random.coin_flip(probability=0.5)
        else:
            img = C.decode_center_square(jpegs, mode)
        sizes = [img_size] + ([tokenizer_view_size] if tokenizer_view_size else [])
        views = [fn.resize(img, size=[s, s], interp_type=types.INTERP_CUBIC, antialias=True) for s in sizes]
        if color_jitter > 0:
            lo, hi = max(0.0, 1.0 - color_jitter), 1.0 + color_jitter
            b = fn.random.uniform(range=[lo, hi])
            c = fn.random.uniform(range=[lo, hi])
            s = fn.random.uniform(range=[lo, hi])
            views = [C.color_jitter(v, brightness=b, contrast=c, saturation=s) for v in views]
        outs = [C.normalize_chw(views[0], mean=mean, std=std, mirror=flip), ids]
        if tokenizer_view_size:
            tok = views[1] if flip is None else fn.flip(views[1], horizontal=flip)
            outs.append(C.to_chw_uint8(tok))
        return tuple(outs) + tuple(extra)

    return _build(graph, batch_size=batch_size, num_threads=num_threads, mode=mode,
                  seed=C.rank_seed(seed, shard_id, salt=1), checkpoint=checkpoint, checkpointing=True,
                  prefetch_queue_depth=prefetch_queue_depth)


def build_finetune_train(fl: FileList, *, img_size: int, batch_size: int, shard_id: int, num_shards: int,
                         seed: int, num_threads: int, mode: str, scale: Sequence[float], ratio: Sequence[float],
                         hflip: float, rand_augment: RandAugmentSpec | None, mean: Sequence[float],
                         std: Sequence[float], checkpoint: bytes | None, interpolation: str = "bicubic",
                         prefetch_queue_depth: int = 2, reader: Callable[[], tuple] | None = None):
    """RRC (resized with ``interpolation``, timm's RandomResizedCropAndInterpolation) + flip +
    RandAugment (filling with ``mean`` in 0..255) + normalise, in timm's ``create_transform`` order. -> images float32 [B,3,S,S], ids [B] (+ the ``reader``'s extra
    outputs, as in build_pretrain)."""
    from nvidia.dali import fn

    interp = _interp(interpolation)

    def graph():
        jpegs, ids, *extra = reader() if reader is not None else \
            C.file_reader(fl, shard_id=shard_id, num_shards=num_shards, shuffle_seed=seed)
        img = fn.decoders.image_random_crop(jpegs, random_area=list(scale), random_aspect_ratio=list(ratio),
                                            num_attempts=10, **C.decoder_kwargs(mode))
        img = fn.resize(img, size=[img_size, img_size], interp_type=interp, antialias=True)
        if hflip > 0:  # before RandAugment, as timm: a translate/shear sign is not undone by the flip
            img = fn.flip(img, horizontal=fn.random.coin_flip(probability=hflip))
        if rand_augment is not None:
            img = apply_rand_augment(img, rand_augment, img_size=img_size, fill=timm_fill(mean))
        return (C.normalize_chw(img, mean=mean, std=std), ids, *extra)

    return _build(graph, batch_size=batch_size, num_threads=num_threads, mode=mode,
                  seed=C.rank_seed(seed, shard_id, salt=2), checkpoint=checkpoint, checkpointing=True,
                  conditionals=rand_augment is not None, prefetch_queue_depth=prefetch_queue_depth)


def build_eval(fl: FileList, *, img_size: int, batch_size: int, shard_id: int, num_shards: int, num_threads: int,
               mode: str, scale_size: int, interpolation: str, mean: Sequence[float], std: Sequence[float],
               reader: Callable[[], tuple] | None = None):
    """Resize shorter side to ``scale_size`` (antialiased), centre crop ``img_size``, normalise.

    -> images float32 [B,3,S,S], ids [B]; file-list order within the shard.
    """
    interp = _interp(interpolation)

    def graph():
        jpegs, ids, *extra = reader() if reader is not None else \
            C.file_reader(fl, shard_id=shard_id, num_shards=num_shards, shuffle_seed=None)
        img = C.decode_resize_shorter_center_crop(jpegs, mode, scale_size=scale_size, crop=img_size, interp=interp)
        return (C.normalize_chw(img, mean=mean, std=std), ids, *extra)

    return _build(graph, batch_size=batch_size, num_threads=num_threads, mode=mode, seed=0, checkpoint=None,
                  checkpointing=False)
