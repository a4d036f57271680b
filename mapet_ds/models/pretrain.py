"""Pre-training model: ViT backbone + objective + visual-token head.

One module runs the three objectives on the same backbone so that a comparison
changes nothing but the objective:

- ``mapet``: two streams; content = real patches + auxiliary position tokens a_p,
  query stream starts from a_p (METHOD.md 2).
- ``pet``:   two streams without the a_p tokens in the content stream.
- ``mim``:   BEiT; masked patch embeddings replaced by ``mask_token``, one stream.

``mask_token`` is the one learned vector of METHOD.md (a_p = mask_token + pos_embed[p]
for mapet/pet, the [MASK] embedding for mim).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from mapet_ds.config import ModelConfig, ObjectiveConfig
from mapet_ds.models.objectives import Plan, attention_mask, sample_plan
from mapet_ds.models.two_stream import TwoStreamMask, additive_mask, build_block_mask, flex_trains_on, two_stream_attention
from mapet_ds.models.vit import build_backbone


class PretrainModel(nn.Module):
    """images [B,3,H,W] + target tokens [B,N] + plan -> loss, token accuracy, logits [B,m,V]."""

    def __init__(self, model_cfg: ModelConfig, objective_cfg: ObjectiveConfig, vocab_size: int):
        super().__init__()
        self.model_cfg = model_cfg
        self.objective_cfg = objective_cfg
        self.objective = objective_cfg.name
        self.vocab_size = vocab_size
        self.backbone = build_backbone(model_cfg)
        self.backbone.set_grad_checkpointing(False)  # we checkpoint our own block loop
        self.grad_checkpointing = model_cfg.grad_checkpointing
        # regional compilation: one graph for the block function, reused by every block
        # (dynamo treats the block's parameters as inputs), so compile time does not grow
        # with depth and the DeepSpeed engine still sees a plain nn.Module. Nothing that
        # differs between blocks may be a Python constant in it: the drop-path rates are
        # (timm's DropPath.drop_prob, a float per block), so the draws are made outside
        # and passed in as tensors (``_drop_path_scales``)
        self._apply_block = torch.compile(_apply_block, dynamic=False) if model_cfg.compile else _apply_block
        d = model_cfg.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.lm_head = nn.Linear(d, vocab_size)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    @property
    def grid(self) -> int:
        return self.model_cfg.grid

    @property
    def num_predicted(self) -> int:
        return self.objective_cfg.num_predicted(self.model_cfg.num_patches)

    def no_weight_decay(self) -> set[str]:
        """The backbone's (pos_embed, cls_token). ``mask_token`` decays, as in the release (its list
        names only pos_embed, cls_token, dist_token); ``optim.decay_mask_token=false`` adds it."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def sample_plan(
        self, batch_size: int, device: torch.device | str, generator: Optional[torch.Generator] = None
    ) -> Plan:
        o = self.objective_cfg
        return sample_plan(
            self.objective, batch_size, self.grid, self.num_predicted,
            min_block=o.min_block_patches, max_block=o.max_block_patches, min_aspect=o.min_aspect,
            device=device, generator=generator,
        )

    def embed(self, images: torch.Tensor, masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images [B,3,H,W], masked bool [B,N] or None -> tokens [B, 1+N, D] with positions."""
        bb = self.backbone
        x = bb.patch_embed(images)  # [B, N, D]
        if masked is not None:
            x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([bb.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return bb.pos_drop(x + bb.pos_embed)

    def _drop_path_scales(self, z: torch.Tensor) -> list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """Per block, the two per-sample residual scales [B,1,1] of timm's DropPath (0 or 1/keep).

        The same draws, in the same order, as timm's ``drop_path`` makes in an eager
        ``Block.forward`` (in z's dtype; timm's is the branch output's, the same one without
        autocast). Blocks without drop path get ones (not None) while any block has one, so
        every block calls the compiled function with the same argument kinds.
        All None in eval mode or with model.drop_path=0.
        """
        blocks = self.backbone.blocks
        probs = [(getattr(b.drop_path1, "drop_prob", 0.0), getattr(b.drop_path2, "drop_prob", 0.0)) for b in blocks]
        if not self.training or not any(p > 0 for pair in probs for p in pair):
            return [(None, None)] * len(blocks)
        shape = (z.shape[0],) + (1,) * (z.ndim - 1)

        def draw(dp: nn.Module, p: float) -> torch.Tensor:
            if p <= 0:
                return z.new_ones(shape)  # a fresh tensor: one aliased pair would be another graph
            keep = 1.0 - p
            scale = z.new_empty(shape).bernoulli_(keep)
            return scale.div_(keep) if keep > 0 and getattr(dp, "scale_by_keep", True) else scale

        return [(draw(b.drop_path1, p1), draw(b.drop_path2, p2)) for b, (p1, p2) in zip(blocks, probs)]

    def _run_blocks(self, z: torch.Tensor, num_keys: Optional[int], mask: Optional[TwoStreamMask]) -> torch.Tensor:
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk, (keep1, keep2) in zip(self.backbone.blocks, self._drop_path_scales(z)):
            z = self._apply_block(blk, z, num_keys, mask, ckpt, keep1, keep2)
        return z

    def two_stream_mask(self, plan: Plan, dtype: torch.dtype = torch.float32) -> TwoStreamMask:
        """The step's mask, shared by all layers: additive [B,1,L,K] in ``dtype`` (the compute
        dtype; sdpa, see ``additive_mask``) or a BlockMask (flex)."""
        if self.model_cfg.attention == "sdpa":
            return additive_mask(attention_mask(plan), dtype)
        dense = torch.is_grad_enabled() and not flex_trains_on(plan.predicted.device)
        if dense:
            warnings.warn("model.attention=flex: torch has no FlexAttention backward on the CPU; this step "
                          "evaluates the same mask_mod densely with sdpa", stacklevel=2)
            return additive_mask(build_block_mask(plan, dense=True), dtype)
        return build_block_mask(plan)

    def forward_features(self, images: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Final-normed features at the predicted positions: [B, m, D]."""
        m = plan.num_predicted
        if plan.kind == "mim":
            b, n = images.shape[0], self.model_cfg.num_patches
            masked = torch.zeros(b, n, dtype=torch.bool, device=images.device)
            masked.scatter_(1, plan.predicted, True)
            z = self._run_blocks(self.embed(images, masked), None, None)
            out = z[:, 1:].gather(1, plan.predicted.unsqueeze(-1).expand(-1, -1, z.shape[-1]))
            return self.backbone.norm(out)
        x = self.embed(images)  # [B, 1+N, D]
        pos = self.backbone.pos_embed[0, 1:]  # [N, D]
        aux = self.mask_token.to(x.dtype) + pos[plan.predicted]  # [B, m, D]
        if plan.kind == "mapet":
            z = torch.cat([x, aux, aux], dim=1)  # content [x; a_P], query [a_P]
        elif plan.kind == "pet":
            z = torch.cat([x, aux], dim=1)  # content [x], query [a_P]
        else:
            raise ValueError(f"unknown objective {plan.kind!r}")
        num_keys = z.shape[1] - m
        dev = z.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else z.dtype
        z = self._run_blocks(z, num_keys, self.two_stream_mask(plan, dtype))
        return self.backbone.norm(z[:, num_keys:])

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, plan: Plan) -> dict[str, torch.Tensor]:
        """images [B,3,H,W]; tokens int [B,N] visual token ids; plan for this batch.

        Returns loss (mean CE over B*m), acc (token accuracy), logits [B,m,V], targets [B,m],
        hits bool [B,m] (argmax == target).
        """
        if plan.kind != self.objective:
            raise ValueError(f"plan is for {plan.kind!r} but the model was built for {self.objective!r}")
        logits = self.lm_head(self.forward_features(images, plan))
        targets = tokens.long().gather(1, plan.predicted)
        # at least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64 for the reference test)
        loss_dtype = torch.promote_types(logits.dtype, torch.float32)
        loss = F.cross_entropy(logits.flatten(0, 1).to(loss_dtype), targets.flatten())
        with torch.no_grad():
            hits = logits.argmax(-1) == targets
        return {"loss": loss, "acc": hits.float().mean(), "logits": logits, "targets": targets, "hits": hits}


