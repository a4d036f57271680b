"""The embedded demo: dataset -> tokenizer -> MaPeT pre-training -> fine-tuning -> evaluation.

Each stage runs the same command-line tool a user would run (so the demo exercises
them), as a subprocess: ``deepspeed --num_gpus N`` when GPUs are present, plain
``python`` (one DeepSpeed rank, gloo) on CPU. Finished stages are skipped on a rerun.

    python launch/demo.py                 # ~3k images, a few minutes on 2 CPU cores
    python launch/demo.py --small         # CI size (or MAPET_DEMO_SMALL=1)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from mapet_ds.engine import checkpoint as ckpt
from mapet_ds.engine.ds_config import DEFAULT_DS_CONFIG

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "launch" / "recipes"

SIZES = {
    # images per class (train, val), demo image size, k-means k, pretrain / finetune steps
    "full": dict(train=260, val=50, size=80, k=256, pretrain_steps=300, finetune_steps=240, batch=64),
    "small": dict(train=12, val=4, size=64, k=32, pretrain_steps=6, finetune_steps=6, batch=16),
}


def _launcher(script: Path) -> list[str]:
    import torch

    n = torch.cuda.device_count()
    if n > 0:
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(n), str(script)]
    return [sys.executable, str(script)]


def _run(cmd: list[str], log: Path, title: str) -> None:
    print(f"\n== {title}\n   $ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for line in proc.stdout:
            f.write(line)
            if line.startswith(("[pretrain]", "[finetune]", "demo dataset", "error:", "{")) or "perplexity" in line:
                print("   " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"demo: '{title}' failed (exit {rc}); see {log}")
    print(f"   done in {time.perf_counter() - t0:.0f} s", flush=True)


def _losses(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _finished_pretrain(run_dir: Path, steps: int) -> bool:
    return (run_dir / "checkpoints" / ckpt.tag_for(steps) / ckpt.MARKER).is_file()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="pre-train -> fine-tune -> evaluate on the embedded demo dataset")
    ap.add_argument("--out", default="demo_out", help="where data, tokens, runs and logs go")
    ap.add_argument("--small", action="store_true", default=os.environ.get("MAPET_DEMO_SMALL") == "1",
                    help="tiny CI-size run (also MAPET_DEMO_SMALL=1)")
    ap.add_argument("--ds_config", default=DEFAULT_DS_CONFIG)
    ap.add_argument("--print-config", action="store_true",
                    help="print the configs of the demo's pre-training and fine-tuning runs (recipe + overrides + "
                         "defaults) as YAML and exit")
    args = ap.parse_args(argv)
    size = SIZES["small" if args.small else "full"]
    out = Path(args.out).resolve()
    log = out / "demo.log"
    data, tokens, runs = out / "data", out / "tokens" / "train", out / "runs"
    common = [f"data.train_list={data / 'train.txt'}", f"data.val_list={data / 'val.txt'}"]
    batch = size["batch"]
    pre = runs / "pretrain_mapet"
    pre_overrides = [*common, f"tokenizer.token_store={tokens}", f"tokenizer.vocab_size={size['k']}",
                     f"pretrain.output_dir={pre}", f"pretrain.max_steps={size['pretrain_steps']}",
                     f"pretrain.global_batch_size={batch}"]

    def ft_overrides(init: str, ft: Path) -> list[str]:
        return [*common, f"finetune.init={init}", f"finetune.output_dir={ft}",
                f"finetune.max_steps={size['finetune_steps']}", f"finetune.global_batch_size={batch}"]

    if args.print_config:
        from mapet_ds.config import config_yaml, load_config

        print(f"# launch/pretrain.py --config {RECIPES / 'demo_pretrain.yaml'} ...\n---")
        print(config_yaml(load_config(RECIPES / "demo_pretrain.yaml", pre_overrides)), end="")
        print(f"# launch/finetune.py --config {RECIPES / 'demo_finetune.yaml'} ... (from the pre-trained run)\n---")
        print(config_yaml(load_config(RECIPES / "demo_finetune.yaml", ft_overrides(str(pre), runs / "finetune_pretrained"))),
              end="")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    if not (data / "val.txt").is_file():
        _run([sys.executable, str(REPO / "data/make_demo.py"), "--out", str(data), "--num-train-per-class",
              str(size["train"]), "--num-val-per-class", str(size["val"]), "--size", str(size["size"])],
             log, "1/5 make the demo dataset")
    if not (tokens / "meta.json").is_file() or not json.loads((tokens / "meta.json").read_text()).get("complete"):
        codebook = out / "tokens" / "codebook.pt"
        if not codebook.is_file():
            _run([sys.executable, str(REPO / "launch/tokens.py"), "fit", "--filelist", str(data / "train.txt"),
                  "--extractor", "pixel", "--img-size", "64", "--patch-size", "8", "--k", str(size["k"]),
                  "--niter", "20", "--nredo", "1", "--out", str(codebook)], log, "2/5 fit the pixel k-means tokenizer (faiss)")
        _run([sys.executable, str(REPO / "launch/tokens.py"), "assign", "--filelist", str(data / "train.txt"),
              "--codebook", str(codebook), "--out", str(tokens)], log, "2/5 write the token store")

    if not _finished_pretrain(pre, size["pretrain_steps"]):
        _run(_launcher(REPO / "launch/pretrain.py") + [
            "--ds_config", args.ds_config, "--config", str(RECIPES / "demo_pretrain.yaml"), *pre_overrides],
            log, "3/5 pre-train MaPeT with DeepSpeed")

    results = {}
    for name, init in (("pretrained", str(pre)), ("scratch", "")):
        ft = runs / f"finetune_{name}"
        if not (ft / "summary.json").is_file():
            _run(_launcher(REPO / "launch/finetune.py") + [
                "--ds_config", args.ds_config, "--config", str(RECIPES / "demo_finetune.yaml"),
                *ft_overrides(init, ft)],
                log, f"4/5 fine-tune the {'pre-trained' if init else 'randomly initialised'} ViT")
        ev = subprocess.run(_launcher(REPO / "launch/evaluate.py") + [str(ft / "best.pt"), "--config",
                            str(ft / "config.yaml")], capture_output=True, text=True)
        if ev.returncode != 0:
            raise SystemExit(f"demo: evaluation of {ft} failed: {ev.stderr.strip()[-500:]}")
        results[name] = json.loads(ev.stdout.strip().splitlines()[-1])
        print(f"\n== 5/5 evaluate {ft / 'best.pt'}: top-1 {results[name]['top1']:.2f}%, "
              f"top-5 {results[name]['top5']:.2f}%", flush=True)

    losses = _losses(pre)
    k = max(1, len(losses) // 10)
    start = sum(r["loss"] for r in losses[:k]) / k
    end = sum(r["loss"] for r in losses[-k:]) / k
    summary = {
        "pretrain_loss_start": round(start, 4), "pretrain_loss_end": round(end, 4),
        "pretrain_token_acc_end": round(sum(r["acc"] for r in losses[-k:]) / k, 4),
        "finetune_top1_pretrained": round(results["pretrained"]["top1"], 2),
        "finetune_top1_scratch": round(results["scratch"]["top1"], 2),
        "finetune_top5_pretrained": round(results["pretrained"]["top5"], 2),
        "finetune_top5_scratch": round(results["scratch"]["top5"], 2),
        "chance_top1": 10.0, "val_images": results["pretrained"]["count"],
        "tensorboard": f"tensorboard --logdir {runs}", "checkpoints": str(pre / "checkpoints"),
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n== summary")
    print(f"   pre-training loss (MaPeT, mean of first/last 10% of steps): {start:.3f} -> {end:.3f}")
    print(f"   fine-tune top-1 on {summary['val_images']} val images: pre-trained "
          f"{summary['finetune_top1_pretrained']:.2f}% vs from scratch {summary['finetune_top1_scratch']:.2f}% "
          f"(chance 10%)")
    print(f"   TensorBoard: {summary['tensorboard']}")
    print(f"   checkpoints: {summary['checkpoints']}; fine-tuned weights: {runs}/finetune_*/best.pt")
    print(f"   summary: {out / 'summary.json'}; full log: {log}; total {summary['wall_time_s']:.0f} s")
    return 0
