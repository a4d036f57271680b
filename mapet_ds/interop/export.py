"""Any of our checkpoints -> one plain state dict with timm ``VisionTransformer`` names.

Sources :func:`load_any_checkpoint` understands::

    runs/pretrain                       run dir: newest complete tag of runs/pretrain/checkpoints
    runs/pretrain/checkpoints           DeepSpeed save dir (tags + ``latest``): newest complete tag
    runs/pretrain/checkpoints/step00000100   one tag (must hold complete.json)
    backbone.pth / model.pth.tar        plain file: our export, a timm state dict, or a dict
                                        holding it under "model"/"state_dict"/"module"
    vit_standard_base_patch16_224_KCLIP.tar   the MaPeT authors' fine-tuned release

DeepSpeed tags are read with DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``
(ZeRO 1/2/3: the fp32 master weights, merged over ranks); ZeRO-0 tags keep the full
weights in ``mp_rank_00_model_states.pt`` under ``module``. Only tags with the trainer's
``complete.json`` marker are picked (see mapet_ds.engine.checkpoint).

:func:`export_timm` writes the state dict (atomically) plus a JSON sidecar naming the
timm entry point and kwargs, and checks that ``timm.create_model(name, pretrained=False,
**kwargs).load_state_dict(sd, strict=True)`` works before it returns.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from mapet_ds.config import ModelConfig, load_config
from mapet_ds.engine.checkpoint import MARKER, complete_tags
from mapet_ds.interop.release import CheckpointError, convert_mapet_release, is_foreign_layout, strip_prefixes
from mapet_ds.safe_io import InputGuard, atomic_write

__all__ = [
    "CheckpointError", "load_any_checkpoint", "export_timm", "timm_spec", "convert_mapet_release",
    "resolve_source", "sidecar_path",
]

FORMAT = "mapet_ds.timm_state_dict/1"
_MODEL_STATES = "*_model_states.pt"
_TIMM_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|(norm|fc_norm|head)\.(weight|bias)"
    r"|blocks\.\d+\.((norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|ls[12]\.gamma))$"
)
# Containers that hold the state dict inside a checkpoint file, most specific first.
_CONTAINERS = ("model", "state_dict", "module", "model_state", "model_state_dict")
_EMA_CONTAINERS = ("ema", "model_ema", "state_dict_ema", "ema_state_dict")
_TIMM_SIZES = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
               1024: "vit_large_patch16_224"}


# ---------------------------------------------------------------------------------------
# Locating the checkpoint


def _is_tag_dir(p: Path) -> bool:
    return p.is_dir() and bool(glob.glob(os.path.join(glob.escape(str(p)), _MODEL_STATES)))


def resolve_source(path: str | os.PathLike, *, require_complete: bool = True) -> tuple[str, Path]:
    """-> ("deepspeed", tag_dir) or ("file", path). Never returns a tag without complete.json
    (unless ``require_complete=False``, for DeepSpeed checkpoints written by other code)."""
    p = Path(path)
    if p.is_file():
        if p.match(_MODEL_STATES):  # a DeepSpeed model-states file: read its whole tag
            return resolve_source(p.parent, require_complete=require_complete)
        return "file", p
    if not p.is_dir():
        raise CheckpointError(
            f"{p}: no such file or directory (expected a run dir, a checkpoint dir, a tag or a .pt file)"
        )
    if _is_tag_dir(p):
        if require_complete and not (p / MARKER).is_file():
            raise CheckpointError(
                f"{p} has no {MARKER}: that save did not finish on all ranks; pick an older tag, or the run dir "
                f"to get the newest complete one"
            )
        return "deepspeed", p
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    tags = [t for _, t in complete_tags(ckpt_dir)]
    if not tags:  # tags not named stepNNNNNNNN: any complete tag, newest marker last
        tags = sorted((t for t in ckpt_dir.iterdir() if _is_tag_dir(t) and (t / MARKER).is_file()),
                      key=lambda t: (t / MARKER).stat().st_mtime)
    if tags:
        return "deepspeed", tags[-1]
    if not require_complete and (ckpt_dir / "latest").is_file():
        tag = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
        if _is_tag_dir(tag):
            return "deepspeed", tag
    found = [t.name for t in ckpt_dir.iterdir() if _is_tag_dir(t)]
    if found:
        raise CheckpointError(
            f"{ckpt_dir}: no complete checkpoint (tags {', '.join(sorted(found)[:5])} lack {MARKER}: their saves "
            f"did not finish)"
        )
    raise CheckpointError(
        f"{p}: no DeepSpeed checkpoint tags (dirs with mp_rank_00_model_states.pt) and no checkpoints/ dir"
    )


# ---------------------------------------------------------------------------------------
# Reading


def _torch_load(path: Path, *, trusted: bool = False) -> Any:
    """torch.load on CPU; weights-only first, full unpickling only as a fallback (the user
    named this file: full unpickling runs code from it, so only load files you trust)."""
    if not trusted:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - e.g. numpy scalars or other objects in the file
            pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        msg = f"{type(err).__name__}: {str(err)[:120]}"
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({msg})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, source: Path, use_ema: bool) -> dict:
    """The tensor dict inside a checkpoint file (optionally its EMA copy)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    names = _EMA_CONTAINERS if use_ema else _CONTAINERS
    for name in names:
        inner = obj.get(name)
        if _is_state_dict(inner):
            return dict(inner)
        if isinstance(inner, dict) and _is_state_dict(inner.get("state_dict")):  # e.g. {"ema": {"state_dict": ...}}
            return dict(inner["state_dict"])
    if use_ema:
        raise CheckpointError(
            f"{source}: no EMA weights (looked for {', '.join(names)}; keys: {', '.join(map(str, list(obj)[:8]))})"
        )
    if _is_state_dict(obj):
        return dict(obj)
    raise CheckpointError(
        f"{source}: no state dict found (looked for {', '.join(_CONTAINERS)}; "
        f"top-level keys: {', '.join(map(str, list(obj)[:8]))})"
    )


