#!/usr/bin/env python
"""Golden loss curves: tiny fixed-seed runs through the real engine, compared exactly.

Runs, in one process on 1 CPU rank (DeepSpeed ZeRO-2, fp32, DALI CPU decode):
  pretrain_mapet, pretrain_pet, pretrain_mim  4 steps each on 20 demo images (32 px, 4x4
                                              patches of 8 px, fixed random visual tokens)
  finetune_from_mapet                         3 steps from the pretrain_mapet run (RandAugment,
                                              Mixup/CutMix, EMA), then the final evaluation
and writes one JSON per run: the per-step records of metrics.jsonl (loss, token accuracy)
plus, for the fine-tune, its summary (top-1/top-5). JSON floats round-trip exactly.

    python tests/golden/regenerate.py             # rewrite tests/golden/*.json (the one command)
    python tests/golden/regenerate.py --out DIR   # write the JSONs to DIR (what the test does)

Regenerate ONLY when a change is meant to alter numerics (a new init, mask sampling, op
order, a library upgrade of the pinned torch/DeepSpeed/DALI) and say so in the commit;
the diff of tests/golden/*.json is then the visible record of that change. Never
regenerate to silence a failure you cannot explain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(REPO))

MODEL = "model: {size: null, embed_dim: 24, depth: 2, num_heads: 3, img_size: 32, patch_size: 8, drop_path: 0.1}\n"
PRETRAIN = (MODEL
            + "tokenizer: {kind: pixel_kmeans, vocab_size: 16, token_store: tokens}\n"
            + "objective: {name: mapet, mask_patches: 6, min_block_patches: 2}\n"
            + "data: {train_list: data/train.txt, num_threads: 1, decode: cpu}\n"
            + "optim: {lr: 2.0e-3, warmup_steps: 1, min_lr: 1.0e-4}\n"
            + "pretrain: {global_batch_size: 8, max_steps: 4, log_every: 2, save_every: 4}\n")
FINETUNE = (MODEL
            + "data: {train_list: data/train.txt, val_list: data/val.txt, num_threads: 1, decode: cpu}\n"
            + "optim: {lr: 1.0e-3, warmup_steps: 1, layer_decay: 0.75}\n"
            + "finetune: {global_batch_size: 8, max_steps: 3, log_every: 3, save_every: 3, eval_every: 100,\n"
            + "           ema_decay: 0.9, mixup: 0.8, cutmix: 1.0}\n")
RUNS = ("pretrain_mapet", "pretrain_pet", "pretrain_mim", "finetune_from_mapet")
VOCAB, GRID = 16, 4


def versions() -> dict:
    import deepspeed
    import nvidia.dali as dali
    import timm
    import torch

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "dali": dali.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "machine": platform.machine()}


def make_workspace(ws: Path) -> None:
    """20 train / 10 val demo images and a complete token store of fixed random ids."""
    import numpy as np

    sys.path.insert(0, str(REPO / "data"))
    from make_demo import make_demo

    from mapet_ds.filelist import read_filelist
    from mapet_ds.pipelines.graphs import pretrain_view_spec
    from mapet_ds.tokenizers.store import TokenStore

    make_demo(ws / "data", num_train_per_class=2, num_val_per_class=1, size=32, seed=0)
    fl = read_filelist(str(ws / "data/train.txt"))
    store = TokenStore.create(ws / "tokens", fl, GRID, VOCAB, {"kind": "golden-random"},
                              view=pretrain_view_spec(False))
    rows = np.random.default_rng(0).integers(0, VOCAB, size=(len(fl), GRID * GRID))
    store.write_chunk(0, rows)
    assert store.finalise()
    (ws / "pretrain.yaml").write_text(PRETRAIN)
    (ws / "finetune.yaml").write_text(FINETUNE)


def run_all(ws: Path) -> dict[str, dict]:
    from mapet_ds.engine import finetune, pretrain

    ds = str(REPO / "ds_configs/zero2.json")
    results = {}
    with contextlib.chdir(ws):
        for obj in ("mapet", "pet", "mim"):
            argv = ["--ds_config", ds, "--config", "pretrain.yaml", f"objective.name={obj}",
                    f"pretrain.output_dir=runs/pretrain_{obj}"]
            if pretrain.main(argv) != 0:
                raise SystemExit(f"golden run pretrain_{obj} failed")
            results[f"pretrain_{obj}"] = _record(ws / f"runs/pretrain_{obj}", argv)
        argv = ["--ds_config", ds, "--config", "finetune.yaml", "finetune.init=runs/pretrain_mapet",
                "finetune.output_dir=runs/finetune_from_mapet"]
        if finetune.main(argv) != 0:
            raise SystemExit("golden run finetune_from_mapet failed")
        rec = _record(ws / "runs/finetune_from_mapet", argv)
        summary = json.loads((ws / "runs/finetune_from_mapet/summary.json").read_text())
        rec["final_eval"] = {k: summary[k] for k in ("top1", "top5")}
        results["finetune_from_mapet"] = rec
    return results


def _record(run_dir: Path, argv: list[str]) -> dict:
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    args = [a for a in argv if not a.startswith("--") and not a.endswith(".json")]
    return {"overrides": args, "steps": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE), help="folder for the JSON files (default: tests/golden)")
    ap.add_argument("--keep", help="run the jobs in this folder and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    env = versions()
    with tempfile.TemporaryDirectory(prefix="mapet_golden_") as tmp:
        ws = Path(args.keep or tmp)
        ws.mkdir(parents=True, exist_ok=True)
        make_workspace(ws)
        results = run_all(ws)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rec in results.items():
        rec = {"run": name, "made_with": env, **rec}
        (out / f"{name}.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps({"written": sorted(str(out / f"{n}.json") for n in results)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
