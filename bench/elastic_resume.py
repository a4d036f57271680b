"""Cost of an elastic resume: DeepSpeed universal conversion of a ViT-B MaPeT checkpoint.

One process, one CPU rank (gloo), random weights: build the ViT-B pre-training model of
``launch/recipes/vit_base_in1k_mapet.yaml`` in a ZeRO-2 engine, take one AdamW step (so
the optimizer holds moments), save a checkpoint, convert it to the universal format the
way an elastic resume does (``mapet_ds.engine.elastic.universal_dir``, DeepSpeed's
``ds_to_universal`` with one worker), then load the universal folder into a fresh ZeRO-2
engine. Prints one JSON object as its last line (seconds and sizes).

    .venv/bin/python bench/elastic_resume.py [--out /tmp/elastic_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch  # noqa: E402

if not torch.cuda.is_available():  # a GPU machine keeps DeepSpeed's CUDA accelerator
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

from mapet_ds.config import load_config  # noqa: E402
from mapet_ds.engine import elastic  # noqa: E402
from mapet_ds.engine.dist import init_distributed  # noqa: E402
from mapet_ds.engine.optim import build_optimizer  # noqa: E402
from mapet_ds.models.pretrain import PretrainModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _size_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def _engine(cfg, load_universal: bool):
    torch.manual_seed(0)
    model = PretrainModel(cfg.model, cfg.objective, cfg.tokenizer.vocab_size)
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "gradient_clipping": 3.0, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim), config=ds)
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/mapet_elastic_bench")
    ap.add_argument("--recipe", default=str(REPO / "launch/recipes/vit_base_in1k_mapet.yaml"))
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(args.recipe, [])
    init_distributed()

    engine = _engine(cfg, load_universal=False)
    n_params = sum(p.numel() for p in engine.module.parameters())
    dev = engine.device
    images = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size, device=dev)
    tokens = torch.randint(0, cfg.tokenizer.vocab_size, (2, cfg.model.num_patches), device=dev)
    plan = engine.module.sample_plan(2, dev, torch.Generator(device=dev).manual_seed(0))
    engine.backward(engine(images, tokens, plan)["loss"])
    engine.step()

    t0 = time.perf_counter()
    engine.save_checkpoint(str(out), tag="step00000001")
    t_save = time.perf_counter() - t0
    tag = out / "step00000001"
    (tag / "complete.json").write_text(json.dumps({"step": 1, "world_size": 1, "zero_stage": 2}))
    ckpt_gb = _size_gb(tag)

    t0 = time.perf_counter()
    uni = elastic.universal_dir(tag, rank=0)
    t_convert = time.perf_counter() - t0
    uni_gb = _size_gb(uni)
    del engine

    fresh = _engine(cfg, load_universal=True)
    t0 = time.perf_counter()
    fresh.load_checkpoint(str(tag), tag=uni.name, load_optimizer_states=True, load_lr_scheduler_states=False)
    t_load = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"model": "vit_base MaPeT pre-training (random weights)", "params_m": round(n_params / 1e6, 1),
                      "checkpoint_gb": round(ckpt_gb, 2), "universal_gb": round(uni_gb, 2),
                      "save_s": round(t_save, 1), "convert_s": round(t_convert, 1),
                      "load_universal_s": round(t_load, 1), "device": f"{dev.type}, 1 rank, ZeRO-2, fp32"}))


if __name__ == "__main__":
    main()