def _quiet(fn, *args, **kwargs):
    """Run DeepSpeed's converter without its prints/progress bars; errors become one line."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"DeepSpeed could not merge the checkpoint: {msg[:300]}") from None


def _load_deepspeed(tag_dir: Path, use_ema: bool) -> tuple[dict, dict]:
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        model_file = Path(sorted(glob.glob(os.path.join(glob.escape(str(tag_dir)), _MODEL_STATES)))[0])
    states = _torch_load(model_file, trusted=True)  # DeepSpeed's own files hold pickled objects
    ds_cfg = states.get("ds_config") or {}
    meta = {
        "format": "deepspeed", "tag": tag_dir.name, "tag_dir": str(tag_dir),
        "zero_stage": (ds_cfg.get("zero_optimization") or {}).get("stage", 0),
        "world_size": states.get("dp_world_size"), "global_steps": states.get("global_steps"),
        "ds_version": states.get("ds_version"),
    }
    marker = tag_dir / MARKER
    if marker.is_file():
        try:
            meta["marker"] = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            pass
    if use_ema:
        return _unwrap(states, model_file, use_ema=True), dict(meta, weights="ema (client state)")
    if glob.glob(os.path.join(glob.escape(str(tag_dir)), "*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = _quiet(get_fp32_state_dict_from_zero_checkpoint, str(tag_dir.parent), tag=tag_dir.name)
        return dict(sd), dict(meta, weights="fp32 master weights (DeepSpeed zero_to_fp32)")
    module = states.get("module")
    if not _is_state_dict(module):
        raise CheckpointError(f"{model_file}: no 'module' weights and no *_optim_states.pt files beside it")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if any(v.dtype != torch.float32 for v in module.values() if v.is_floating_point()):
        masters = _stage0_fp32_masters(states.get("optimizer"), set(module))
        if masters is not None:
            sd.update(masters)
            return sd, dict(meta, weights="fp32 master weights (ZeRO-0 optimizer state)")
        return sd, dict(meta, weights="module weights (bf16/fp16 copies, upcast to fp32)")
    return sd, dict(meta, weights="module weights (fp32)")


def _stage0_fp32_masters(optim_state: Any, names: set[str]) -> Optional[dict]:
    """bf16/fp16 ZeRO-0 keeps fp32 masters as unnamed ``fp32_groups``; name them when the param
    groups carried ``param_names`` (layer_decay_param_groups adds them)."""
    if not isinstance(optim_state, dict) or "fp32_groups" not in optim_state:
        return None
    groups = (optim_state.get("optimizer_state_dict") or {}).get("param_groups") or []
    fp32 = optim_state["fp32_groups"]
    if len(groups) != len(fp32) or not all("param_names" in g for g in groups):
        return None
    out = {}
    for g, tensors in zip(groups, fp32):
        if len(g["param_names"]) != len(tensors):
            return None
        out.update({n: t.float() for n, t in zip(g["param_names"], tensors)})
    return out if set(out) <= names else None


def to_timm_names(state: dict) -> tuple[dict, str, list[str]]:
    """Our module's keys -> timm names. Returns (state, module kind, dropped keys).

    PretrainModel (``backbone.*``) -> the backbone with ``mask_token``/``lm_head`` (and
    anything else outside the backbone) dropped; a classifier is already in timm names.
    """
    state = strip_prefixes(state)
    if any(k.startswith("backbone.") for k in state):
        dropped = sorted(k for k in state if not k.startswith("backbone."))
        return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, "pretrain", dropped
    if is_foreign_layout(state):
        return convert_mapet_release(state), "classifier" if "head.weight" in state else "backbone", []
    return state, ("classifier" if "head.weight" in state else "backbone"), []


def _check_timm_keys(state: dict, source: str) -> None:
    bad = sorted(k for k in state if not _TIMM_KEY.match(k))
    if bad:
        raise CheckpointError(
            f"{source}: unknown checkpoint layout, unexpected keys {', '.join(bad[:4])}"
            f"{f' (+{len(bad) - 4} more)' if len(bad) > 4 else ''}; supported: mapet_ds/timm ViT (attn.qkv), "
            f"PretrainModel (backbone.*), the MaPeT release (attn.q + attn.kv), BEiT-style q_bias/v_bias, gamma_1/2"
        )
    for need in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight"):
        if need not in state:
            raise CheckpointError(f"{source}: not a ViT checkpoint of the supported layout (no '{need}')")


def load_any_checkpoint(path: str | os.PathLike, *, use_ema: bool = False, release: Optional[bool] = None,
                        require_complete: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a checkpoint (see module doc) -> (fp32 state dict in timm names, meta).

    ``release``: force (True) or forbid (False) the MaPeT-release conversion; None detects it
    by its separate ``attn.q``/``attn.kv`` keys. ``use_ema``: the EMA copy (client state
    "ema" of a DeepSpeed tag, "state_dict_ema" of a timm checkpoint).
    meta: format, tag, zero_stage, weights (which copy), module ("pretrain" | "classifier" |
    "backbone"), dropped (keys not in timm names), config (run dir's config.yaml or None).
    """
    kind, where = resolve_source(path, require_complete=require_complete)
    if kind == "deepspeed":
        raw, meta = _load_deepspeed(where, use_ema)
        cfg = where.parent.parent / "config.yaml"
        meta["config"] = str(cfg) if cfg.is_file() else None
    else:
        raw = _unwrap(_torch_load(where), where, use_ema)
        meta = {"format": "file", "weights": "ema" if use_ema else "as saved", "config": None}
    raw = strip_prefixes(raw)
    if release or (release is None and is_foreign_layout(raw)):
        state, module, dropped = convert_mapet_release(raw), "classifier", []
        meta["format"] = "mapet_release" if kind == "file" else meta["format"]
    else:
        state, module, dropped = to_timm_names(raw)
    _check_timm_keys(state, str(where))
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    meta.update(source=str(path), resolved=str(where), module=module, dropped=dropped,
                num_classes=int(state["head.weight"].shape[0]) if "head.weight" in state else 0)
    return state, meta


