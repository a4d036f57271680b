"""Fine-tuning and evaluation of the ViT classifier (METHOD.md section 5).

    deepspeed launch/finetune.py --ds_config ds_configs/zero2.json \
        --config launch/recipes/vit_base_in1k_finetune.yaml finetune.init=runs/vit_base_in1k_mapet

Train step: DALI batch (RRC, flip, RandAugment) -> random erasing -> Mixup/CutMix
(timm) -> soft-target or label-smoothed CE. Evaluation: distributed top-1/top-5, each
sample counted once whatever the world size; optional EMA weights evaluated alongside.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from mapet_ds.config import ConfigError, RunConfig, load_config
from mapet_ds.engine.cli import check_run_dir, job_parser, run_job
from mapet_ds.engine.dist import DistInfo, all_reduce_sum, init_distributed
from mapet_ds.engine.trainer import Trainer
from mapet_ds.filelist import read_filelist
from mapet_ds.models.classifier import build_classifier, load_backbone_into_classifier
from mapet_ds.models.flops import classifier_forward_flops
from mapet_ds.safe_io import atomic_write, atomic_write_text
from mapet_ds.transfer import to_device


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype = torch.float32,
             num_classes: Optional[int] = None, confusion: bool = False) -> dict:
    """Top-1/top-5 (%) over the whole list, summed over ranks; padding rows are ignored.

    loader yields {"images" [B,3,H,W], "labels" [B], "valid" bool [B]}; every rank must
    yield the same number of batches (EvalLoader guarantees it).
    """
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, count, loss
    conf = None
    if confusion:
        conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for batch in loader:
        images = batch["images"].to(device, dtype)
        labels = batch["labels"].to(device)
        valid = batch["valid"].to(device)
        logits = model(images).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        stats[0] += (hit[:, 0] & valid).sum()
        stats[1] += (hit.any(1) & valid).sum()
        stats[2] += valid.sum()
        stats[3] += (torch.nn.functional.cross_entropy(logits, labels, reduction="none") * valid).sum()
        if conf is not None:
            idx = labels[valid] * num_classes + top[valid, 0]
            conf += torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)
    stats = all_reduce_sum(stats)
    model.train(was_training)
    n = max(float(stats[2]), 1.0)
    out = {"top1": 100.0 * float(stats[0]) / n, "top5": 100.0 * float(stats[1]) / n,
           "loss": float(stats[3]) / n, "count": int(stats[2])}
    if conf is not None:
        out["confusion"] = all_reduce_sum(conf).cpu()
    return out


class FinetuneStep:
    """Micro step: erasing -> mixup/cutmix -> loss. Also runs EMA and periodic evaluation."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, num_classes: int, eval_loader_fn,
                 class_names: Optional[list[str]] = None):
        f = cfg.finetune
        self.cfg, self.dist, self.num_classes = cfg, dist, num_classes
        self.erase = RandomErasing(f.reprob, mode="pixel", device=str(dist.device)) if f.reprob > 0 else None
        mix_on = f.mixup > 0 or f.cutmix > 0
        self.mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob,
                           switch_prob=f.mixup_switch_prob, label_smoothing=f.label_smoothing,
                           num_classes=num_classes) if mix_on else None
        if mix_on:
            self.criterion = SoftTargetCrossEntropy()
        elif f.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(f.label_smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()
        self.eval_loader_fn = eval_loader_fn
        self._eval_loader = None
        self.ema: Optional[ModelEmaV3] = None
        self.trainer: Optional[Trainer] = None
        self.last_eval: dict = {}
        self.class_names = class_names

    def __call__(self, engine, batch: dict) -> dict[str, torch.Tensor]:
        device = self.dist.device
        images = to_device(batch["images"], device)
        labels = to_device(batch["labels"], device)
        if self.erase is not None:
            images = self.erase(images)
        if self.mixup is not None:
            if images.shape[0] % 2:
                raise ConfigError("Mixup/CutMix need an even micro batch: set finetune.micro_batch_size to an even number")
            images, labels = self.mixup(images, labels)
        logits = engine(images.to(self.trainer.dtype))
        return {"loss": self.criterion(logits.float(), labels)}

    # -- hooks -------------------------------------------------------------------------
    def step_hook(self, trainer: Trainer) -> None:
        if self.ema is not None:
            update_ema(self.ema, trainer.module, step=trainer.state.step)
        every = self.cfg.finetune.eval_every * trainer.steps_per_epoch
        final = trainer.state.step == trainer.total_steps
        if trainer.state.step % every == 0 or final:
            self.run_eval(trainer, final=final)

    def run_eval(self, trainer: Trainer, final: bool = False) -> dict:
        if self._eval_loader is None:
            self._eval_loader = self.eval_loader_fn()
        res = evaluate(trainer.module, self._eval_loader, self.dist.device, trainer.dtype,
                       num_classes=self.num_classes, confusion=final)
        if final and self.dist.is_main:
            from mapet_ds.analysis.visualize import confusion_matrix_image, save_png

            img = confusion_matrix_image(res.pop("confusion"), self.class_names,
                                         title=f"run {trainer.run_dir.name}, step {trainer.state.step:,}")
            trainer.logger.image("eval/confusion_matrix", img, trainer.state.samples_seen)
            save_png(img, trainer.run_dir / "confusion_matrix.png")
        res.pop("confusion", None)
        scalars = {"eval/top1": res["top1"], "eval/top5": res["top5"], "eval/loss": res["loss"]}
        if self.ema is not None:
            ema_res = evaluate(self.ema.module, self._eval_loader, self.dist.device, torch.float32)
            scalars.update({"eval/ema_top1": ema_res["top1"], "eval/ema_top5": ema_res["top5"]})
            res["ema_top1"], res["ema_top5"] = ema_res["top1"], ema_res["top5"]
        trainer.logger.scalars(scalars, trainer.state.samples_seen)
        trainer.logger.flush()
        best = trainer.state.extra.get("best_top1", -1.0)
        if res["top1"] > best:
            trainer.state.extra["best_top1"] = res["top1"]
            trainer.state.extra["best_step"] = trainer.state.step
            if self.dist.is_main:
                _save_best(trainer, res)
        if self.dist.is_main:
            print(f"[finetune] eval step {trainer.state.step}: top1 {res['top1']:.2f} top5 {res['top5']:.2f} "
                  f"({res['count']} images)" + (f" | EMA top1 {res['ema_top1']:.2f}" if "ema_top1" in res else "")
                  + f" | best {trainer.state.extra['best_top1']:.2f}", flush=True)
        self.last_eval = res
        return res


def _save_best(trainer: Trainer, res: dict) -> None:
    """Best weights as a plain timm state dict (the 'best' checkpoint users keep)."""
    state = {k: v.detach().float().cpu() for k, v in trainer.module.state_dict().items()}
    atomic_write(trainer.run_dir / "best.pt", lambda tmp: torch.save(state, tmp))
    meta = {"step": trainer.state.step, "top1": res["top1"], "top5": res["top5"]}
    atomic_write_text(trainer.run_dir / "best.json", json.dumps(meta) + "\n")


def init_weights(model: torch.nn.Module, init: Optional[str], dist: DistInfo) -> Optional[dict]:
    """Load a pre-trained backbone (run dir, tag dir, exported or release file) into the classifier."""
    if not init:
        return None
    from mapet_ds.interop.export import load_any_checkpoint

    state, meta = load_any_checkpoint(init)
    report = load_backbone_into_classifier(model, state)
    if dist.is_main:
        print(f"[finetune] initialised from {init}: {len(state)} tensors; not in checkpoint (new): "
              f"{', '.join(report['missing']) or 'none'}", flush=True)
    return report


def labelled_lists(cfg: RunConfig, purpose: str):
    """(train, val): file lists or shard sets (data/make_shards.py; they carry num_classes/classes
    too and their loaders read labels from the shards), both required for ``purpose``."""
    from mapet_ds.pipelines.shards import open_shards

    d = cfg.data
    if (d.train_list or d.train_shards) is None or (d.val_list or d.val_shards) is None:
        raise ConfigError("data.train_list (or data.train_shards) and data.val_list (or data.val_shards) must both "
                          f"be set for {purpose}")
    train = open_shards(d.train_shards) if d.train_shards else read_filelist(d.train_list, d.root)
    val = open_shards(d.val_shards) if d.val_shards else read_filelist(d.val_list, d.root)
    return train, val


def eval_view_loader(cfg: RunConfig, fl, batch_size: int, dist: DistInfo):
    """The eval view (resize + centre crop, ``cfg.data``) of a file list or shard set, this rank's shard."""
    from mapet_ds.pipelines import eval_loader
    from mapet_ds.pipelines.shards import ShardSet, eval_shard_loader

    d = cfg.data
    make = eval_shard_loader if isinstance(fl, ShardSet) else eval_loader
    return make(fl, img_size=cfg.model.img_size, batch_size=batch_size, shard_id=dist.rank, num_shards=dist.world_size,
                num_threads=d.num_threads, device=d.decode, crop_pct=d.crop_pct, interpolation=d.interpolation,
                mean=d.mean, std=d.std)


def build_trainer(cfg: RunConfig, ds_config: str, dist: DistInfo) -> tuple[Trainer, FinetuneStep]:
    from mapet_ds.pipelines import finetune_train_loader
    from mapet_ds.pipelines.shards import finetune_shard_loader

    d, f = cfg.data, cfg.finetune

    check_run_dir(f.output_dir, [(d.train_list, "data.train_list"), (d.val_list, "data.val_list"),
                                 (d.train_shards, "data.train_shards"), (d.val_shards, "data.val_shards"),
                                 (f.init, "finetune.init (the checkpoint fine-tuning starts from)")],
                  "finetune.output_dir")
    train_fl, val_fl = labelled_lists(cfg, "fine-tuning")
    num_classes = f.num_classes or max(train_fl.num_classes, val_fl.num_classes)
    torch.manual_seed(f.seed)
    model = build_classifier(cfg.model, num_classes, head_init_std=cfg.finetune.head_init_std)
    init_weights(model, f.init, dist)

    def build_loader(micro_batch: int, state: Optional[str]):
        return (finetune_shard_loader if d.train_shards else finetune_train_loader)(
            train_fl, img_size=cfg.model.img_size, batch_size=micro_batch, shard_id=dist.rank,
            num_shards=dist.world_size, seed=f.seed, num_threads=d.num_threads, device=d.decode,
            scale=d.scale, hflip=d.hflip, rand_augment=d.rand_augment, mean=d.mean, std=d.std, checkpoint=state,
            interpolation=d.interpolation, prefetch_queue_depth=d.prefetch_queue_depth)

    def build_eval():
        return eval_view_loader(cfg, val_fl, trainer.micro_batch, dist)

    step = FinetuneStep(cfg, dist, num_classes, build_eval, val_fl.classes)
    flops = classifier_forward_flops(cfg.model, num_classes)
    trainer = Trainer(cfg, "finetune", ds_config, model, dist, build_loader, step, flops_per_image=flops.total,
                      layer_decay=cfg.optim.layer_decay, step_hook=step.step_hook,
                      client_state_fn=lambda: {"ema": step.ema.module.state_dict()} if step.ema is not None else {})
    step.trainer = trainer
    if f.ema_decay is not None:
        step.ema = ModelEmaV3(trainer.module, decay=f.ema_decay)
        step.ema.module.float()  # fp32 EMA even when the engine trains in bf16 (see update_ema)
        ema_state = trainer.resumed_client.get("ema") if trainer.resumed_client else None
        if ema_state is not None:
            step.ema.module.load_state_dict(ema_state)
    return trainer, step


@torch.no_grad()
def update_ema(ema: ModelEmaV3, model: torch.nn.Module, step: int) -> None:
    """One EMA step of ``model`` into ``ema`` with timm's decay schedule, the EMA in fp32.

    timm's own update (``_foreach_lerp_``) needs the EMA and the model in one dtype up
    to timm 1.0.30 (1.0.31 promotes); a bf16 engine with an fp32 EMA takes this fp32
    update instead: ema = decay * ema + (1 - decay) * model, promoted per tensor.
    """
    ema_values = list(ema.module.state_dict().values())
    model_values = list(model.state_dict().values())
    if all(e.dtype == m.dtype for e, m in zip(ema_values, model_values)):
        ema.update(model, step=step)
        return
    decay = ema.get_decay(step)
    floats = [(e, m) for e, m in zip(ema_values, model_values) if e.is_floating_point()]
    for e, m in zip(ema_values, model_values):
        if not e.is_floating_point():
            e.copy_(m)
    ema_f, model_f = [e for e, _ in floats], [m for _, m in floats]
    torch._foreach_mul_(ema_f, decay)
    torch._foreach_add_(ema_f, model_f, alpha=1.0 - decay)  # add_ promotes bf16 -> fp32 per tensor


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = job_parser("ViT fine-tuning with DeepSpeed").parse_args(argv)

    def job():
        cfg = load_config(args.config, args.overrides)
        dist = init_distributed(args.local_rank)
        trainer, step = build_trainer(cfg, args.ds_config, dist)
        trainer.fit()
        # resumed after the final checkpoint: no step ran, so evaluate the final weights now
        res = step.last_eval or step.run_eval(trainer, final=True)
        if dist.is_main:
            summary = {"top1": res.get("top1"), "top5": res.get("top5"),
                       "best_top1": trainer.state.extra.get("best_top1"), "run_dir": str(trainer.run_dir)}
            atomic_write_text(trainer.run_dir / "summary.json", json.dumps(summary) + "\n")
            print(f"[finetune] done: {json.dumps(summary)}", flush=True)
        trainer.close()

    return run_job(job)
