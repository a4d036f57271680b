"""Fine-tuning classifier: timm's VisionTransformer with mean pooling + fc_norm + head.

METHOD.md section 5: global average pooling over the patch tokens, a LayerNorm after
the pool (``fc_norm``; timm then makes the final ``norm`` an Identity) and a linear
head. Parameter names are timm's, so a fine-tuned state dict loads with ``strict=True``
into ``timm.create_model(name, pretrained=False, global_pool="avg", num_classes=C, ...)``.

A pre-trained backbone (timm names, or a ``PretrainModel`` state dict with the
``backbone.`` prefix) goes in with :func:`load_backbone_into_classifier`; its final
``norm`` is dropped (the classifier has ``fc_norm`` instead, freshly initialised as in
BEiT/MAE fine-tuning), and so are the pre-training-only ``mask_token`` / ``lm_head``.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn

from mapet_ds.config import ModelConfig
from mapet_ds.interop.release import CheckpointError, convert_mapet_release, first_keys, is_foreign_layout, strip_prefixes
from mapet_ds.models.vit import build_backbone, resample_pos_embed

# The MaPeT release's fine-tuning head init (timm's trunc_normal_ std 0.02; finetune.head_init_std).
# MAE's main_finetune.py uses 2e-5 (near-zero logits at the start): finetune.head_init_std=2e-5.
HEAD_INIT_STD = 0.02

# Keys of a pre-training checkpoint that a classifier never uses.
PRETRAIN_ONLY_PREFIXES = ("mask_token", "lm_head.", "norm.")


def build_classifier(
    model_cfg: ModelConfig, num_classes: int, *, drop_path: Optional[float] = None,
    head_init_std: float = HEAD_INIT_STD,
) -> VisionTransformer:
    """timm VisionTransformer: ``global_pool="avg"``, ``fc_norm``, ``head = Linear(D, num_classes)``.

    ``drop_path`` overrides ``model_cfg.drop_path`` (stochastic depth of the fine-tune);
    the head is initialised with trunc-normal ``head_init_std``.
    Input images [B, C, H, W] -> logits [B, num_classes].
    """
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}: a classifier needs at least one class")
    model = build_backbone(
        model_cfg,
        num_classes=num_classes,
        global_pool="avg",
        fc_norm=None,  # timm: None -> fc_norm on for avg pooling, final norm becomes Identity
        drop_path_rate=model_cfg.drop_path if drop_path is None else drop_path,
    )
    init_head(model, head_init_std)
    return model


def init_head(model: VisionTransformer, std: float = HEAD_INIT_STD) -> None:
    """Re-initialise ``model.head``: weight ~ trunc_normal(std), bias 0."""
    head = model.head
    if isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=std)
        nn.init.zeros_(head.bias)


def layer_decay_param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: Optional[float],
    no_weight_decay_list: Optional[Iterable[str]] = None,
) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (timm ``param_groups_layer_decay``).

    Each group carries ``lr_scale`` = ``layer_decay ** (depth + 1 - layer_id)`` with
    layer_id 0 for the stem (patch_embed, cls_token, pos_embed), i + 1 for ``blocks.i``
    and depth + 1 (scale 1) for ``fc_norm``/``head``; timm's schedulers multiply the lr by
    it. 1-D parameters (biases, norms, layer scales) and ``no_weight_decay_list``
    (default: the model's ``no_weight_decay()``, i.e. pos_embed, cls_token) get
    ``weight_decay = 0``. ``layer_decay=None`` (or 1.0) gives every group scale 1.
    Every group also lists its ``param_names`` (saved with the optimizer state, which
    lets the exporter name fp32 master weights of bf16 ZeRO-0 checkpoints).
    """
    if no_weight_decay_list is None:
        fn = getattr(model, "no_weight_decay", None)
        no_weight_decay_list = set(fn()) if fn is not None else set()
    groups = param_groups_layer_decay(
        model,
        weight_decay=weight_decay,
        no_weight_decay_list=tuple(no_weight_decay_list),
        layer_decay=1.0 if layer_decay is None else layer_decay,
    )
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        g["param_names"] = [names[id(p)] for p in g["params"]]
    return groups


def load_backbone_into_classifier(classifier: VisionTransformer, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Load pre-trained backbone weights into a classifier built by :func:`build_classifier`.

    ``state_dict``: timm names (a backbone export, or a classifier whose ``head.*`` is
    dropped), or a ``PretrainModel`` state dict (``backbone.`` prefix; ``mask_token``,
    ``lm_head.*`` and the final ``norm.*`` are dropped). ``pos_embed`` [1, 1+N_old, D] is
    resampled (timm ``resample_abs_pos_embed``, bicubic) to the classifier's grid.
    Only ``head.*`` and ``fc_norm.*`` may stay missing; anything else missing,
    unexpected or of the wrong shape raises a one-line :class:`CheckpointError`.

    Returns a report: ``{"missing": [...], "dropped": [...], "resampled": [...]}``.
    """
    sd = strip_prefixes(state_dict)
    if is_foreign_layout(sd):  # e.g. the MaPeT release: split q/kv -> timm's fused qkv
        sd = convert_mapet_release(sd)
    if any(k.startswith("backbone.") for k in sd):
        sd = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in sd.items()}
    dropped = sorted(k for k in sd if k.startswith(PRETRAIN_ONLY_PREFIXES) or k.startswith("head."))
    sd = {k: v for k, v in sd.items() if k not in set(dropped)}

    target = classifier.state_dict()
    resampled = []
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        old, new = sd["pos_embed"], target["pos_embed"]
        if old.shape[-1] != new.shape[-1]:
            raise CheckpointError(
                f"pos_embed has width {old.shape[-1]} but the classifier has {new.shape[-1]}: "
                f"the checkpoint is a different model size (check model.size/embed_dim)"
            )
        sd["pos_embed"] = resample_pos_embed(old, classifier)
        resampled.append(f"pos_embed {tuple(old.shape)} -> {tuple(sd['pos_embed'].shape)}")

    unexpected = [k for k in sd if k not in target]
    if unexpected:
        hint = ""
        if any(".ls1." in k or ".ls2." in k for k in unexpected):
            hint = "; the checkpoint has layer scale: set model.layer_scale_init (e.g. 0.1)"
        raise CheckpointError(f"unexpected keys for the classifier: {first_keys(unexpected)}{hint}")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(target[k].shape)}" for k in sd if sd[k].shape != target[k].shape]
    if wrong:
        raise CheckpointError(
            f"shape mismatch (checkpoint vs classifier): {first_keys(wrong, 3)}; build the classifier with the "
            f"pre-training model config (size, patch_size, mlp_ratio)"
        )
    missing = [k for k in target if k not in sd]
    bad_missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if bad_missing:
        hint = ""
        if any(".ls1." in k or ".ls2." in k for k in bad_missing):
            hint = "; the checkpoint has no layer scale: set model.layer_scale_init: null"
        raise CheckpointError(f"checkpoint is missing backbone weights: {first_keys(bad_missing)}{hint}")
    classifier.load_state_dict(sd, strict=False)
    return {"missing": missing, "dropped": dropped, "resampled": resampled}
