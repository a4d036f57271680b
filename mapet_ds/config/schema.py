"""The config schema: one pydantic model per ``RunConfig`` section.

``model``, ``tokenizer``, ``objective``, ``data``, ``optim`` and one section per job
(``pretrain``, ``finetune``, ``segment``, ``linprobe``). Every section rejects unknown
keys; cross-field rules live in each section's validators and in ``RunConfig``.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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

    size: Optional[Literal["tiny", "small", "base", "large"]] = Field(
        "base", description="ViT size preset filling embed_dim, depth, num_heads; null to give them explicitly")
    embed_dim: Optional[int] = Field(None, gt=0, description="token width D (default: from size)")
    depth: Optional[int] = Field(None, gt=0, description="number of transformer blocks (default: from size)")
    num_heads: Optional[int] = Field(None, gt=0, description="attention heads per block (default: from size)")
    patch_size: int = Field(16, gt=0, description="patch side in pixels")
    img_size: int = Field(224, gt=0, description="input side in pixels (must be a multiple of patch_size)")
    in_chans: int = Field(3, gt=0, description="input image channels")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / embed_dim")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth rate (the last block's; linear from 0)")
    layer_scale_init: Optional[float] = Field(
        0.1, gt=0, description="LayerScale init value (timm init_values); null: no layer scale")
    grad_checkpointing: bool = Field(
        False, description="recompute block activations in the backward pass (timm set_grad_checkpointing)")
    # Two-stream (mapet/pet) attention: "sdpa" = one scaled_dot_product_attention call per
    # layer with a dense bool mask [B,1,L,K]; "flex" = FlexAttention with a BlockMask built
    # once per step from the per-row thresholds (compiled on CUDA; on CPU torch has no
    # FlexAttention backward, so CPU training evaluates the same mask_mod densely with sdpa).
    # MIM is single-stream and unmasked: it always uses timm's own attention (sdpa).
    attention: Literal["sdpa", "flex"] = Field(
        "sdpa", description="two-stream attention kernel: sdpa (dense bool mask) or flex (FlexAttention BlockMask)")
    # torch.compile of each transformer block (one compiled graph shared by all blocks)
    compile: bool = Field(False, description="torch.compile each transformer block")

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

    kind: Literal["pixel_kmeans", "kclip", "vqkd", "dvae"] = Field(
        "kclip", description="visual tokenizer: pixel_kmeans / kclip (offline token store) or vqkd / dvae (online)")
    vocab_size: int = Field(8192, gt=1, description="number of visual token classes the model predicts")
    token_store: Optional[str] = Field(None, description="folder of the offline token store (launch/tokens.py assign)")
    codebook: Optional[str] = Field(None, description="k-means codebook file (launch/tokens.py fit); shards pin it")
    weights: Optional[str] = Field(None, description="tokenizer weights file for online vqkd / dvae")
    clip_model: str = Field("RN50x64", description="open_clip model of the k-CLIP feature extractor")
    input_size: Optional[int] = Field(
        None, gt=0, description="tokenizer input side in pixels (default: the tokenizer's own)")
    online: bool = Field(
        False, description="tokenize the augmented view in the step (k-means kinds: with tokenizer.codebook)")
    # sha256 (or a prefix) of the tokenizer spec that shards must carry (their manifest.json)
    fingerprint: Optional[str] = Field(
        None, description="sha256 (or prefix) of the tokenizer spec that shards must carry")

    pixel_norm: Optional[Literal["patch", "channel", "luma"]] = Field(
        None, description="pixel k-means only: the normalisation the token store must be made with (null: not checked)")

    @property
    def offline(self) -> bool:
        """Targets read from a token store (k-means kinds unless ``online``), not made per step."""
        return not self.online and self.kind not in ("vqkd", "dvae")

    @field_validator("vocab_size")
    @classmethod
    def _vocab(cls, v: int) -> int:
        if v > INT16_MAX:
            raise ValueError(f"must be <= {INT16_MAX}: token stores hold int16 ids")
        return v


class ObjectiveConfig(_Section):
    """Pre-training objective: mapet (METHOD.md 2), pet or mim (METHOD.md 3)."""

    name: Literal["mapet", "pet", "mim"] = Field(
        "mapet", description="pre-training objective: mapet, pet (permuted) or mim (BEiT masking)")
    predicted_ratio: float = Field(
        0.75, gt=0, lt=1, description="mapet/pet: fraction of patches predicted (m = round(ratio * N))")
    mask_patches: int = Field(75, gt=0, description="mim: number of masked patches per image")
    min_block_patches: int = Field(16, gt=0, description="mim: smallest block of the BEiT block-wise mask")
    max_block_patches: Optional[int] = Field(
        None, gt=0, description="mim: largest block of the block-wise mask (null: no limit)")
    min_aspect: float = Field(
        0.3, gt=0, le=1, description="mim: smallest block aspect ratio (the largest is its inverse)")

    def num_predicted(self, num_patches: int) -> int:
        """m for mapet/pet; masked count for mim."""
        if self.name == "mim":
            return self.mask_patches
        return int(round(self.predicted_ratio * num_patches))


class DataConfig(_Section):
    """File lists (see mapet_ds.filelist) and augmentation of the DALI pipelines."""

    train_list: Optional[str] = Field(None, description="training file list (data/make_filelist.py)")
    val_list: Optional[str] = Field(None, description="validation file list")
    root: Optional[str] = Field(None, description="image root of the lists (default: each list's folder)")
    num_threads: int = Field(4, gt=0, description="DALI CPU threads per process")
    decode: Literal["auto", "cpu", "mixed"] = Field(
        "auto", description="JPEG decoding: auto (GPU when available), cpu or mixed (nvJPEG)")
    # pre-training: torchvision ColorJitter(x, x, x) factors (contrast about the image mean);
    # applied in a fixed order (torchvision's is random: only clipping between steps differs)
    color_jitter: float = Field(
        0.4, ge=0, description="pre-training colour jitter strength (brightness, contrast, saturation)")
    # pre-training: one RRC + flip shared by the ViT and tokenizer views; online tokenization only
    # (an offline token store holds the centre-square view's tokens; refused with those)
    random_resized_crop: bool = Field(
        False, description="pre-training random resized crop + flip (online tokenization only)")
    mean: tuple[float, float, float] = Field(
        IMAGENET_DEFAULT_MEAN, description="normalisation mean (RGB, 0..1); also RandAugment's fill colour")
    std: tuple[float, float, float] = Field(IMAGENET_DEFAULT_STD, description="normalisation std (RGB, 0..1)")
    crop_pct: float = Field(
        224 / 248, gt=0, le=1, description="eval view: centre crop fraction (shorter side -> img_size / crop_pct)")
    # resize kernel of the eval view and of the fine-tune random resized crop (timm: bicubic)
    interpolation: Literal["bicubic", "bilinear"] = Field(
        "bicubic", description="resize kernel of the eval view and the fine-tune random resized crop")
    rand_augment: Optional[str] = Field(
        "rand-m9-mstd0.5", description="fine-tune timm RandAugment string (e.g. rand-m9-mstd0.5); null: none")
    scale: tuple[float, float] = Field((0.08, 1.0), description="fine-tune random resized crop area range")
    hflip: float = Field(0.5, ge=0, le=1, description="fine-tune horizontal flip probability")
    # random tensors on the device instead of DALI + token store (throughput / MFU checks)
    synthetic: bool = Field(False, description="random tensors instead of images and tokens (throughput checks)")
    synthetic_samples: int = Field(10000, gt=0, description="samples per synthetic epoch")
    # batches DALI prepares ahead of the training step (its prefetch_queue_depth)
    prefetch_queue_depth: int = Field(2, gt=0, description="batches DALI prepares ahead of the training step")
    # webdataset shard folders (data/make_shards.py) instead of train_list / val_list
    train_shards: Optional[str] = Field(
        None, description="training webdataset shard folder (data/make_shards.py) instead of train_list")
    val_shards: Optional[str] = Field(None, description="validation shard folder instead of val_list")

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

    lr: float = Field(1.5e-3, gt=0, description="peak learning rate (after warmup)")
    min_lr: float = Field(1e-5, ge=0, description="final learning rate of the cosine schedule")
    warmup_lr: float = Field(1e-6, ge=0, description="learning rate at step 0 of the warmup")
    warmup_epochs: float = Field(10, ge=0, description="linear warmup length in epochs")
    warmup_steps: Optional[int] = Field(
        None, ge=0, description="warmup length in optimizer steps (overrides warmup_epochs)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on 1-D params, pos_embed, cls_token)")
    weight_decay_end: Optional[float] = Field(
        None, ge=0, description="final weight decay of a cosine weight-decay schedule (null: constant)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    clip_grad: Optional[float] = Field(3.0, gt=0, description="gradient norm clip (null: none)")
    layer_decay: Optional[float] = Field(
        None, gt=0, le=1, description="layer-wise lr decay factor (fine-tuning; null: none)")
    decay_mask_token: bool = Field(True, description="weight-decay the pre-training mask_token as the release does "
                                   "(false: exempt it, as BEiT and earlier mapet_ds)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must be in [0, 1), got {list(v)}")
        return v


class TrainConfig(_Section):
    """Loop settings shared by pre-training and fine-tuning."""

    epochs: float = Field(300, gt=0, description="training length in epochs")
    max_steps: Optional[int] = Field(
        None, gt=0, description="stop after this many optimizer steps (overrides epochs for the schedule)")
    global_batch_size: int = Field(2048, gt=0, description="images per optimizer step over all ranks")
    micro_batch_size: Optional[int] = Field(
        None, gt=0, description="images per rank per forward (default: global / (world * grad_accum))")
    grad_accum: Optional[int] = Field(
        None, gt=0, description="micro-batches per optimizer step (default: from the batch sizes)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto (bf16 on GPUs that have it, else fp32), bf16, fp16 or fp32")
    output_dir: str = Field("runs/run", description="run folder: checkpoints, metrics, config.yaml")
    log_every: int = Field(20, gt=0, description="log metrics every this many steps")
    save_every: int = Field(1000, gt=0, description="checkpoint every this many steps")
    keep_last: int = Field(2, gt=0, description="complete checkpoints kept")
    resume: str = Field(
        "auto", description="auto (newest complete checkpoint of output_dir), none, or a checkpoint path")
    max_nonfinite: int = Field(5, gt=0, description="consecutive non-finite losses before the run stops")
    seed: int = Field(0, description="seed of data order, augmentation and masks")
    peak_tflops: Optional[float] = Field(None, gt=0, description="accelerator peak TFLOP/s for MFU (default: detected)")
    vis_every: Optional[int] = Field(
        None, gt=0, description="write prediction pictures every this many steps (null: never)")


class PretrainConfig(TrainConfig):
    output_dir: str = Field("runs/pretrain", description="pre-training run folder: checkpoints, metrics, config.yaml")


class FinetuneConfig(TrainConfig):
    output_dir: str = Field(
        "runs/finetune", description="fine-tuning run folder: checkpoints, best.pt, metrics, config.yaml")
    epochs: float = Field(100, gt=0, description="fine-tuning length in epochs")
    global_batch_size: int = Field(512, gt=0, description="images per optimizer step over all ranks")
    init: Optional[str] = Field(
        None, description="pre-trained weights: run dir, tag, exported file or the authors' release (null: none)")
    num_classes: Optional[int] = Field(None, gt=1, description="classes of the head (default: from the train list)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the cross-entropy (without mixup)")
    mixup: float = Field(0.8, ge=0, description="Mixup alpha (0: off)")
    cutmix: float = Field(1.0, ge=0, description="CutMix alpha (0: off)")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="probability of applying Mixup/CutMix to a batch")
    mixup_switch_prob: float = Field(
        0.5, ge=0, le=1, description="probability of CutMix instead of Mixup when both are on")
    reprob: float = Field(0.25, ge=0, le=1, description="random erasing probability")
    ema_decay: Optional[float] = Field(
        None, gt=0, lt=1, description="EMA of the weights, evaluated alongside (null: off)")
    eval_every: int = Field(1, gt=0, description="evaluate every this many epochs")
    head_init_std: float = Field(0.02, gt=0, description="trunc-normal std of the new classifier head (release 0.02; "
                                 "MAE 2e-5)")


class SegmentConfig(TrainConfig):
    """Semantic segmentation (UperNet on the ViT, BEiT's ADE20K protocol; launch/segment.py)."""

    output_dir: str = Field(
        "runs/segment", description="segmentation run folder: checkpoints, iou_table.tsv, seg_overlay.png, config.yaml")
    epochs: float = Field(1000, gt=0, description="length in epochs when max_steps is null")
    max_steps: Optional[int] = Field(160000, gt=0, description="optimizer steps (BEiT: 160k at batch 16)")
    global_batch_size: int = Field(16, gt=0, description="images per optimizer step over all ranks")
    init: Optional[str] = Field(None, description="pre-training run | fine-tuned run | exported/timm | release checkpoint")
    num_classes: int = Field(150, gt=1, description="classes after reduce_zero_label (ADE20K: 150)")
    reduce_zero_label: bool = Field(True, description="ADE convention: mask 0 = ignore, 1..K -> 0..K-1")
    ignore_index: int = Field(255, ge=0, le=255, description="mask value excluded from loss and metrics")
    class_names: Optional[str] = Field(None, description="text file, one class name per line (legend, IoU table)")
    crop_size: int = Field(512, gt=0, description="square training crop / sliding window side, px")
    img_scale: tuple[int, int] = Field((2048, 512), description="(long, short) bound the random rescale multiplies")
    ratio_range: tuple[float, float] = Field((0.5, 2.0), description="random rescale factor range of img_scale")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability")
    photometric: bool = Field(True, description="mmseg PhotoMetricDistortion on the image (not the mask)")
    cat_max_ratio: float = Field(
        0.75, gt=0, le=1, description="mmseg RandomCrop: re-draw the crop (up to 10 times) while one class covers "
                                      ">= this share of its non-ignored pixels (counted on a 32x32 grid of the "
                                      "crop); 1.0 = off, one uniform draw")
    out_indices: tuple[int, ...] = Field((3, 5, 7, 11), description="0-based blocks feeding the 4 pyramid levels")
    decoder_channels: int = Field(768, gt=0, description="UperNet channels (BEiT: 768 for every size)")
    aux_channels: int = Field(256, gt=0, description="auxiliary FCN head channels")
    aux_weight: float = Field(0.4, ge=0, description="loss weight of the auxiliary FCN head")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the classifier convs")
    eval_every: int = Field(16000, gt=0, description="evaluate every N optimizer steps (and at the end)")
    eval_stride: int = Field(341, gt=0, description="sliding-window stride, px (BEiT: 341 at 512)")
    eval_flip: bool = Field(False, description="average logits with the flipped image")
    eval_scales: tuple[float, ...] = Field((1.0,), description="multi-scale test ratios of img_scale (mmseg aug test)")
    vis_images: int = Field(4, ge=0, description="validation images in the overlay picture")

    @model_validator(mode="after")
    def _check_segment(self) -> "SegmentConfig":
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range={list(self.ratio_range)}: need 0 < lo <= hi")
        if len(self.out_indices) != 4 or list(self.out_indices) != sorted(self.out_indices) or min(self.out_indices) < 0:
            raise ValueError(f"out_indices={list(self.out_indices)}: need 4 non-decreasing block indices >= 0")
        if self.eval_stride > self.crop_size:
            raise ValueError(f"eval_stride={self.eval_stride} > crop_size={self.crop_size}: windows would skip pixels")
        if self.ignore_index < self.num_classes:
            raise ValueError(f"ignore_index={self.ignore_index} is a class id (num_classes={self.num_classes})")
        return self


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
        "cls", description="features: the [CLS] token after the final norm (MAE's protocol; k-NN's default too) or "
                           "the mean of the patch tokens (BEiT's)")
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
    model: ModelConfig = Field(default_factory=ModelConfig, description="ViT backbone")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="visual tokenizer of the targets")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="pre-training objective")
    data: DataConfig = Field(default_factory=DataConfig, description="file lists, shards and augmentation")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="AdamW and schedules")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="pre-training loop")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="fine-tuning loop")
    segment: SegmentConfig = Field(default_factory=SegmentConfig, description="semantic segmentation job")
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
        if self.data.random_resized_crop and self.tokenizer.offline:
            raise ValueError(
                f"data.random_resized_crop=true with the offline tokenizer.kind={self.tokenizer.kind!r}: its token "
                f"store holds the tokens of the centre-square view, so a random crop would train every patch on "
                f"another patch's target; set data.random_resized_crop=false, or tokenize online "
                f"(tokenizer.online=true, or vqkd/dvae)"
            )
        m = obj.num_predicted(n)
        if obj.name != "mim" and not 1 <= m < n:
            raise ValueError(
                f"objective.predicted_ratio={obj.predicted_ratio} predicts {m} of {n} patches; "
                f"it must leave at least one patch on each side"
            )
        return self