# ---------------------------------------------------------------------------------------
# timm spec and export


def _arch_from_state(state: dict) -> dict:
    w = state["patch_embed.proj.weight"]  # [D, C, p, p]
    dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    n = int(state["pos_embed"].shape[1]) - 1  # one class token, no registers
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise CheckpointError(f"pos_embed has {n} patch positions, not a square grid: only square inputs are supported")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    return dict(embed_dim=dim, in_chans=in_chans, patch_size=patch, img_size=grid * patch, depth=depth,
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim)


def timm_spec(state: dict, model_cfg: Optional[ModelConfig] = None) -> tuple[str, dict]:
    """(timm entry point, kwargs) that build a model whose state dict is exactly ``state``.

    Shapes come from the weights; ``num_heads`` (not visible in weights) and the layer-scale
    init come from ``model_cfg`` when given, else the ViT convention of 64-wide heads.
    The entry point only picks timm's VisionTransformer: every size argument is in kwargs.
    """
    arch = _arch_from_state(state)
    has_ls = "blocks.0.ls1.gamma" in state
    if model_cfg is not None:
        for field in ("embed_dim", "depth", "patch_size"):
            if getattr(model_cfg, field) != arch[field]:
                raise CheckpointError(
                    f"config model.{field}={getattr(model_cfg, field)} but the checkpoint has {field}={arch[field]}: "
                    f"pass the config of the run that wrote it"
                )
        heads = model_cfg.num_heads
        init_values = (model_cfg.layer_scale_init or 0.1) if has_ls else None
    else:
        if arch["embed_dim"] % 64:
            raise CheckpointError(
                f"embed_dim={arch['embed_dim']} is not a multiple of 64, so num_heads cannot be inferred: pass --config"
            )
        heads, init_values = arch["embed_dim"] // 64, (0.1 if has_ls else None)
    fc_norm = "fc_norm.weight" in state
    kwargs = dict(
        img_size=arch["img_size"], patch_size=arch["patch_size"], in_chans=arch["in_chans"],
        embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=heads, mlp_ratio=arch["mlp_ratio"],
        qkv_bias="blocks.0.attn.qkv.bias" in state, init_values=init_values, class_token=True,
        no_embed_class=False, global_pool="avg" if fc_norm else "token", fc_norm=fc_norm,
        num_classes=int(state["head.weight"].shape[0]) if "head.weight" in state else 0,
    )
    return _TIMM_SIZES.get(arch["embed_dim"], "vit_base_patch16_224"), kwargs


