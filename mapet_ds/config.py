"""Typed run configuration: YAML recipes + dotted command-line overrides.

One ``RunConfig`` describes a job: ``model``, ``tokenizer``, ``objective``, ``data``,
``optim``, ``pretrain``, ``finetune`` and ``linprobe`` sections. Every section rejects unknown keys,
and every invalid value fails with a one-line ``ConfigError`` naming the field, the
value and what is allowed::

    cfg = load_config("launch/recipes/demo_pretrain.yaml", ["model.drop_path=0.2"])
    save_config(cfg, run_dir / "config.yaml")     # fully resolved, reloads identically
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

INT16_MAX = 32767
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# (embed_dim, depth, num_heads): METHOD.md section 5, plus ViT-L.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line and names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    """ViT backbone. ``size`` fills embed_dim/depth/num_heads unless given explicitly."""

    size: Optional[Literal["tiny", "small", "base", "large"]] = "base"
    embed_dim: Optional[int] = Field(None, gt=0)
    depth: Optional[int] = Field(None, gt=0)
    num_heads: Optional[int] = Field(None, gt=0)
    patch_size: int = Field(16, gt=0)
    img_size: int = Field(224, gt=0)
    in_chans: int = Field(3, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    drop_path: float = Field(0.1, ge=0, lt=1)
    layer_scale_init: Optional[float] = Field(0.1, gt=0)
    grad_checkpointing: bool = False
    # Two-stream (mapet/pet) attention: "sdpa" = one scaled_dot_product_attention call per
    # layer with a dense bool mask [B,1,L,K]; "flex" = FlexAttention with a BlockMask built
    # once per step from the per-row thresholds (compiled on CUDA; on CPU torch has no
    # FlexAttention backward, so CPU training evaluates the same mask_mod densely with sdpa).
    # MIM is single-stream and unmasked: it always uses timm's own attention (sdpa).
    attention: Literal["sdpa", "flex"] = "sdpa"
    # torch.compile of each transformer block (one compiled graph shared by all blocks)
    compile: bool = False

    @model_validator(mode="after")
    def _resolve(self) -> "ModelConfig":
        if self.size is not None:
            dim, depth, heads = MODEL_SIZES[self.size]
            # assignment would re-run this validator; write the resolved values directly
            for name, val in (("embed_dim", dim), ("depth", depth), ("num_heads", heads)):
                if getattr(self, name) is None:
                    self.__dict__[name] = val
        missing = [n for n in ("embed_dim", "depth", "num_heads") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"set model.size or all of embed_dim/depth/num_heads (missing: {', '.join(missing)})")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}"
            )
        return self

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


class TokenizerConfig(_Section):
    """Visual tokenizer producing the targets (METHOD.md section 4).

    Offline tokenizers (k-means kinds) are read from ``token_store``; ``vqkd``/``dvae``
    (or ``online: true``) run in the training step on the augmented view.
    """

    kind: Literal["pixel_kmeans", "kclip", "vqkd", "dvae"] = "kclip"
    vocab_size: int = Field(8192, gt=1)
    token_store: Optional[str] = None
    codebook: Optional[str] = None
    weights: Optional[str] = None
    clip_model: str = "RN50x64"
    input_size: Optional[int] = Field(None, gt=0)
    online: bool = False
    # sha256 (or a prefix) of the tokenizer spec that shards must carry (their manifest.json)
    fingerprint: Optional[str] = None
    pixel_norm: Optional[Literal["patch", "channel", "luma"]] = Field(
        None, description="pixel k-means only: the normalisation the token store must be made with (null: not checked)")

    @field_validator("vocab_size")
    @classmethod
    def _vocab(cls, v: int) -> int:
        if v > INT16_MAX:
            raise ValueError(f"must be <= {INT16_MAX}: token stores hold int16 ids")
        return v


class ObjectiveConfig(_Section):
    """Pre-training objective: mapet (METHOD.md 2), pet or mim (METHOD.md 3)."""

    name: Literal["mapet", "pet", "mim"] = "mapet"
    predicted_ratio: float = Field(0.75, gt=0, lt=1)
    mask_patches: int = Field(75, gt=0)
    min_block_patches: int = Field(16, gt=0)
    max_block_patches: Optional[int] = Field(None, gt=0)
    min_aspect: float = Field(0.3, gt=0, le=1)

    def num_predicted(self, num_patches: int) -> int:
        """m for mapet/pet; masked count for mim."""
        if self.name == "mim":
            return self.mask_patches
        return int(round(self.predicted_ratio * num_patches))


class DataConfig(_Section):
    """File lists (see mapet_ds.filelist) and augmentation of the DALI pipelines."""

    train_list: Optional[str] = None
    val_list: Optional[str] = None
    root: Optional[str] = None
    num_threads: int = Field(4, gt=0)
    decode: Literal["auto", "cpu", "mixed"] = "auto"
    # pre-training: torchvision ColorJitter(x, x, x) factors (contrast about the image mean);
    # applied in a fixed order (torchvision's is random: only clipping between steps differs)
    color_jitter: float = Field(0.4, ge=0)
    # pre-training: one RRC + flip shared by the ViT and tokenizer views; online tokenizers only
    # (an offline token store holds the centre-square view's tokens; refused with those)
    random_resized_crop: bool = False
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    crop_pct: float = Field(224 / 248, gt=0, le=1)
    # resize kernel of the eval view and of the fine-tune random resized crop (timm: bicubic)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    rand_augment: Optional[str] = "rand-m9-mstd0.5"
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = Field(0.5, ge=0, le=1)
    # random tensors on the device instead of DALI + token store (throughput / MFU checks)
    synthetic: bool = False
    synthetic_samples: int = Field(10000, gt=0)
    # batches DALI prepares ahead of the training step (its prefetch_queue_depth)
    prefetch_queue_depth: int = Field(2, gt=0)
    # webdataset shard folders (data/make_shards.py) instead of train_list / val_list
    train_shards: Optional[str] = None
    val_shards: Optional[str] = None

    @model_validator(mode="after")
    def _lists_or_shards(self) -> "DataConfig":
        for split in ("train", "val"):
            if getattr(self, f"{split}_list") is not None and getattr(self, f"{split}_shards") is not None:
                raise ValueError(f"set data.{split}_list or data.{split}_shards, not both "
                                 f"(add data.{split}_list=null to read the shards)")
        return self

    @field_validator("std")
    @classmethod
    def _std_pos(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError(f"std values must be > 0, got {list(v)}")
        return v


class OptimConfig(_Section):
    """AdamW with per-step warmup + cosine schedule (timm scheduler semantics)."""

    lr: float = Field(1.5e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(10, ge=0)
    warmup_steps: Optional[int] = Field(None, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    weight_decay_end: Optional[float] = Field(None, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    clip_grad: Optional[float] = Field(3.0, gt=0)
    layer_decay: Optional[float] = Field(None, gt=0, le=1)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must be in [0, 1), got {list(v)}")
        return v


class TrainConfig(_Section):
    """Loop settings shared by pre-training and fine-tuning."""

    epochs: float = Field(300, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    global_batch_size: int = Field(2048, gt=0)
    micro_batch_size: Optional[int] = Field(None, gt=0)
    grad_accum: Optional[int] = Field(None, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    output_dir: str = "runs/run"
    log_every: int = Field(20, gt=0)
    save_every: int = Field(1000, gt=0)
    keep_last: int = Field(2, gt=0)
    resume: str = "auto"
    max_nonfinite: int = Field(5, gt=0)
    seed: int = 0
    peak_tflops: Optional[float] = Field(None, gt=0)
    vis_every: Optional[int] = Field(None, gt=0)


class PretrainConfig(TrainConfig):
    output_dir: str = "runs/pretrain"


class FinetuneConfig(TrainConfig):
    output_dir: str = "runs/finetune"
    epochs: float = Field(100, gt=0)
    global_batch_size: int = Field(512, gt=0)
    init: Optional[str] = None
    num_classes: Optional[int] = Field(None, gt=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.8, ge=0)
    cutmix: float = Field(1.0, ge=0)
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    reprob: float = Field(0.25, ge=0, le=1)
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)
    eval_every: int = Field(1, gt=0)


class LinprobeConfig(TrainConfig):
    """Linear probing (MAE's protocol): frozen backbone, BatchNorm (no affine) + Linear head, LARS."""

    output_dir: str = Field("runs/linprobe", description="run dir: checkpoints, tb/, metrics.jsonl, summary.json")
    epochs: float = Field(90, gt=0, description="training epochs (MAE: 90; 10 of them warmup via optim.warmup_epochs)")
    global_batch_size: int = Field(16384, gt=0, description="images per optimizer step over all ranks (MAE: 16384)")
    precision: Literal["fp32"] = Field(
        "fp32", description="the head trains in fp32 (tiny; DeepSpeed's bf16 optimizer would flatten it and break "
                            "LARS' per-tensor trust ratio); the backbone's dtype is linprobe.backbone_dtype")
    init: Optional[str] = Field(
        None, description="backbone: pre-training run dir | fine-tuned run | exported/timm/release checkpoint | random")
    pool: Literal["cls", "mean"] = Field(
        "mean", description="features: mean of the patch tokens (BEiT, our k-NN and fine-tuning) or the [CLS] "
                            "token (MAE's linprobe default)")
    blr: float = Field(0.1, gt=0, description="base lr: lr = blr x global_batch_size / 256 (MAE: 0.1)")
    lr: Optional[float] = Field(None, gt=0, description="absolute lr; overrides blr when set")
    momentum: float = Field(0.9, ge=0, lt=1, description="LARS momentum (MAE: 0.9)")
    weight_decay: float = Field(0.0, ge=0, description="LARS weight decay of the Linear weight (MAE: 0)")
    num_classes: Optional[int] = Field(None, gt=1, description="classes (default: from the file lists)")
    eval_every: int = Field(1, gt=0, description="evaluate every N epochs (and at the end)")
    cache_features: bool = Field(
        False, description="extract eval-view features once, train the head on them (no augmentation; fast)")
    backbone_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="autocast dtype of the frozen backbone's forward (auto: bf16 on GPUs that have it)")


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    linprobe: LinprobeConfig = Field(default_factory=LinprobeConfig,
                                     description="linear probing job (launch/linprobe.py)")

    @model_validator(mode="after")
    def _cross_check(self) -> "RunConfig":
        n = self.model.num_patches
        obj = self.objective
        if obj.name == "mim" and obj.mask_patches >= n:
            raise ValueError(
                f"objective.mask_patches={obj.mask_patches} must be < the {n} patches of "
                f"model.img_size={self.model.img_size}/patch_size={self.model.patch_size}"
            )
        if obj.name == "mim" and obj.min_block_patches > obj.mask_patches:
            raise ValueError(
                f"objective.min_block_patches={obj.min_block_patches} exceeds mask_patches={obj.mask_patches}"
            )
        if self.data.random_resized_crop and self.tokenizer.kind not in ("vqkd", "dvae"):
            raise ValueError(
                f"data.random_resized_crop=true with the offline tokenizer.kind={self.tokenizer.kind!r}: its token "
                f"store holds the tokens of the centre-square view, so a random crop would train every patch on "
                f"another patch's target; set data.random_resized_crop=false, or use an online tokenizer (vqkd, dvae)"
            )
        m = obj.num_predicted(n)
        if obj.name != "mim" and not 1 <= m < n:
            raise ValueError(
                f"objective.predicted_ratio={obj.predicted_ratio} predicts {m} of {n} patches; "
                f"it must leave at least one patch on each side"
            )
        return self


