"""DALI data pipelines: tokenizer view, pre-training, fine-tune train, eval.

One code path: "mixed" (GPU) decoding when torch sees a CUDA device, DALI's CPU mode
(``device_id=None``) otherwise. Sample id = line index of the file list
(mapet_ds.filelist); every batch carries the sample ids it holds.
"""

from mapet_ds.filelist import FileListError
from mapet_ds.pipelines.common import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PipelineRunError, resolve_device
from mapet_ds.pipelines.loaders import (
    EvalLoader,
    TokenizerViewLoader,
    TrainLoader,
    eval_loader,
    finetune_train_loader,
    pretrain_loader,
    tokenizer_view_loader,
)
from mapet_ds.pipelines.randaugment import RandAugmentSpec, parse_rand_augment

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "PipelineRunError",
    "EvalLoader",
    "FileListError",
    "RandAugmentSpec",
    "TokenizerViewLoader",
    "TrainLoader",
    "eval_loader",
    "finetune_train_loader",
    "parse_rand_augment",
    "pretrain_loader",
    "resolve_device",
    "tokenizer_view_loader",
]
