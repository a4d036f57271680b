"""Evaluate a checkpoint: top-1/top-5 of a classifier, or k-NN accuracy of a backbone.

    python launch/evaluate.py runs/finetune --filelist /data/imagenet/val.txt
    python launch/evaluate.py runs/pretrain --knn --train-list train.txt --filelist val.txt
    python launch/evaluate.py random --config launch/recipes/demo_pretrain.yaml --knn   # random-init baseline
    deepspeed --num_gpus 8 launch/evaluate.py runs/finetune/best.pt --config runs/finetune/config.yaml
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence


from mapet_ds.config import ConfigArgumentParser, ConfigError, load_config
from mapet_ds.engine.cli import run_job
from mapet_ds.engine.dist import init_distributed
from mapet_ds.filelist import read_filelist
from mapet_ds.models.classifier import CheckpointError, build_classifier


def _find_config(path: Path, meta: dict, explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    if meta.get("config"):
        return meta["config"]
    for cand in (path / "config.yaml", path.parent / "config.yaml"):
        if cand.is_file():
            return str(cand)
    raise ConfigError(f"{path}: no config.yaml beside the checkpoint; pass --config with the model section")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ConfigArgumentParser(description="top-1/top-5 (or k-NN) of a checkpoint on a file list",
                              default_config=lambda ns: _find_config(Path(ns.checkpoint), {}, None))
    ap.add_argument("checkpoint", help="run dir, checkpoint tag dir, best.pt or an exported file; 'random' (with "
                                       "--knn and --config): a randomly initialised backbone, the baseline "
                                       "(a file named random: ./random)")
    ap.add_argument("--config", help="config with the model section (default: the run's config.yaml)")
    ap.add_argument("--filelist", help="eval file list (default: data.val_list of the config)")
    ap.add_argument("--shards", help="eval shard folder (data/make_shards.py; default: data.val_shards)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    ap.add_argument("--knn", action="store_true", help="k-NN accuracy of the backbone (needs --train-list)")
    ap.add_argument("--train-list", help="k-NN memory bank file list (default: data.train_list)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--pool", choices=["cls", "mean"], default="cls",
                    help="k-NN features: the [CLS] token (default) or the mean of the patch tokens")
    ap.add_argument("--seed", type=int, default=0, help="with checkpoint 'random': the initialisation seed")
    ap.add_argument("--local_rank", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    def job():
        from mapet_ds.interop.export import load_any_checkpoint
        from mapet_ds.engine.finetune import eval_view_loader, evaluate

        dist = init_distributed(args.local_rank)
        random_init = args.checkpoint == "random"
        if random_init and not (args.knn and args.config):
            raise ConfigError("checkpoint 'random' is the random-init k-NN baseline: pass --knn and --config "
                              "<a config with the model section>")
        state, meta = ({}, {}) if random_init else load_any_checkpoint(args.checkpoint, use_ema=args.ema)
        if not args.knn and meta.get("num_classes", 0) == 0:
            raise CheckpointError(f"{args.checkpoint} has no classifier head: fine-tune it first, or use --knn")
        cfg = load_config(_find_config(Path(args.checkpoint), meta, args.config), args.overrides)
        d = cfg.data
        from mapet_ds.pipelines.shards import open_shards

        shards = args.shards or (None if args.filelist else d.val_shards)
        val_path = shards or args.filelist or d.val_list
        if val_path is None:
            raise ConfigError("no eval file list: pass --filelist (or --shards) or set data.val_list (or val_shards)")
        val = open_shards(shards) if shards else read_filelist(val_path, d.root)

        def loader(fl):
            return eval_view_loader(cfg, fl, args.batch_size, dist)

        if args.knn:
            from mapet_ds.analysis.knn import extract_features, knn_eval
            from mapet_ds.models.vit import build_backbone

            if dist.world_size > 1:
                raise ConfigError("--knn runs on one process: launch it with plain python")
            import torch

            torch.manual_seed(args.seed)  # the random-init baseline is reproducible
            backbone = build_backbone(cfg.model)
            if not random_init:
                backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))},
                                         strict=False)
            backbone.to(dist.device)
            train = (open_shards(d.train_shards) if d.train_shards and not args.train_list
                     else read_filelist(args.train_list or d.train_list, d.root))
            tf, tl, _ = extract_features(backbone, loader(train), dist.device, pool=args.pool)
            vf, vl, _ = extract_features(backbone, loader(val), dist.device, pool=args.pool)
            res = knn_eval(tf, tl, vf, vl, k=args.k, num_classes=max(train.num_classes, val.num_classes))
            res = {"knn_top1": res["top1"], "knn_top5": res["top5"], "count": int(vl.numel()), "pool": args.pool,
                   "k": res["k"], "num_train": res["num_train"]}
        else:
            model = build_classifier(cfg.model, meta["num_classes"])
            model.load_state_dict(state, strict=True)
            model.to(dist.device)
            res = evaluate(model, loader(val), dist.device)
            res.pop("confusion", None)
        if dist.is_main:
            print(json.dumps({"checkpoint": str(args.checkpoint), "filelist": str(val_path), **res}), flush=True)

    return run_job(job)
