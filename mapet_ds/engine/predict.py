"""Top-k predictions for image files and folders: the eval view through DALI, then the classifier.

    python launch/predict.py runs/finetune photos/ cat.jpg --topk 5 [--json]
    python launch/predict.py exports/mapet_b_timm photos/          # a --timm-dir folder

The model is a fine-tuning checkpoint (run dir, tag, best.pt, exported .pth; its config.yaml
gives the architecture and the eval view) or a timm Hub folder written by
``launch/export.py --timm-dir`` (its ``pretrained_cfg`` gives the view, ``label_names``
the class names). Class names otherwise come from the run's classes.txt (or the one beside
its ``data.train_list``); without any, classes are printed as ``class_<i>``.

An image that cannot be read or decoded is listed as one ``error:`` line on stderr and
skipped; the others are still predicted (exit code 1 when any was skipped).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from mapet_ds.config import ConfigArgumentParser, ConfigError, load_config
from mapet_ds.filelist import FileList

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pnm", ".ppm", ".pgm", ".jp2"}


@dataclass
class Predictor:
    model: torch.nn.Module  # images [B, 3, S, S] -> logits [B, C]
    names: list[str]
    img_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _is_timm_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file())


def load_predictor(src: str, *, config: Optional[str] = None, use_ema: bool = False) -> Predictor:
    """A classifier and its eval view from a checkpoint or a timm Hub folder."""
    import timm

    from mapet_ds.interop.export import CheckpointError, load_any_checkpoint, timm_spec
    from mapet_ds.interop.hub import find_class_names

    path = Path(src)
    if _is_timm_dir(path):
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
        pc = model.pretrained_cfg
        names = json.loads((path / "config.json").read_text(encoding="utf-8")).get("label_names")
        size, crop_pct = int(pc["input_size"][-1]), float(pc.get("crop_pct", 0.875))
        interp, mean, std = pc.get("interpolation", "bicubic"), tuple(pc["mean"]), tuple(pc["std"])
    else:
        state, meta = load_any_checkpoint(src, use_ema=use_ema)
        if "head.weight" not in state:
            raise CheckpointError(f"{src} has no classification head: predict needs a fine-tuned checkpoint")
        beside = path.parent / "config.yaml"
        cfg_path = config or meta.get("config") or (str(beside) if path.is_file() and beside.is_file() else None)
        cfg = load_config(cfg_path) if cfg_path else load_config(None)
        name, kwargs = timm_spec(state, cfg.model if cfg_path else None)
        model = timm.create_model(name, pretrained=False, **kwargs)
        model.load_state_dict(state, strict=True)
        names = find_class_names(src, cfg if cfg_path else None)
        size, crop_pct, interp = kwargs["img_size"], cfg.data.crop_pct, cfg.data.interpolation
        mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
    n = model.num_classes
    if not names or len(names) != n:
        names = [f"class_{i}" for i in range(n)]
    if isinstance(names, dict):  # timm allows {index: name} with gaps
        names = [str(names.get(str(i), names.get(i, f"class_{i}"))) for i in range(n)]
    return Predictor(model.eval(), list(names), size, crop_pct, interp, mean, std)


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Image files given or found (recursively, sorted) under given folders -> (files, errors).

    Inside folders only regular files with an image suffix count (links are not followed);
    a named file is taken whatever its suffix. Missing paths become error lines.
    """
    files, errors = [], []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):  # os.walk does not follow links to folders
                dirnames.sort()
                for f in filenames:
                    q = Path(dirpath) / f
                    if q.suffix.lower() in IMAGE_SUFFIXES and stat.S_ISREG(os.lstat(q).st_mode):
                        found.append(q)
            if not found:
                errors.append(f"{p}: no image files in this folder")
            files += sorted(found)
        elif p.is_file():
            files.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    return files, errors


def _file_list(files: Sequence[Path]) -> FileList:
    paths = [os.path.relpath(f.resolve(), "/") for f in files]
    return FileList(list_path=Path("<predict inputs>"), root=Path("/"), paths=paths, labels=[0] * len(paths),
                    lines=None)


def _unreadable(f: Path, decode: bool) -> Optional[str]:
    """``<file>: <what is wrong>`` when PIL cannot open (``decode``: decode) ``f``, else None."""
    from mapet_ds.pipelines.common import find_broken

    fl = _file_list([f])
    msg = find_broken(fl, [0], decode=decode)
    return None if msg is None else f"{f}: {msg[len(fl.where(0)) + 2:]}"


