"""Semantic segmentation (UperNet on the ViT; BEiT's ADE20K protocol) on the shared Trainer.

    deepspeed launch/segment.py --ds_config ds_configs/zero2.json \
        --config launch/recipes/vit_base_ade20k_upernet.yaml segment.init=runs/vit_base_in1k_mapet

Train step: DALI pair batch (rescale, crop, flip, photometric; pad = ignore) -> UperNet
logits at 1/4 and FCN aux logits at 1/16, both upsampled to the crop (bilinear) -> CE
(ignore 255) + ``aux_weight`` x CE. Schedule: linear warmup then poly (power 1), AdamW
with layer decay. Eval (``eval_every`` steps and at the end): sliding windows, distributed
confusion histogram -> mIoU / mAcc / aAcc, per-class IoU table, overlay picture.
Checkpoints, exact and elastic auto-resume, TensorBoard: the shared Trainer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.scheduler import PolyLRScheduler

from mapet_ds.config import ConfigError, RunConfig, load_config
from mapet_ds.engine.cli import check_run_dir, job_parser, run_job
from mapet_ds.engine.dist import DistInfo, init_distributed
from mapet_ds.engine.optim import Schedule
from mapet_ds.engine.seg_eval import evaluate_segmentation, overlay_picture
from mapet_ds.engine.seg_metrics import iou_table, read_class_names
from mapet_ds.engine.trainer import Trainer
from mapet_ds.models.segmentation import build_segmenter, load_backbone_into_segmenter, upsample_logits
from mapet_ds.safe_io import atomic_write, atomic_write_text
from mapet_ds.transfer import to_device


class PolySchedule(Schedule):
    """Schedule with timm's ``PolyLRScheduler`` (mmseg 'poly', power 1, min_lr) after the
    linear warmup prefix, instead of the cosine; warmup and weight decay are Schedule's."""

    power = 1.0

    def lr_scheduler(self, optimizer, **common):
        return PolyLRScheduler(optimizer, power=self.power, **common)


def _ce(logits: torch.Tensor, masks: torch.Tensor, ignore: int) -> torch.Tensor:
    """Mean CE over non-ignored pixels (0, not NaN, for a crop of padding only)."""
    loss = F.cross_entropy(logits, masks, ignore_index=ignore, reduction="sum")
    return loss / (masks != ignore).sum().clamp(min=1)


