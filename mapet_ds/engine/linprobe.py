"""Linear probing of a frozen backbone (MAE's protocol) on the DeepSpeed engine.

    python launch/linprobe.py --config launch/recipes/demo_linprobe.yaml linprobe.init=RUN \
        data.train_list=D/train.txt data.val_list=D/val.txt linprobe.max_steps=N linprobe.output_dir=OUT
    deepspeed launch/linprobe.py --config launch/recipes/vit_base_in1k_linprobe.yaml linprobe.init=runs/mapet

MAE main_linprobe.py: frozen ViT, [CLS] or mean-pooled features, BatchNorm1d(affine=False,
eps=1e-6) + Linear (trunc-normal std 0.01), LARS (timm ``Lars``, momentum 0.9, no weight
decay), lr = blr x batch / 256, warmup then cosine (optim.warmup_epochs / min_lr / warmup_lr),
RandomResizedCrop + flip for training, the eval view for validation, plain cross-entropy.

The head trains under DeepSpeed with LARS as the client optimizer, always ZeRO-0 fp32:
LARS' trust ratio is a per-tensor norm, which ZeRO (and DeepSpeed's bf16 optimizer)
would compute over flattened, rank-partitioned groups instead; the head is a few MB, so
partitioning it saves nothing. The frozen backbone's forward runs in autocast
(``linprobe.backbone_dtype``, bf16 on GPUs). ``linprobe.cache_features=true`` extracts
eval-view features once (engine/feature_cache.py) and trains on them.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mapet_ds.config import ConfigError, RunConfig, load_config
from mapet_ds.engine.cli import check_run_dir, job_parser, run_job
from mapet_ds.engine.dist import DistInfo, init_distributed
from mapet_ds.engine.ds_config import load_ds_json
from mapet_ds.engine.finetune import eval_view_loader, evaluate, labelled_lists
from mapet_ds.engine.trainer import Trainer
from mapet_ds.models.probe import LinearProbe, build_probe_backbone
from mapet_ds.safe_io import atomic_write_text
from mapet_ds.transfer import to_device

TAG = "[linprobe]"


def backbone_autocast(choice: str, device: torch.device) -> Optional[torch.dtype]:
    if choice == "bf16" or (choice == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def load_backbone(cfg: RunConfig, dist: DistInfo):
    """linprobe.init -> (frozen timm ViT on the device, one-line description for the log)."""
    lp = cfg.linprobe
    if not lp.init:
        raise ConfigError("linprobe.init is not set: give a pre-training run dir, a fine-tuned run, an exported/timm "
                          "checkpoint, or 'random' for a randomly initialised backbone")
    torch.manual_seed(lp.seed)  # the random-init backbone is the same on every rank
    if lp.init == "random":
        vit, report = build_probe_backbone(cfg.model, None)
        where = f"random init (seed {lp.seed})"
    else:
        from mapet_ds.interop.export import load_any_checkpoint

        state, meta = load_any_checkpoint(lp.init)
        vit, report = build_probe_backbone(cfg.model, state)
        where = f"{lp.init} ({meta.get('resolved', lp.init)}, {report['kind']})"
        if report["resampled"]:
            where += f", resampled {', '.join(report['resampled'])}"
    return vit.to(dist.device), where


def probe_ds_config(path: str, dist: DistInfo) -> dict:
    """The DeepSpeed JSON with ZeRO-0 fp32 forced (module doc: why)."""
    ds = load_ds_json(path)
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage and dist.is_main:
        print(f"{TAG} {path}: ZeRO stage {stage} -> 0 for the probe head (LARS needs whole tensors; the head is tiny)",
              flush=True)
    ds["zero_optimization"] = {"stage": 0}
    ds["bf16"], ds["fp16"] = {"enabled": False}, {"enabled": False}
    ds["_source"] = str(path)
    return ds


def lars_for_head(probe: LinearProbe, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """timm's Lars over the Linear: MAE's LARS adapts and decays only >1-D tensors (the bias gets plain SGD)."""
    from timm.optim import Lars

    lin = probe.head[1]
    groups = [{"params": [lin.weight], "weight_decay": weight_decay, "always_adapt": True,
               "param_names": ["head.1.weight"]},
              {"params": [lin.bias], "weight_decay": 0.0, "always_adapt": False, "param_names": ["head.1.bias"]}]
    # foreach=False: the same per-tensor update on every device, bitwise (exact resume)
    return Lars(groups, lr=lr, momentum=momentum, foreach=False)


class ProbeEval:
    """Evaluation every ``eval_every`` epochs and at the end; best top-1 kept in the run state."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, make_loader):
        self.cfg, self.dist, self.make_loader = cfg, dist, make_loader
        self._loader = None
        self.last: dict = {}

    def step_hook(self, trainer: Trainer) -> None:
        every = self.cfg.linprobe.eval_every * trainer.steps_per_epoch
        final = trainer.state.step == trainer.total_steps
        if trainer.state.step % every == 0 or final:
            self.run(trainer)

    def run(self, trainer: Trainer) -> dict:
        if self._loader is None:
            self._loader = self.make_loader()
        res = evaluate(trainer.module, self._loader, self.dist.device)
        res.pop("confusion", None)
        trainer.logger.scalars({"eval/top1": res["top1"], "eval/top5": res["top5"], "eval/loss": res["loss"]},
                               trainer.state.samples_seen)
        trainer.logger.flush()
        if res["top1"] > trainer.state.extra.get("best_top1", -1.0):
            trainer.state.extra.update(best_top1=res["top1"], best_step=trainer.state.step)
        if self.dist.is_main:
            print(f"{TAG} eval step {trainer.state.step}: top1 {res['top1']:.2f} top5 {res['top5']:.2f} "
                  f"({res['count']} images) | best {trainer.state.extra['best_top1']:.2f}", flush=True)
        self.last = res
        return res