def predict(pred: Predictor, files: Sequence[Path], *, topk: int = 5, batch_size: int = 32, device: str = "auto",
            num_threads: int = 2, progress: bool = True):
    """Yield (file, [(name, class index, probability)] top-k) or (file, error line) per file, in order.

    A decode failure stops the DALI pipeline; the broken file is found with PIL, reported,
    and the pipeline rebuilt over the files not yet predicted.
    """
    from tqdm import tqdm

    from mapet_ds.pipelines import eval_loader
    from mapet_ds.pipelines.common import PipelineRunError

    # header check first (cheap): files PIL cannot even open never reach DALI
    todo, results = [], {}
    for i, f in enumerate(files):
        bad = _unreadable(f, decode=False)
        if bad is None:
            todo.append(i)
        else:
            results[i] = bad
    k = min(topk, len(pred.names))
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, file=sys.stderr)
    bar.update(len(results))
    emitted = 0

    def flush():
        nonlocal emitted
        while emitted < len(files) and emitted in results:
            yield files[emitted], results.pop(emitted)
            emitted += 1

    while todo:
        fl = _file_list([files[i] for i in todo])
        try:
            loader = eval_loader(fl, img_size=pred.img_size, batch_size=min(batch_size, len(todo)), shard_id=0,
                                 num_shards=1, num_threads=num_threads, device=device, crop_pct=pred.crop_pct,
                                 interpolation=pred.interpolation, mean=pred.mean, std=pred.std)
            for batch in loader:
                pred.model.to(batch["images"].device)  # the GPU in mixed mode; a no-op after the first
                with torch.no_grad():
                    probs = pred.model(batch["images"]).float().softmax(-1)
                top_p, top_i = probs.topk(k, dim=-1)
                for row, (sid, valid) in enumerate(zip(batch["sample_ids"].tolist(), batch["valid"].tolist())):
                    if not valid:
                        continue
                    results[todo[sid]] = [(pred.names[c], int(c), float(p))
                                          for p, c in zip(top_p[row].tolist(), top_i[row].tolist())]
                    bar.update(1)
                yield from flush()
            todo = []
        except PipelineRunError as err:
            # which file: the first of the rest that PIL cannot decode
            rest = [i for i in todo if i >= emitted and i not in results]
            bad = next(((i, m) for i in rest if (m := _unreadable(files[i], decode=True)) is not None), None)
            if bad is None:
                raise err
            results[bad[0]] = bad[1]
            bar.update(1)
            todo = [i for i in rest if i != bad[0]]
            yield from flush()
    bar.close()
    yield from flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ConfigArgumentParser(description="top-k class names and probabilities for images and folders",
                              default_config=lambda ns: _run_config(ns.checkpoint))
    ap.add_argument("checkpoint", help="fine-tuning run dir, tag dir, best.pt / exported .pth, or a timm folder "
                                       "(launch/export.py --timm-dir)")
    ap.add_argument("images", nargs="*", help="image files and folders (searched recursively)")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="one JSON object per image on stdout (JSON lines)")
    ap.add_argument("--config", default=None, help="config of the run (default: its config.yaml)")
    ap.add_argument("--ema", action="store_true", help="the EMA weights of a checkpoint")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto (GPU decode + model when CUDA is there) | cpu | mixed")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if not args.images:
        ap.error("give at least one image file or folder")
    if args.topk < 1 or args.batch_size < 1:
        ap.error("--topk and --batch-size must be >= 1")
    from mapet_ds.interop.export import CheckpointError
    from mapet_ds.pipelines.common import PipelineRunError

    try:
        pred = load_predictor(args.checkpoint, config=args.config, use_ema=args.ema)
    except (CheckpointError, ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files, errors = expand_inputs(args.images)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    failed = len(errors)
    try:
        for f, res in predict(pred, files, topk=args.topk, batch_size=args.batch_size, device=args.device,
                              num_threads=args.num_threads, progress=not args.no_progress):
            if isinstance(res, str):
                failed += 1
                print(f"error: {res}", file=sys.stderr)
                if args.json:
                    print(json.dumps({"image": str(f), "error": res}), flush=True)
                continue
            if args.json:
                print(json.dumps({"image": str(f), "topk": [{"class": n, "index": c, "prob": round(p, 6)}
                                                            for n, c, p in res]}), flush=True)
            else:
                print(f"{f}: " + ", ".join(f"{n} {p:.3f}" for n, _, p in res), flush=True)
    except (PipelineRunError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def _run_config(src: str) -> Optional[str]:
    p = Path(src)
    for cand in (p / "config.yaml", p.parent / "config.yaml", p.parent.parent / "config.yaml"):
        if cand.is_file():
            return str(cand)
    return None