class SegmentStep:
    """Micro step (main + aux CE) and the periodic evaluation."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, eval_loader_fn, class_names: Optional[list[str]]):
        self.cfg, self.dist, self.seg = cfg, dist, cfg.segment
        self.eval_loader_fn = eval_loader_fn
        self._eval_loader = None
        self.class_names = class_names
        self.trainer: Optional[Trainer] = None
        self.last_eval: dict = {}

    def __call__(self, engine, batch: dict) -> dict[str, torch.Tensor]:
        s = self.seg
        images = to_device(batch["images"], self.dist.device)
        masks = to_device(batch["masks"], self.dist.device)
        logits, aux = engine(images.to(self.trainer.dtype))
        logits = upsample_logits(logits.float(), masks.shape[-2:])
        main = _ce(logits, masks, s.ignore_index)
        out = {"loss_main": main.detach()}
        loss = main
        if aux is not None and s.aux_weight > 0:
            aux_loss = _ce(upsample_logits(aux.float(), masks.shape[-2:]), masks, s.ignore_index)
            loss = main + s.aux_weight * aux_loss
            out["loss_aux"] = aux_loss.detach()
        valid = masks != s.ignore_index
        out["pixel_acc"] = ((logits.argmax(1) == masks) & valid).sum().float() / valid.sum().clamp(min=1)
        out["loss"] = loss
        return out

    def step_hook(self, trainer: Trainer) -> None:
        final = trainer.state.step == trainer.total_steps
        if trainer.state.step % self.seg.eval_every == 0 or final:
            self.run_eval(trainer)

    def run_eval(self, trainer: Trainer) -> dict:
        s, d = self.seg, self.cfg.data
        if self._eval_loader is None:
            self._eval_loader = self.eval_loader_fn()
        res = evaluate_segmentation(trainer.module, self._eval_loader, self.dist.device, num_classes=s.num_classes,
                                    ignore_index=s.ignore_index, crop=s.crop_size, stride=s.eval_stride,
                                    scales=s.eval_scales, flip=s.eval_flip, dtype=trainer.dtype,
                                    keep=s.vis_images if self.dist.is_main else 0)
        x = trainer.state.samples_seen
        trainer.logger.scalars({"eval/mIoU": res["mIoU"], "eval/mAcc": res["mAcc"], "eval/aAcc": res["aAcc"]}, x)
        best = trainer.state.extra.get("best_mIoU", -1.0)
        improved = res["mIoU"] > best
        if improved:
            trainer.state.extra.update(best_mIoU=res["mIoU"], best_step=trainer.state.step)
        if self.dist.is_main:
            run = trainer.run_dir
            atomic_write_text(run / "iou_table.tsv", iou_table(res, self.class_names))
            if res["kept"]:
                pic = overlay_picture(res["kept"], d.mean, d.std, s.num_classes, s.ignore_index, self.class_names,
                                      title=f"{run.name}, step {trainer.state.step:,}: mIoU {res['mIoU']:.2f}")
                trainer.logger.image("eval/overlay", pic, x)
                from mapet_ds.analysis.visualize import save_png

                save_png(pic, run / "seg_overlay.png")
            if improved:
                state = {k: v.detach().float().cpu() for k, v in trainer.module.state_dict().items()}
                atomic_write(run / "best.pt", lambda tmp: torch.save(state, tmp))
                atomic_write_text(run / "best.json", json.dumps(
                    {"step": trainer.state.step, "mIoU": res["mIoU"], "mAcc": res["mAcc"], "aAcc": res["aAcc"]}) + "\n")
            print(f"[segment] eval step {trainer.state.step}: mIoU {res['mIoU']:.2f} mAcc {res['mAcc']:.2f} "
                  f"aAcc {res['aAcc']:.2f} ({res['images']} images) | best mIoU "
                  f"{trainer.state.extra['best_mIoU']:.2f}", flush=True)
        trainer.logger.flush()
        self.last_eval = res
        return res


def _class_names(cfg: RunConfig) -> Optional[list[str]]:
    """segment.class_names, else a ``seg_classes.txt`` beside the val list (the demo writes one)."""
    names = cfg.segment.class_names
    if names is None and cfg.data.val_list:
        beside = Path(cfg.data.val_list).parent / "seg_classes.txt"
        names = str(beside) if beside.is_file() else None
    return read_class_names(names)


def build_trainer(cfg: RunConfig, ds_config: str, dist: DistInfo) -> tuple[Trainer, SegmentStep]:
    from mapet_ds.pipelines.segmentation import SegEvalLoader, read_seglist, seg_train_loader

    d, s = cfg.data, cfg.segment
    check_run_dir(s.output_dir, [(d.train_list, "data.train_list"), (d.val_list, "data.val_list"),
                                 (s.init, "segment.init (the checkpoint segmentation starts from)")],
                  "segment.output_dir")
    if d.train_list is None or d.val_list is None:
        raise ConfigError("data.train_list and data.val_list must both be set for segmentation "
                          "(image<TAB>mask lists from data/make_seglist.py)")
    if d.train_shards or d.val_shards:
        raise ConfigError("segmentation reads image<TAB>mask lists (data.train_list/val_list), not shards: "
                          "set data.train_shards=null data.val_shards=null")
    train_sl, val_sl = read_seglist(d.train_list, d.root), read_seglist(d.val_list, d.root)
    names = _class_names(cfg)
    if names is not None and len(names) != s.num_classes:
        raise ConfigError(f"segment.num_classes={s.num_classes} but the class names file lists {len(names)}: "
                          f"set segment.num_classes={len(names)}")
    torch.manual_seed(s.seed)
    model = build_segmenter(cfg.model, s)
    if s.init:
        from mapet_ds.interop.export import load_any_checkpoint

        state, _ = load_any_checkpoint(s.init)
        rep = load_backbone_into_segmenter(model, state)
        if dist.is_main:
            print(f"[segment] backbone initialised from {s.init}: {len(state)} tensors"
                  + (f"; {rep['resampled'][0]}" if rep["resampled"] else ""), flush=True)
    if dist.world_size > 1 and dist.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg's SyncBN (gloo has none)

    def build_loader(micro_batch: int, state: Optional[str]):
        return seg_train_loader(train_sl, crop=s.crop_size, img_scale=s.img_scale, ratio_range=s.ratio_range,
                                hflip=s.hflip, photometric=s.photometric, reduce_zero_label=s.reduce_zero_label,
                                ignore_index=s.ignore_index, batch_size=micro_batch, shard_id=dist.rank,
                                num_shards=dist.world_size, seed=s.seed, num_threads=d.num_threads, device=d.decode,
                                mean=d.mean, std=d.std, checkpoint=state, prefetch_queue_depth=d.prefetch_queue_depth,
                                cat_max_ratio=s.cat_max_ratio)

    def build_eval():
        return SegEvalLoader(val_sl, img_scale=s.img_scale, reduce_zero_label=s.reduce_zero_label,
                             shard_id=dist.rank, num_shards=dist.world_size, num_threads=d.num_threads,
                             device=d.decode, mean=d.mean, std=d.std)

    step = SegmentStep(cfg, dist, build_eval, names)
    # forward FLOPs ~ 2 x params x tokens for the backbone (MFU is indicative only here)
    tokens = (s.crop_size // cfg.model.patch_size) ** 2 + 1
    flops = 2.0 * sum(p.numel() for p in model.backbone.parameters()) * tokens
    trainer = Trainer(cfg, "segment", ds_config, model, dist, build_loader, step, flops_per_image=flops,
                      layer_decay=cfg.optim.layer_decay, step_hook=step.step_hook)
    if trainer.micro_batch < 2 and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        # the UperNet PPM's 1x1 pooled branch has one value per channel per image: BatchNorm
        # needs >= 2 images per normalisation group (BEiT: 2 per GPU, SyncBN over 8 GPUs)
        raise ConfigError(f"segment: micro batch {trainer.micro_batch} per rank without SyncBatchNorm (CUDA, > 1 rank): "
                          f"BatchNorm in the UperNet decoder needs >= 2 images; set segment.micro_batch_size=2 "
                          f"(with segment.grad_accum to keep segment.global_batch_size)")
    trainer.schedule = PolySchedule(trainer.optimizer, cfg.optim, trainer.total_steps, trainer.steps_per_epoch)
    step.trainer = trainer
    return trainer, step


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = job_parser("UperNet semantic segmentation with DeepSpeed").parse_args(argv)

    def job():
        cfg = load_config(args.config, args.overrides)
        dist = init_distributed(args.local_rank)
        trainer, step = build_trainer(cfg, args.ds_config, dist)
        trainer.fit()
        res = step.last_eval or step.run_eval(trainer)  # resumed after the final checkpoint: evaluate now
        if dist.is_main:
            summary = {"mIoU": res["mIoU"], "mAcc": res["mAcc"], "aAcc": res["aAcc"], "images": res["images"],
                       "pixels": int(res["pixels"].sum()),
                       "best_mIoU": trainer.state.extra.get("best_mIoU"), "step": trainer.state.step,
                       "run_dir": str(trainer.run_dir)}
            atomic_write_text(trainer.run_dir / "summary.json", json.dumps(summary) + "\n")
            print(f"[segment] done: mIoU {res['mIoU']:.2f} mAcc {res['mAcc']:.2f} aAcc {res['aAcc']:.2f} "
                  f"({json.dumps(summary)})", flush=True)
        trainer.close()

    return run_job(job)