def sidecar_path(out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    if out.suffix == ".json":
        raise CheckpointError(
            f"output {out} ends in .json: that name is the sidecar's; use e.g. {out.with_suffix('.pth')}"
        )
    return out.with_suffix(".json")


def export_timm(src: str | os.PathLike, out_path: str | os.PathLike, *, kind: str = "backbone",
                model_cfg: Optional[ModelConfig] = None, config_path: Optional[str | os.PathLike] = None,
                use_ema: bool = False, release: Optional[bool] = None, require_complete: bool = True,
                verify: bool = True) -> dict:
    """Write ``out_path`` (one plain fp32 state dict, timm names) and its ``.json`` sidecar.

    kind="backbone": no head (num_classes=0); from a pre-training run it keeps the final
    ``norm`` (token pooling), from a classifier it keeps ``fc_norm`` (avg pooling).
    kind="classifier": needs a head (a fine-tuning run or the MaPeT release).
    The model config comes from ``model_cfg``, else ``config_path``, else the run dir's
    config.yaml, else it is inferred (64-wide heads). Returns the sidecar content.
    """
    if kind not in ("backbone", "classifier"):
        raise CheckpointError(f"kind={kind!r}: must be 'backbone' or 'classifier'")
    out, side = Path(out_path), sidecar_path(out_path)
    # An export next to its run (runs/pt/backbone.pth) is fine; onto the checkpoint it reads is not.
    if out.is_dir():
        raise CheckpointError(f"OUT {out} is a folder: give a file name such as {out / 'backbone.pth'}")
    guard = InputGuard().add(config_path, "the --config file")
    if (Path(src) / "checkpoints").is_dir():  # a run dir: an export beside the run is fine, onto its checkpoints not
        guard.add(Path(src) / "checkpoints", "the checkpoints being exported")
        guard.add(Path(src) / "config.yaml", "the config of the run being exported")
    else:
        guard.add(src, "the checkpoint being exported")
    for p in (out, side):
        guard.check(p, "OUT")
    state, meta = load_any_checkpoint(src, use_ema=use_ema, release=release, require_complete=require_complete)
    guard.add(meta.get("resolved"), "the checkpoint being exported").add(meta.get("config"), "the config of the run")
    for p in (out, side):
        guard.check(p, "OUT")
    if model_cfg is None:
        config_path = config_path or meta.get("config")
        if config_path:
            model_cfg = load_config(config_path).model
    if kind == "classifier":
        if "head.weight" not in state:
            raise CheckpointError(
                f"{src} is a {meta['module']} checkpoint without a classification head: export it with "
                f"--kind backbone, or fine-tune it first"
            )
    else:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    name, kwargs = timm_spec(state, model_cfg)
    if verify:  # the promise of this file: strict load into timm works
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise CheckpointError(f"exported weights do not load into timm {name}: {first}") from None
    atomic_write(out, lambda p: torch.save(state, p))
    info = {
        "format": FORMAT, "file": out.name, "kind": kind, "timm_model": name, "timm_kwargs": kwargs,
        "usage": (f"m = timm.create_model({name!r}, pretrained=False, **timm_kwargs); "
                  f"m.load_state_dict(torch.load({out.name!r}), strict=True)"),
        "features": ("forward_head(forward_features(x), pre_logits=True) = fc_norm(mean of patch tokens)"
                     if kwargs["global_pool"] == "avg" else
                     "forward_features(x)[:, 1:].mean(1) = mean of patch tokens after norm (MaPeT trains no CLS "
                     "objective: prefer it to the CLS token, as mapet_ds.analysis.knn does)"),
        "num_params": int(sum(v.numel() for v in state.values())),
        "source": {k: meta.get(k) for k in ("source", "resolved", "format", "tag", "zero_stage", "weights",
                                             "module", "global_steps", "config")},
        "dropped_keys": meta.get("dropped", []),
    }
    atomic_write(side, lambda p: p.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8"))
    return info
