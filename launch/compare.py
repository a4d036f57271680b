#!/usr/bin/env python
"""Fair comparison of MIM, PeT and MaPeT: pre-train each objective x seed with everything
else identical, fine-tune (and k-NN) each result, write a table and a figure.

    python launch/compare.py --config RECIPE.yaml --finetune-config FT_RECIPE.yaml \
        --objectives mim,pet,mapet --seeds 0,1,2 --out runs/compare \
        [--budget steps|compute] [--launcher "deepspeed --num_gpus 8"] [--knn|--no-knn] \
        [--linprobe-config LP_RECIPE.yaml [--linprobe-full]] \
        [section.key=value ...]          # applied to pre-training and fine-tuning alike

Re-run the same command to resume a sweep: finished runs are skipped, partial ones resume.
Outputs: <out>/results.csv, results.md, comparison.png (see mapet_ds/analysis/compare.py).
"""

import argparse
import shlex
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from mapet_ds.config import ConfigArgumentParser
    from mapet_ds.engine.cli import DEFAULT_DS_CONFIG

    # --print-config: the pre-training recipe with the overrides (each objective sets objective.name)
    ap = ConfigArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="pre-training recipe (launch/recipes/*.yaml)")
    ap.add_argument("--finetune-config", default=None, help="fine-tuning recipe (default: --config)")
    ap.add_argument("--objectives", default="mim,pet,mapet", help="comma-separated: mim, pet, mapet")
    ap.add_argument("--seeds", default="0", help="comma-separated integers (pretrain.seed and finetune.seed)")
    ap.add_argument("--out", default="runs/compare", help="sweep folder")
    ap.add_argument("--budget", choices=["steps", "compute"], default="steps",
                    help="steps: identical step count (the paper's setting); compute: identical training FLOPs")
    ap.add_argument("--compute-reference", default=None,
                    help="objective whose recipe step count sets the FLOP budget (default: the most expensive)")
    ap.add_argument("--launcher", default=None,
                    help="command prefix of every run, e.g. 'deepspeed --num_gpus 8' or 'python' "
                         "(default: deepspeed with GPUs, python without)")
    ap.add_argument("--ds_config", default=DEFAULT_DS_CONFIG, help="DeepSpeed JSON of every run")
    ap.add_argument("--finetune-ds-config", default=None, help="default: --ds_config")
    ap.add_argument("--knn", action=argparse.BooleanOptionalAction, default=None,
                    help="k-NN eval of each pre-trained backbone (default: on for small data sets with a val list)")
    ap.add_argument("--linprobe-config", default=None,
                    help="linear-probe recipe (launch/recipes/*_linprobe.yaml): adds a linear-probe column")
    ap.add_argument("--linprobe-full", action="store_true",
                    help="probe with MAE's full protocol (augmented views every step) instead of cached features")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for both phases, e.g. data.num_threads=8")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from mapet_ds.analysis.compare import (
        SWEEP_OUTPUTS,
        Sweep,
        SweepError,
        build_plan,
        knn_default,
        parse_list,
        resolve_launcher,
    )
    from mapet_ds.analysis.report import markdown, write_results
    from mapet_ds.config import ConfigError, load_config
    from mapet_ds.filelist import FileListError
    from mapet_ds.safe_io import InputGuard, UnsafeWriteError

    a = parse_args(argv)
    command = "python launch/compare.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        guard = InputGuard()
        for path, what in ((a.config, "the --config recipe"), (a.finetune_config, "the --finetune-config recipe"),
                           (a.ds_config, "the --ds_config file"), (a.finetune_ds_config, "the --finetune-ds-config file"),
                           (a.linprobe_config, "the --linprobe-config recipe")):
            guard.add(path, what)
        guard.check_folder(a.out, SWEEP_OUTPUTS)
        plan = build_plan(a.config, parse_list(a.objectives, "objectives"), parse_list(a.seeds, "seeds", int),
                          a.out, finetune_config=a.finetune_config, budget=a.budget, overrides=a.overrides,
                          compute_reference=a.compute_reference, linprobe_config=a.linprobe_config,
                          linprobe_cached=not a.linprobe_full)
        knn, why = (a.knn, "on (--knn)" if a.knn else "off (--no-knn)") if a.knn is not None else \
            knn_default(load_config(a.config, a.overrides))
        sweep = Sweep(plan, resolve_launcher(a.launcher), a.ds_config, a.finetune_ds_config or a.ds_config, knn)
        print(f"[compare] {len(plan.runs)} runs, budget {plan.budget}: "
              + ", ".join(f"{o} {plan.steps[o]} steps" for o in plan.steps) + f"; k-NN {why}"
              + (f"; linear probe ({'full protocol' if a.linprobe_full else 'cached features'})"
                 if a.linprobe_config else ""), flush=True)
        if a.dry_run:
            for spec in plan.runs:
                for phase, cmd in sweep.commands(spec).items():
                    print(f"{spec.name} {phase}: {shlex.join(cmd)}")
            return 0
        ok = sweep.run()
        rows, paths = write_results(plan, knn, command)
    except (SweepError, ConfigError, FileListError, UnsafeWriteError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(markdown(plan, rows).split("## Runs")[0].rstrip())
    print(f"[compare] wrote {paths['csv']}, {paths['md']}, {paths['png']}")
    if not ok:
        print("[compare] some runs did not finish:\n  " + "\n  ".join(sweep.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
