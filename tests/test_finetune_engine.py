"""Fine-tuning and evaluation with real DeepSpeed; recipes (the demo command: test_demo.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port, run_py

from mapet_ds.config import load_config

ZERO2 = REPO / "ds_configs/zero2.json"



def _deepspeed(args, cwd, nproc=2):
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pretrained(demo_workspace):
    ws = demo_workspace
    run_py([REPO / "launch/pretrain.py", "--ds_config", ZERO2, "--config", "pretrain.yaml",
            "pretrain.output_dir=runs/for_ft", "pretrain.max_steps=4"], cwd=ws)
    (ws / "finetune.yaml").write_text(
        "model: {size: null, embed_dim: 48, depth: 2, num_heads: 3, img_size: 64, patch_size: 16}\n"
        "data: {train_list: data/train.txt, val_list: data/val.txt, num_threads: 1}\n"
        "optim: {lr: 1.0e-3, warmup_steps: 1, layer_decay: 0.75}\n"
        "finetune: {global_batch_size: 16, max_steps: 6, log_every: 3, save_every: 3, eval_every: 1,\n"
        "           ema_decay: 0.9, mixup: 0.8, cutmix: 1.0, output_dir: runs/ft}\n")
    return ws


def test_finetune_two_ranks_from_pretraining(pretrained):
    ws = pretrained
    proc = _deepspeed([REPO / "launch/finetune.py", "--ds_config", ZERO2, "--config", "finetune.yaml",
                       "finetune.init=runs/for_ft", "finetune.output_dir=runs/ft2"], cwd=ws)
    assert "initialised from runs/for_ft" in proc.stdout
    assert "not in checkpoint (new): fc_norm.weight, fc_norm.bias, head.weight, head.bias" in proc.stdout
    assert "micro batch 8 x accum 1 x 2 rank(s)" in proc.stdout
    summary = json.loads((ws / "runs/ft2/summary.json").read_text())
    assert 0.0 <= summary["top1"] <= 100.0 and summary["top5"] >= summary["top1"]
    best = json.loads((ws / "runs/ft2/best.json").read_text())
    assert best["top1"] == summary["best_top1"]
    # EMA weights are saved in the DeepSpeed client state
    import torch

    states = torch.load(ws / "runs/ft2/checkpoints/step00000006/mp_rank_00_model_states.pt", weights_only=False)
    assert "ema" in states and "head.weight" in states["ema"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ws / "runs/ft2/tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "eval/confusion_matrix" in acc.Tags()["images"]
    from PIL import Image

    assert Image.open(ws / "runs/ft2/confusion_matrix.png").size == (800, 800)
    assert {"train/loss", "eval/top1", "eval/top5", "eval/ema_top1", "opt/lr", "throughput/images_per_sec"} <= tags


def test_eval_counts_every_sample_once_for_1_and_2_ranks(pretrained):
    ws = pretrained
    run_py([REPO / "launch/finetune.py", "--ds_config", ZERO2, "--config", "finetune.yaml",
            "finetune.init=runs/for_ft", "finetune.output_dir=runs/ft1", "finetune.max_steps=3"], cwd=ws)
    lines = (ws / "data/val.txt").read_text().splitlines()
    odd = ws / "data/val_odd.txt"  # 49 images: shards of 25 and 24
    odd.write_text("\n".join(lines[:49]) + "\n")
    one = run_py([REPO / "launch/evaluate.py", "runs/ft1", "--filelist", odd, "--batch-size", "8"], cwd=ws)
    two = _deepspeed([REPO / "launch/evaluate.py", "runs/ft1", "--filelist", odd, "--batch-size", "8"], cwd=ws)
    r1 = json.loads(one.stdout.strip().splitlines()[-1])
    r2 = json.loads([x for x in two.stdout.splitlines() if x.startswith("{")][-1])
    assert r1["count"] == r2["count"] == 49
    assert r1["top1"] == pytest.approx(r2["top1"]) and r1["top5"] == pytest.approx(r2["top5"])


def test_evaluate_errors_are_one_line(pretrained, tmp_path):
    ws = pretrained
    proc = run_py([REPO / "launch/evaluate.py", "runs/for_ft"], cwd=ws, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: runs/for_ft has no classifier head")
    proc = run_py([REPO / "launch/evaluate.py", str(tmp_path / "nope")], cwd=ws, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope" in proc.stderr


def test_all_recipes_validate():
    recipes = sorted((REPO / "launch/recipes").glob("*.yaml"))
    assert len(recipes) >= 16
    for r in recipes:
        cfg = load_config(r)
        if "_mim" in r.name:
            assert cfg.objective.name == "mim"
        if "in1k_mapet" in r.name:
            assert (cfg.pretrain.global_batch_size, cfg.optim.lr, cfg.pretrain.epochs) == (2048, 1.5e-3, 300)
    pet = load_config(REPO / "launch/recipes/vit_base_in1k_pet.yaml")
    mapet = load_config(REPO / "launch/recipes/vit_base_in1k_mapet.yaml")
    # the fair comparison: only the objective (and the run dir) differ
    a, b = pet.model_dump(), mapet.model_dump()
    for d in (a, b):
        d["objective"].pop("name")
        d["pretrain"].pop("output_dir")
    assert a == b


INIT_CHECK = """
import json, sys, torch
from mapet_ds.config import load_config
from mapet_ds.engine.dist import init_distributed
from mapet_ds.engine.finetune import build_trainer
from mapet_ds.interop.export import export_timm

export_timm("runs/for_ft", "exports/for_ft.pth")  # what launch/export.py writes
exported = torch.load("exports/for_ft.pth", weights_only=True)
cfg = load_config("finetune.yaml", ["finetune.init=runs/for_ft", "finetune.output_dir=runs/ft_init"])
trainer, step = build_trainer(cfg, sys.argv[1], init_distributed())
model = trainer.module.state_dict()
ema = step.ema.module.state_dict()
same = [k for k, v in exported.items() if k in model and torch.equal(model[k], v) and torch.equal(ema[k], v)]
print(json.dumps({"exported": sorted(exported), "same": sorted(same), "model": sorted(model)}))
"""


def test_finetune_starts_from_exactly_the_exported_backbone(pretrained):
    """The classifier the fine-tune trains (and its EMA) holds, at step 0, the exported backbone bitwise:
    every exported tensor but the pre-training final norm (replaced by fc_norm), nothing else new."""
    ws = pretrained
    (ws / "exports").mkdir(exist_ok=True)
    proc = run_py(["-c", INIT_CHECK, ZERO2], cwd=ws)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(res["exported"]) - set(res["same"]) == {"norm.weight", "norm.bias"}
    assert len(res["same"]) == len(res["exported"]) - 2 > 20
    assert set(res["model"]) - set(res["same"]) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
