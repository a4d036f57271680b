"""Export a checkpoint as one plain timm VisionTransformer state dict (+ JSON sidecar), or as a
timm Hub folder (--timm-dir: config.json + model.safetensors, written by timm's save_for_hf).

    # pre-training run -> backbone (newest complete checkpoint; the run's config.yaml is used)
    python launch/export.py runs/pretrain exports/backbone.pth
    # one tag of a fine-tuning run -> classifier
    python launch/export.py runs/finetune/checkpoints/step00001000 exports/vit.pth --kind classifier
    # the MaPeT authors' fine-tuned release -> our classifier format
    python launch/export.py --from-mapet-release vit_standard_base_patch16_224_KCLIP.tar exports/mapet_b.pth
    # a timm Hub folder (classifier when the checkpoint has a head; class names from the run's data)
    python launch/export.py runs/finetune --timm-dir exports/mapet_b_timm --ema

Then, in any program with timm::

    info = json.load(open("exports/vit.json"))
    model = timm.create_model(info["timm_model"], pretrained=False, **info["timm_kwargs"])
    model.load_state_dict(torch.load("exports/vit.pth"), strict=True)
    # or, from a --timm-dir folder (timm.models.push_to_hf_hub publishes the same folder)
    model = timm.create_model("local-dir:exports/mapet_b_timm", pretrained=True)
"""

from __future__ import annotations

import argparse
import json
import sys

from pathlib import Path

from mapet_ds.config import ConfigArgumentParser, ConfigError
from mapet_ds.interop.export import CheckpointError, export_timm, sidecar_path
from mapet_ds.safe_io import UnsafeWriteError


def _run_config(ns: argparse.Namespace):
    """--print-config without --config: the config.yaml of the run being exported (else defaults)."""
    if ns.from_mapet_release or not ns.paths:
        return None
    src = Path(ns.paths[0])
    for cand in (src / "config.yaml", src.parent / "config.yaml", src.parent.parent / "config.yaml"):
        if cand.is_file():
            return str(cand)
    return None


def parse_args(argv=None) -> argparse.Namespace:
    p = ConfigArgumentParser(default_config=_run_config,
        usage="%(prog)s SRC OUT [--kind backbone|classifier] [--config CONFIG] [--ema] [--allow-unmarked]\n"
              "       %(prog)s SRC --timm-dir DIR [--kind ...] [--class-names classes.txt] [--config ...] [--ema]\n"
              "       %(prog)s --from-mapet-release FILE (OUT | --timm-dir DIR)",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="checkpoint (run dir, checkpoints dir, tag dir or .pt file) and output .pth; "
                        "only SRC with --timm-dir, only OUT with --from-mapet-release")
    p.add_argument("--timm-dir", metavar="DIR", default=None,
                   help="write a timm Hub folder (config.json + model.safetensors) instead of a .pth; load it with "
                        "timm.create_model('local-dir:DIR', pretrained=True)")
    p.add_argument("--class-names", metavar="FILE", default=None,
                   help="with --timm-dir: classes.txt naming the head's classes (default: the run's, or the one "
                        "beside its data.train_list)")
    p.add_argument("--kind", choices=("backbone", "classifier"), default=None,
                   help="backbone (no head; default for .pth) or classifier (needs a fine-tuned head; default for "
                        "--timm-dir when the checkpoint has one)")
    p.add_argument("--config", default=None,
                   help="resolved config.yaml of the run (default: <run dir>/config.yaml when found)")
    p.add_argument("--from-mapet-release", metavar="FILE", default=None,
                   help="a vit_standard_*_patch16_224_{KCLIP,VQKD}.tar from the MaPeT authors")
    p.add_argument("--ema", action="store_true", help="export the EMA weights stored with the checkpoint")
    p.add_argument("--allow-unmarked", action="store_true",
                   help="accept DeepSpeed tags without complete.json (checkpoints not written by mapet_ds)")
    a = p.parse_args(argv)
    if a.class_names and not a.timm_dir:
        p.error("--class-names goes with --timm-dir")
    if a.timm_dir:
        if a.from_mapet_release:
            if a.paths:
                p.error("with --from-mapet-release and --timm-dir give no other path")
            a.src = a.from_mapet_release
        elif len(a.paths) != 1:
            p.error("with --timm-dir give only SRC")
        else:
            a.src = a.paths[0]
        a.out = None
    elif a.from_mapet_release:
        if len(a.paths) != 1:
            p.error("with --from-mapet-release give only OUT")
        a.src, a.out = a.from_mapet_release, a.paths[0]
        a.kind = a.kind or "classifier"
    else:
        if len(a.paths) != 2:
            p.error("give SRC and OUT")
        a.src, a.out = a.paths
        a.kind = a.kind or "backbone"
    return a


def main_timm_dir(a: argparse.Namespace) -> int:
    from mapet_ds.interop.hub import export_timm_dir, read_class_names

    try:
        names = read_class_names(a.class_names) if a.class_names else None
        info = export_timm_dir(a.src, a.timm_dir, kind=a.kind, config_path=a.config, use_ema=a.ema,
                               release=True if a.from_mapet_release else None,
                               require_complete=not a.allow_unmarked, class_names=names)
    except (CheckpointError, ConfigError, UnsafeWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"read   {info['source']} ({info['weights']})")
    labels = " with class names" if info["label_names"] else ""
    print(f"wrote  {info['dir']}/config.json, model.safetensors ({info['architecture']}, {info['kind']}, "
          f"{info['num_classes']} classes{labels})")
    print(f"load:  timm.create_model('local-dir:{info['dir']}', pretrained=True)")
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.timm_dir:
        return main_timm_dir(a)
    try:
        info = export_timm(
            a.src, a.out, kind=a.kind, config_path=a.config, use_ema=a.ema,
            release=True if a.from_mapet_release else None, require_complete=not a.allow_unmarked,
        )
    except (CheckpointError, ConfigError, UnsafeWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    src = info["source"]
    print(f"read   {src['resolved']} ({src['format']}, {src['weights']})")
    print(f"wrote  {a.out} ({info['num_params']:,} parameters, {info['kind']})")
    print(f"wrote  {sidecar_path(a.out)}")
    print(f"load:  timm.create_model({info['timm_model']!r}, pretrained=False, **{json.dumps(info['timm_kwargs'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