def _cached_features(cfg: RunConfig, probe: LinearProbe, train_fl, val_fl, init_desc: str, dist: DistInfo, run_dir):
    """{"train": (feats, labels), "val": ...}: from run_dir/features.pt when made the same way, else extracted."""
    from mapet_ds.engine import feature_cache as fc

    d, lp = cfg.data, cfg.linprobe
    digest = lambda fl: fl.digest() if hasattr(fl, "digest") else str(getattr(fl, "root", fl))  # noqa: E731
    signature = {"init": init_desc, "pool": lp.pool, "model": cfg.model.model_dump(mode="json"),
                 "backbone_dtype": str(probe.autocast_dtype), "train": digest(train_fl), "val": digest(val_fl),
                 "view": [d.crop_pct, d.interpolation, list(d.mean), list(d.std)]}
    path = run_dir / "features.pt"
    cached = fc.load_cache(path, signature) if lp.resume != "none" else None
    if cached is not None:
        if dist.is_main:
            print(f"{TAG} features from {path}", flush=True)
        return {s: (cached[f"{s}_feats"], cached[f"{s}_labels"]) for s in ("train", "val")}
    batch = lp.micro_batch_size or max(1, min(256, lp.global_batch_size // dist.world_size))
    out = {}
    for name, fl in (("train", train_fl), ("val", val_fl)):
        out[name] = fc.extract_all(probe.features, eval_view_loader(cfg, fl, batch, dist), len(fl), dist.device)
        if dist.is_main:
            print(f"{TAG} extracted {name} features {tuple(out[name][0].shape)} (eval view, no augmentation)",
                  flush=True)
    if dist.is_main:
        fc.save_cache(path, signature, out)
    return out


def build_trainer(cfg: RunConfig, ds_config: str, dist: DistInfo) -> tuple[Trainer, ProbeEval]:
    from mapet_ds.engine.feature_cache import FeatureEvalLoader, FeatureTrainLoader

    d, lp = cfg.data, cfg.linprobe
    init_path = None if lp.init in (None, "random") else lp.init
    run_dir = check_run_dir(lp.output_dir, [(d.train_list, "data.train_list"), (d.val_list, "data.val_list"),
                                            (d.train_shards, "data.train_shards"), (d.val_shards, "data.val_shards"),
                                            (init_path, "linprobe.init (the backbone to probe)")],
                            "linprobe.output_dir")
    train_fl, val_fl = labelled_lists(cfg, "linear probing")
    num_classes = lp.num_classes or max(train_fl.num_classes, val_fl.num_classes)
    ds = probe_ds_config(ds_config, dist)
    vit, init_desc = load_backbone(cfg, dist)
    autocast = backbone_autocast(lp.backbone_dtype, dist.device)
    dim = cfg.model.embed_dim
    if dist.is_main:
        print(f"{TAG} backbone: {init_desc}; features: {lp.pool} pooling, dim {dim}; "
              f"{'cached (eval view)' if lp.cache_features else 'full protocol (train view per step)'}", flush=True)
    full = LinearProbe(vit, dim, num_classes, lp.pool, autocast)
    if lp.cache_features:
        run_dir.mkdir(parents=True, exist_ok=True)
        feats = _cached_features(cfg, full, train_fl, val_fl, init_desc, dist, run_dir)
        del full, vit  # the head trains alone on the features
        torch.manual_seed(lp.seed)
        model = LinearProbe(None, dim, num_classes, lp.pool)
        flops = 2.0 * dim * num_classes
    else:
        torch.manual_seed(lp.seed)
        model = full
        from mapet_ds.models.flops import classifier_forward_flops

        flops = classifier_forward_flops(cfg.model, num_classes).total
    lr = lp.lr or lp.blr * lp.global_batch_size / 256
    optimizer = lars_for_head(model, lr, lp.momentum, lp.weight_decay)
    if dist.is_main:
        how = "linprobe.lr" if lp.lr else f"blr {lp.blr:g} x batch {lp.global_batch_size} / 256"
        print(f"{TAG} LARS lr {lr:g} ({how}), momentum {lp.momentum:g}, weight decay {lp.weight_decay:g}, "
              f"{num_classes} classes", flush=True)

    def build_loader(micro: int, state: Optional[str]):
        if lp.cache_features:
            f, y = feats["train"]
            return FeatureTrainLoader(f, y, batch_size=micro, shard_id=dist.rank, num_shards=dist.world_size,
                                      seed=lp.seed, device=dist.device, checkpoint=state)
        from mapet_ds.pipelines import finetune_train_loader
        from mapet_ds.pipelines.shards import finetune_shard_loader

        return (finetune_shard_loader if d.train_shards else finetune_train_loader)(
            train_fl, img_size=cfg.model.img_size, batch_size=micro, shard_id=dist.rank,
            num_shards=dist.world_size, seed=lp.seed, num_threads=d.num_threads, device=d.decode,
            scale=d.scale, hflip=d.hflip, rand_augment=d.rand_augment, mean=d.mean, std=d.std, checkpoint=state,
            interpolation=d.interpolation, prefetch_queue_depth=d.prefetch_queue_depth)

    def build_eval():
        if lp.cache_features:
            f, y = feats["val"]
            return FeatureEvalLoader(f, y, batch_size=trainer.micro_batch, shard_id=dist.rank,
                                     num_shards=dist.world_size, device=dist.device)
        return eval_view_loader(cfg, val_fl, trainer.micro_batch, dist)

    def micro_step(engine, batch: dict) -> dict[str, torch.Tensor]:
        logits = engine(to_device(batch["images"], dist.device)).float()
        labels = to_device(batch["labels"], dist.device)
        return {"loss": F.cross_entropy(logits, labels), "acc": (logits.argmax(1) == labels).float().mean()}

    evaluator = ProbeEval(cfg, dist, build_eval)
    trainer = Trainer(cfg, "linprobe", ds, model, dist, build_loader, micro_step, flops_per_image=flops,
                      step_hook=evaluator.step_hook, optimizer=optimizer)
    return trainer, evaluator


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = job_parser("Linear probing of a frozen ViT backbone with DeepSpeed").parse_args(argv)

    def job():
        cfg = load_config(args.config, args.overrides)
        dist = init_distributed(args.local_rank)
        trainer, evaluator = build_trainer(cfg, args.ds_config, dist)
        trainer.fit()
        # resumed after the final checkpoint: no step ran, so evaluate the final head now
        res = evaluator.last or evaluator.run(trainer)
        if dist.is_main:
            lp = cfg.linprobe
            summary = {"top1": res["top1"], "top5": res["top5"], "best_top1": trainer.state.extra.get("best_top1"),
                       "count": res["count"], "init": lp.init, "pool": lp.pool, "cache_features": lp.cache_features,
                       "steps": trainer.state.step, "run_dir": str(trainer.run_dir)}
            atomic_write_text(trainer.run_dir / "summary.json", json.dumps(summary) + "\n")
            print(f"{TAG} done: top-1 {res['top1']:.2f} top-5 {res['top5']:.2f} ({res['count']} images)", flush=True)
            print(f"{TAG} summary: {json.dumps(summary)}", flush=True)
        trainer.close()

    return run_job(job)