def _block(blk: nn.Module, z: torch.Tensor, num_keys: Optional[int], mask: Optional[TwoStreamMask],
           keep1: Optional[torch.Tensor], keep2: Optional[torch.Tensor]) -> torch.Tensor:
    """One timm ``Block``: single stream (mim, ``num_keys`` None) or both streams. z: [B, L, D].

    timm's ``Block.forward`` with its DropPath modules replaced by the drawn per-sample
    scales keep1/keep2 [B,1,1] (None: no drop path); timm's drop_path is ``x * scale`` too.
    """
    if num_keys is None:
        h = blk.attn(blk.norm1(z))
    else:
        h = two_stream_attention(blk.attn, blk.norm1(z), num_keys, mask)
    h = blk.ls1(h)
    z = z + (h if keep1 is None else h * keep1)
    h = blk.ls2(blk.mlp(blk.norm2(z)))
    return z + (h if keep2 is None else h * keep2)


def _apply_block(blk: nn.Module, z: torch.Tensor, num_keys: Optional[int], mask: Optional[TwoStreamMask],
                 ckpt: bool, keep1: Optional[torch.Tensor] = None, keep2: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
    # checkpoint inside the compiled function: dynamo traces it as one recompute region
    if ckpt:
        return checkpoint(_block, blk, z, num_keys, mask, keep1, keep2, use_reentrant=False)
    return _block(blk, z, num_keys, mask, keep1, keep2)
