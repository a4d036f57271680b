"""A checkpoint as a timm Hub folder: ``config.json`` + ``model.safetensors``, written by timm.

timm's own ``save_for_hf`` writes the folder (nothing is hand-written), so
``timm.create_model("local-dir:OUT", pretrained=True)`` loads it and
``timm.models.push_to_hf_hub`` can publish it. ``pretrained_cfg`` carries our eval view
(mean, std, crop_pct, interpolation, input_size), so ``timm.data.resolve_data_config`` +
``create_transform`` rebuild the evaluation transform; classifiers also carry
``num_classes`` and their class names (``label_names``).
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from mapet_ds.config import RunConfig, load_config
from mapet_ds.interop.export import CheckpointError, load_any_checkpoint, timm_spec
from mapet_ds.safe_io import InputGuard, UnsafeWriteError

HUB_FILES = ("config.json", "model.safetensors")


def read_class_names(path: str | os.PathLike) -> list[str]:
    """classes.txt: one name per line (line i names class i); blank lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"class names {path}: unreadable ({e.__class__.__name__}: {e})") from None
    return [c.strip() for c in text.splitlines() if c.strip()]


def find_class_names(src: str | os.PathLike, cfg: Optional[RunConfig]) -> Optional[list[str]]:
    """The run's class names: ``<run>/classes.txt``, else the classes.txt beside the run's
    ``data.train_list`` (the file list convention), else the train shards' classes."""
    src = Path(src)
    for run in (src, src.parent, src.parent.parent):
        if (run / "classes.txt").is_file() and ((run / "config.yaml").is_file() or run == src):
            return read_class_names(run / "classes.txt")
    if cfg is None:
        return None
    d = cfg.data
    if d.train_list:
        root = Path(d.train_list).parent
        if (root / "classes.txt").is_file():
            return read_class_names(root / "classes.txt")
    if d.train_shards:
        try:
            from mapet_ds.pipelines.shardset import open_shards

            return open_shards(d.train_shards).classes
        except (ValueError, OSError):
            return None
    return None


def eval_data_config(cfg: Optional[RunConfig], img_size: int, in_chans: int = 3) -> dict:
    """Our eval view in timm's data-config terms (``resolve_data_config`` arguments)."""
    d = (cfg or RunConfig()).data
    return {"input_size": (in_chans, img_size, img_size), "mean": tuple(d.mean), "std": tuple(d.std),
            "crop_pct": float(d.crop_pct), "interpolation": d.interpolation, "crop_mode": "center"}


def export_timm_dir(src: str | os.PathLike, out_dir: str | os.PathLike, *, kind: Optional[str] = None,
                    config_path: Optional[str | os.PathLike] = None, use_ema: bool = False,
                    release: Optional[bool] = None, require_complete: bool = True,
                    class_names: Optional[list[str]] = None) -> dict:
    """Write the timm Hub folder ``out_dir`` for checkpoint ``src``; return a summary dict.

    kind: "classifier" (needs a head), "backbone" (head dropped) or None (classifier when
    the checkpoint has a head). The folder is written under a temporary name beside
    ``out_dir`` and renamed into place, so a crash never leaves a half folder there; an
    existing non-empty ``out_dir`` is refused, never overwritten.
    """
    import timm
    from timm.models import save_for_hf

    out = Path(out_dir)
    guard = InputGuard().add(config_path, "the --config file")
    if (Path(src) / "checkpoints").is_dir():
        guard.add(Path(src) / "checkpoints", "the checkpoints being exported")
    else:
        guard.add(src, "the checkpoint being exported")
    guard.check_folder(out, HUB_FILES, "--timm-dir")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UnsafeWriteError(f"--timm-dir {out} exists and is not an empty folder: choose a new folder")
    state, meta = load_any_checkpoint(src, use_ema=use_ema, release=release, require_complete=require_complete)
    beside = Path(src).parent / "config.yaml"  # a run's best.pt / an exported file in its run dir
    config_path = config_path or meta.get("config") or (str(beside) if Path(src).is_file() and beside.is_file() else None)
    cfg = load_config(config_path) if config_path else None
    has_head = "head.weight" in state
    kind = kind or ("classifier" if has_head else "backbone")
    if kind == "classifier" and not has_head:
        raise CheckpointError(f"{src} is a {meta['module']} checkpoint without a classification head: export it "
                              f"with --kind backbone, or fine-tune it first")
    if kind == "backbone":
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    name, kwargs = timm_spec(state, cfg.model if cfg is not None else None)
    # timm's factory records the build arguments that save_for_hf writes as model_args
    model = timm.create_model(name, pretrained=False, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights do not load into timm {name}: {str(err).splitlines()[0]}") from None
    model_config: dict = {}
    if kind == "classifier":
        names = class_names if class_names is not None else find_class_names(src, cfg)
        if names is not None:
            if len(names) != model.num_classes:
                raise CheckpointError(f"{len(names)} class names for a {model.num_classes}-class head: pass the "
                                      f"classes.txt of the fine-tuning data (--class-names)")
            model_config["label_names"] = list(names)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # exclusive, never a pre-placed link
    try:
        view = eval_data_config(cfg, kwargs["img_size"], kwargs["in_chans"])
        # older timm (no data_config argument) writes model.pretrained_cfg as it is: set the view there too
        model.pretrained_cfg = {**model.pretrained_cfg, **view}
        extra = {"data_config": view} if "data_config" in inspect.signature(save_for_hf).parameters else {}
        save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True, **extra)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        os.replace(tmp, out)  # onto a missing or empty folder: atomic
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: made above
        raise
    return {"dir": str(out), "architecture": name, "kind": kind, "num_classes": model.num_classes,
            "label_names": "label_names" in model_config, "source": meta.get("resolved"),
            "weights": meta.get("weights")}