# ---------------------------------------------------------------------------------------
# Loading, overrides, errors


def _loc(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def _get(data: Any, loc: Sequence[Any]) -> Any:
    for p in loc:
        if isinstance(data, dict) and p in data:
            data = data[p]
        elif isinstance(data, (list, tuple)) and isinstance(p, int) and p < len(data):
            data = data[p]
        else:
            return None
    return data


def format_validation_error(err: ValidationError, data: Any, source: str = "config") -> str:
    """One line per problem: ``<source>: <field>=<value>: <what is allowed>``."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        field = _loc(loc)
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            section = _loc(loc[:-1])
            model: Any = RunConfig
            for p in loc[:-1]:
                model = model.model_fields[p].annotation
            allowed = ", ".join(model.model_fields)
            lines.append(
                f"{source}: unknown key '{field}'"
                + (f" in section '{section}'" if section else "")
                + f" (allowed: {allowed})"
            )
            continue
        if e["type"] == "literal_error":
            msg = "must be one of " + msg.split("Input should be ", 1)[-1]
        value = e.get("input") if loc and e["type"] != "missing" else None
        if field:
            shown = _get(data, loc) if value is None else value
            if isinstance(shown, dict):
                lines.append(f"{source}: {field}: {msg}")
            else:
                lines.append(f"{source}: {field}={shown!r}: {msg}")
        else:
            lines.append(f"{source}: {msg}")
    return "; ".join(lines)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected 'section.key=value', e.g. model.drop_path=0.2")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: key must be 'section.key', e.g. optim.lr=1e-3")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return data


def config_from_dict(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, data, source)) from None


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe; ``_base_: other.yaml`` (relative to this file) is merged underneath."""
    if not p.is_file():
        where = f" (named by _base_ in {seen[-1]})" if seen else ""
        raise ConfigError(f"config file {p} does not exist{where} (see launch/recipes/ for recipes)")
    if p.resolve() in seen:
        raise ConfigError(f"{p}: _base_ chain loops back to itself")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections (model:, data:, ...)")
    base = data.pop("_base_", None)
    if base is not None:
        data = _deep_merge(_read_yaml(p.parent / base, seen + (p.resolve(),)), data)
    return data


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML recipe (or defaults when None), apply dotted overrides, validate."""
    data: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
    data = apply_overrides(data, overrides)
    return config_from_dict(data, source)


def config_to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the fully resolved config as YAML (atomically); load_config reads it back equal."""
    from mapet_ds.safe_io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
