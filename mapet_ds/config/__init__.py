"""Typed run configuration: YAML recipes + dotted command-line overrides.

One ``RunConfig`` describes a job: ``model``, ``tokenizer``, ``objective``, ``data``,
``optim`` and the job's own section (``pretrain``, ``finetune``, ``segment``, ``linprobe``).
Every section rejects unknown keys, and every invalid value fails with a one-line
``ConfigError`` naming the field, the value and what is allowed::

    cfg = load_config("launch/recipes/demo_pretrain.yaml", ["model.drop_path=0.2"])
    save_config(cfg, run_dir / "config.yaml")     # fully resolved, reloads identically

``schema.py`` holds the sections, ``loading.py`` recipes, overrides, errors and
``--print-config``, ``reference.py`` the generated field reference (docs/CONFIG.md).
"""

from mapet_ds.config.loading import (PRINT_CONFIG_HELP, ConfigArgumentParser, apply_overrides, config_from_dict,
                                     config_to_dict, config_yaml, format_validation_error, load_config, save_config)
from mapet_ds.config.reference import REFERENCE_COMMAND, config_reference
from mapet_ds.config.schema import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, INT16_MAX, MODEL_SIZES, ConfigError,
                                    DataConfig, FinetuneConfig, LinprobeConfig, ModelConfig, ObjectiveConfig,
                                    OptimConfig, PretrainConfig, RunConfig, SegmentConfig, TokenizerConfig,
                                    TrainConfig)

__all__ = [
    "ConfigArgumentParser", "ConfigError", "DataConfig", "FinetuneConfig", "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD", "INT16_MAX", "LinprobeConfig", "MODEL_SIZES", "ModelConfig", "ObjectiveConfig",
    "OptimConfig", "PRINT_CONFIG_HELP", "PretrainConfig", "REFERENCE_COMMAND", "RunConfig", "SegmentConfig",
    "TokenizerConfig", "TrainConfig", "apply_overrides", "config_from_dict", "config_reference", "config_to_dict",
    "config_yaml", "format_validation_error", "load_config", "save_config",
]
