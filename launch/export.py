"""Export a checkpoint as one plain timm VisionTransformer state dict (+ JSON sidecar).

    # pre-training run -> backbone (newest complete checkpoint; the run's config.yaml is used)
    python launch/export.py runs/pretrain exports/backbone.pth
    # one tag of a fine-tuning run -> classifier
    python launch/export.py runs/finetune/checkpoints/step00001000 exports/vit.pth --kind classifier
    # the MaPeT authors' fine-tuned release -> our classifier format
    python launch/export.py --from-mapet-release vit_standard_base_patch16_224_KCLIP.tar exports/mapet_b.pth

Then, in any program with timm::

    info = json.load(open("exports/vit.json"))
    model = timm.create_model(info["timm_model"], pretrained=False, **info["timm_kwargs"])
    model.load_state_dict(torch.load("exports/vit.pth"), strict=True)
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
              "       %(prog)s --from-mapet-release FILE OUT",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="checkpoint (run dir, checkpoints dir, tag dir or .pt file) and output .pth; "
                        "only OUT with --from-mapet-release")
    p.add_argument("--kind", choices=("backbone", "classifier"), default=None,
                   help="backbone (no head; default) or classifier (needs a fine-tuned head)")
    p.add_argument("--config", default=None,
                   help="resolved config.yaml of the run (default: <run dir>/config.yaml when found)")
    p.add_argument("--from-mapet-release", metavar="FILE", default=None,
                   help="a vit_standard_*_patch16_224_{KCLIP,VQKD}.tar from the MaPeT authors")
    p.add_argument("--ema", action="store_true", help="export the EMA weights stored with the checkpoint")
    p.add_argument("--allow-unmarked", action="store_true",
                   help="accept DeepSpeed tags without complete.json (checkpoints not written by mapet_ds)")
    a = p.parse_args(argv)
    if a.from_mapet_release:
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


def main(argv=None) -> int:
    a = parse_args(argv)
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
