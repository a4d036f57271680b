"""The embedded demo: what self-supervised pre-training buys, on 2 CPU cores.

Each stage runs the same command-line tool a user would run (so the demo exercises
them), as a subprocess: ``deepspeed --num_gpus N`` when GPUs are present, plain
``python`` (one DeepSpeed rank, gloo) on CPU. Finished stages are skipped on a rerun.

1. ``data/make_demo.py``: 10 classes, 2,600 train + 500 val images;
2. ``launch/tokens.py fit/assign``: pixel k-means tokens of per-patch luma (structure
   tokens: colour is random in this data, so tokens must not encode it);
3. ``launch/pretrain.py``: MaPeT on all 2,600 train images, labels unused;
4. ``launch/finetune.py``, twice, on a stratified subset of 20 labelled images per class
   (written to ``data/train_few_seed<S>.txt``): from the pre-trained weights (layer decay)
   and from scratch (no layer decay: there are no pre-trained lower layers to protect).
   The figure reported is the *final* evaluation (no checkpoint is selected on val);
5. frozen features, all 2,600 labels: k-NN (``launch/evaluate.py --knn``) and a linear
   probe (``launch/linprobe.py``) of the pre-trained backbone and of a random one.

    python launch/demo.py                 # ~10 min on 2 quiet CPU cores
    python launch/demo.py --small         # CI size (or MAPET_DEMO_SMALL=1)
    python launch/demo.py --seed 1        # another labelled subset + fine-tune seed; the rest is reused
    python launch/demo.py --seed 1 --finetune-only   # only stage 4 (after a finished demo): seed spread
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
PIXEL_NORM = "luma"
POOL = "cls"  # frozen-feature probes read [CLS]: on this data it probes better than the mean (README)

SIZES = {
    # images per class (train, val), labelled images per class for fine-tuning, demo image size,
    # k-means k, pretrain / fine-tune steps, batch; linear probe steps and batch on cached
    # features (full: 90 epochs of 2,600 at 128, MAE's epoch count; each step is one small matmul)
    "full": dict(train=260, val=50, labels=20, size=80, k=256, pretrain_steps=500, finetune_steps=200,
                 batch=64, linprobe_steps=1800, linprobe_batch=128),
    "small": dict(train=12, val=4, labels=4, size=64, k=32, pretrain_steps=16, finetune_steps=6,
                  batch=16, linprobe_steps=6, linprobe_batch=16),
}


def _launcher(script: Path) -> list[str]:
    import torch

    n = torch.cuda.device_count()
    if n > 0:
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(n), str(script)]
    return [sys.executable, str(script)]


def _run(cmd: list[str], log: Path, title: str, times: dict) -> list[str]:
    """Run one stage, its output appended to ``log``; returns its stdout lines."""
    print(f"\n== {title}\n   $ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.perf_counter()
    lines = []
    with open(log, "a", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for line in proc.stdout:
            f.write(line)
            lines.append(line)
            if line.startswith(("[pretrain]", "[finetune]", "[linprobe]", "demo dataset", "error:", "{")) \
                    or "perplexity" in line:
                print("   " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"demo: '{title}' failed (exit {rc}); see {log}")
    times[title] = round(time.perf_counter() - t0, 1)
    print(f"   done in {times[title]:.0f} s", flush=True)
    return lines


def _losses(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _finished_pretrain(run_dir: Path, steps: int) -> bool:
    return (run_dir / "checkpoints" / ckpt.tag_for(steps) / ckpt.MARKER).is_file()


def _pretrain_steps_of(run_dir: Path) -> Optional[int]:
    """pretrain.max_steps of an existing run (its config.yaml), None when there is none."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    return ((yaml.safe_load(path.read_text()) or {}).get("pretrain") or {}).get("max_steps")


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, obj: dict) -> None:
    from mapet_ds.safe_io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def stratified_subset(list_path: Path, per_class: int, seed: int, out: Path) -> dict:
    """Write ``per_class`` images of every class of ``list_path`` (drawn with ``seed``) to ``out``.

    The subset keeps the list's order and root (``out`` is written beside it), so sample
    ids differ but paths and labels are the original ones. Returns its description.
    """
    import numpy as np

    from mapet_ds.filelist import FileListError, read_filelist, write_filelist

    fl = read_filelist(list_path)
    labels = np.asarray(fl.labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(fl.num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise FileListError(f"{list_path}: class {c} has {len(idx)} images, fewer than the {per_class} "
                                f"labelled images per class the demo fine-tunes on")
        keep.extend(rng.choice(idx, per_class, replace=False).tolist())
    keep.sort()
    if Path(out).resolve().parent != Path(list_path).resolve().parent:
        raise ValueError("the subset list must sit beside the full list (same image root)")
    write_filelist(out, [(fl.paths[i], int(fl.labels[i])) for i in keep])
    return {"list": str(out), "per_class": per_class, "seed": seed, "num_images": len(keep),
            "num_classes": fl.num_classes, "from": str(list_path)}


def _knn(init: str, config: Path, data: Path, out: Path, log: Path, times: dict, title: str) -> dict:
    """k-NN top-1 of frozen [CLS] features, memory bank = all labelled train images."""
    res = _read_json(out)
    if res is None:
        lines = _run(_launcher(REPO / "launch/evaluate.py") + [
            init, "--knn", "--pool", POOL, "--config", str(config), "--train-list", str(data / "train.txt"),
            "--filelist", str(data / "val.txt")], log, title, times)
        res = json.loads([x for x in lines if x.startswith("{")][-1])
        _write_json(out, res)
    return res


def _linprobe(init: str, data: Path, out: Path, steps: int, batch: int, log: Path, times: dict,
              title: str) -> Optional[dict]:
    """Linear probe (cached frozen [CLS] features, all labels); None when launch/linprobe.py is absent."""
    script = REPO / "launch/linprobe.py"
    if not script.is_file() or not (RECIPES / "demo_linprobe.yaml").is_file():
        print(f"\n== {title}: skipped (launch/linprobe.py is not in this checkout)", flush=True)
        return None
    if not (out / "summary.json").is_file():
        _run(_launcher(script) + [
            "--config", str(RECIPES / "demo_linprobe.yaml"), f"linprobe.init={init}",
            f"data.train_list={data / 'train.txt'}", f"data.val_list={data / 'val.txt'}",
            f"linprobe.max_steps={steps}", f"linprobe.global_batch_size={batch}", f"linprobe.output_dir={out}", "linprobe.cache_features=true",
            f"linprobe.pool={POOL}"], log, title, times)
    return _read_json(out / "summary.json")


def _pct(x: Optional[float]) -> str:
    return "    n/a" if x is None else f"{x:6.2f}%"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="pre-train, then few-label fine-tuning, k-NN and linear probe vs "
                                             "scratch / random init, on the embedded demo dataset")
    ap.add_argument("--out", default="demo_out", help="where data, tokens, runs and logs go")
    ap.add_argument("--small", action="store_true", default=os.environ.get("MAPET_DEMO_SMALL") == "1",
                    help="tiny CI-size run (also MAPET_DEMO_SMALL=1)")
    ap.add_argument("--seed", type=int, default=0, help="labelled subset and fine-tuning seed")
    ap.add_argument("--finetune-only", action="store_true",
                    help="only the few-label fine-tune stage (both arms) for --seed, on a finished demo in --out; "
                         "prints its figures as one JSON line (for seed spreads)")
    ap.add_argument("--ds_config", default=DEFAULT_DS_CONFIG)
    ap.add_argument("--print-config", action="store_true",
                    help="print the configs of the demo's pre-training and fine-tuning runs (recipe + overrides + "
                         "defaults) as YAML and exit")
    args = ap.parse_args(argv)
    size = SIZES["small" if args.small else "full"]
    out = Path(args.out).resolve()
    log = out / "demo.log"
    data, tokens, runs = out / "data", out / "tokens" / "train", out / "runs"
    batch = size["batch"]
    pre = runs / "pretrain_mapet"
    few_list = data / f"train_few_seed{args.seed}.txt"
    # all train images, labels unused; tokenizer.pixel_norm refuses a store of an older demo (other tokens)
    pre_overrides = [f"data.train_list={data / 'train.txt'}", f"data.val_list={data / 'val.txt'}",
                     f"tokenizer.token_store={tokens}", f"tokenizer.vocab_size={size['k']}",
                     f"tokenizer.pixel_norm={PIXEL_NORM}", f"pretrain.output_dir={pre}",
                     f"pretrain.max_steps={size['pretrain_steps']}", f"pretrain.global_batch_size={batch}"]

    def ft_overrides(init: str, ft: Path) -> list[str]:
        # eval_every beyond the run: the only evaluation is the final one, so nothing is selected on val
        return [f"data.train_list={few_list}", f"data.val_list={data / 'val.txt'}",
                f"finetune.init={init}", f"finetune.output_dir={ft}", f"finetune.seed={args.seed}",
                f"finetune.max_steps={size['finetune_steps']}", f"finetune.global_batch_size={batch}",
                "finetune.eval_every=100000"]

    if args.print_config:
        from mapet_ds.config import config_yaml, load_config

        print(f"# launch/pretrain.py --config {RECIPES / 'demo_pretrain.yaml'} ...\n---")
        print(config_yaml(load_config(RECIPES / "demo_pretrain.yaml", pre_overrides)), end="")
        print(f"# launch/finetune.py --config {RECIPES / 'demo_finetune.yaml'} ... (from the pre-trained run)\n---")
        print(config_yaml(load_config(RECIPES / "demo_finetune.yaml",
                                      ft_overrides(str(pre), runs / f"finetune_pretrained_seed{args.seed}"))), end="")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(exist_ok=True)
    times: dict[str, float] = {}
    t_start = time.perf_counter()
    made_steps = _pretrain_steps_of(pre)
    if made_steps not in (None, size["pretrain_steps"]):
        # resuming it would bolt a new schedule onto a finished one (the lr jumps back up)
        print(f"error: {pre} is a {made_steps}-step pre-training of an older demo (this one runs "
              f"{size['pretrain_steps']}): delete {out} or pass another --out", file=sys.stderr)
        return 2
    if args.finetune_only and not _finished_pretrain(pre, size["pretrain_steps"]):
        print(f"error: --finetune-only needs a finished demo pre-training in {pre}: run the demo without it "
              f"first", file=sys.stderr)
        return 2
    if args.finetune_only:
        log = out / f"finetune_seed{args.seed}.log"  # seeds may run side by side

    if not (data / "val.txt").is_file():
        _run([sys.executable, str(REPO / "data/make_demo.py"), "--out", str(data), "--num-train-per-class",
              str(size["train"]), "--num-val-per-class", str(size["val"]), "--size", str(size["size"])],
             log, "1/6 make the demo dataset", times)
    if not (tokens / "meta.json").is_file() or not json.loads((tokens / "meta.json").read_text()).get("complete"):
        codebook = out / "tokens" / "codebook.pt"
        if not codebook.is_file():
            _run([sys.executable, str(REPO / "launch/tokens.py"), "fit", "--filelist", str(data / "train.txt"),
                  "--extractor", "pixel", "--pixel-norm", PIXEL_NORM, "--img-size", "64", "--patch-size", "8",
                  "--k", str(size["k"]), "--niter", "20", "--nredo", "1", "--out", str(codebook)], log,
                 "2/6 fit the pixel k-means tokenizer (faiss, per-patch luma)", times)
        _run([sys.executable, str(REPO / "launch/tokens.py"), "assign", "--filelist", str(data / "train.txt"),
              "--codebook", str(codebook), "--out", str(tokens)], log, "2/6 write the token store", times)

    if not _finished_pretrain(pre, size["pretrain_steps"]):
        _run(_launcher(REPO / "launch/pretrain.py") + [
            "--ds_config", args.ds_config, "--config", str(RECIPES / "demo_pretrain.yaml"), *pre_overrides],
            log, "3/6 pre-train MaPeT with DeepSpeed (all train images, no labels)", times)

    few = stratified_subset(data / "train.txt", size["labels"], args.seed, few_list)
    finetune = {}
    for arm, init, recipe in (("pretrained", str(pre), "demo_finetune.yaml"),
                              ("scratch", "", "demo_finetune_scratch.yaml")):
        ft = runs / f"finetune_{arm}_seed{args.seed}"
        if not (ft / "summary.json").is_file():
            _run(_launcher(REPO / "launch/finetune.py") + [
                "--ds_config", args.ds_config, "--config", str(RECIPES / recipe), *ft_overrides(init, ft)],
                log, f"4/6 fine-tune the {'pre-trained' if init else 'randomly initialised'} ViT on "
                     f"{few['num_images']} labelled images", times)
        finetune[arm] = _read_json(ft / "summary.json")  # the final evaluation of that run
    if args.finetune_only:
        print(json.dumps({"seed": args.seed, "subset": few["list"], "stage_seconds": times,
                          **{f"finetune_top1_{a}": round(r["top1"], 2) for a, r in finetune.items()},
                          **{f"finetune_top5_{a}": round(r["top5"], 2) for a, r in finetune.items()}}), flush=True)
        return 0

    pre_cfg = pre / "config.yaml"
    knn = {"pretrained": _knn(str(pre), pre_cfg, data, runs / "knn_pretrained.json", log, times,
                              "5/6 k-NN on frozen [CLS] features: pre-trained"),
           "random": _knn("random", pre_cfg, data, runs / "knn_random.json", log, times,
                          "5/6 k-NN on frozen [CLS] features: random init")}
    probe = {arm: _linprobe(init, data, runs / f"linprobe_{arm}", size["linprobe_steps"], size["linprobe_batch"],
                            log, times, f"6/6 linear probe on frozen [CLS] features: {title}")
             for arm, init, title in (("pretrained", str(pre), "pre-trained"), ("random", "random", "random init"))}

    losses = _losses(pre)
    k = max(1, len(losses) // 10)
    start = sum(r["loss"] for r in losses[:k]) / k
    end = sum(r["loss"] for r in losses[-k:]) / k

    def r2(x):
        return None if x is None else round(float(x), 2)

    pictures = {"pretrain_reconstructions": str(pre / "vis"),
                "confusion_matrices": [str(runs / f"finetune_{a}_seed{args.seed}" / "confusion_matrix.png")
                                       for a in finetune]}
    summary = {
        "pretrain_loss_start": round(start, 4), "pretrain_loss_end": round(end, 4),
        "pretrain_token_acc_end": round(sum(r["acc"] for r in losses[-k:]) / k, 4),
        "pixel_norm": PIXEL_NORM, "probe_pool": POOL,
        "subset": few, "seed": args.seed,
        "finetune_top1_pretrained": r2(finetune["pretrained"]["top1"]),
        "finetune_top1_scratch": r2(finetune["scratch"]["top1"]),
        "finetune_top5_pretrained": r2(finetune["pretrained"]["top5"]),
        "finetune_top5_scratch": r2(finetune["scratch"]["top5"]),
        "finetune_reported": "final evaluation (no selection on val)",
        "knn_top1_pretrained": r2(knn["pretrained"]["knn_top1"]), "knn_top1_random": r2(knn["random"]["knn_top1"]),
        "linprobe_top1_pretrained": r2((probe["pretrained"] or {}).get("top1")),
        "linprobe_top1_random": r2((probe["random"] or {}).get("top1")),
        "chance_top1": 10.0, "val_images": knn["pretrained"]["count"], "train_images": knn["pretrained"]["num_train"],
        "tensorboard": f"tensorboard --logdir {runs}", "checkpoints": str(pre / "checkpoints"),
        "pictures": pictures, "stage_seconds": times, "wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    _write_json(out / "summary.json", summary)
    print("\n== summary")
    print(f"   pre-training loss (MaPeT, mean of first/last 10% of steps): {start:.3f} -> {end:.3f}")
    n_val, n_train = summary["val_images"], summary["train_images"]
    rows = [(f"fine-tune, {few['per_class']} labels/class (final eval)", "finetune", "scratch"),
            (f"k-NN (k=20), frozen [CLS], {n_train} labels", "knn", "random"),
            (f"linear probe, frozen [CLS], {n_train} labels", "linprobe", "random")]
    print(f"   top-1 on {n_val} val images (chance 10%), labelled subset seed {args.seed}:")
    print(f"   {'':44s} {'pre-trained':>12s} {'scratch/random':>15s}")
    for title, key, other in rows:
        print(f"   {title:44s} {_pct(summary[f'{key}_top1_pretrained']):>12s} "
              f"{_pct(summary[f'{key}_top1_{other}']):>15s}")
    print(f"   pictures: {pictures['pretrain_reconstructions']}/*.png (pre-training predictions), "
          f"{runs}/finetune_*_seed{args.seed}/confusion_matrix.png")
    print(f"   TensorBoard: {summary['tensorboard']}")
    print(f"   checkpoints: {summary['checkpoints']}")
    print(f"   summary: {out / 'summary.json'}; full log: {log}; total {summary['wall_time_s']:.0f} s")
    return 0
