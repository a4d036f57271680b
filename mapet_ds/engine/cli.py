"""What every launch script shares: the argument shape and the one-line error exit."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

from mapet_ds.config import ConfigArgumentParser, ConfigError
from mapet_ds.engine.ds_config import DEFAULT_DS_CONFIG
from mapet_ds.engine.errors import run_main, set_run_dir
from mapet_ds.engine.trainer import NonFiniteStop
from mapet_ds.filelist import FileListError
from mapet_ds.pipelines.common import PipelineRunError
from mapet_ds.safe_io import InputGuard, UnsafeWriteError

# Errors caused by the user's input or data: printed as one line, exit code 2. Besides these,
# run_main treats every other mapet_ds error type (TokenStoreError, CheckpointError, ...), a
# `raise ValueError` check written in mapet_ds, and an OSError naming a file as user errors;
# anything else (from torch, Triton, DeepSpeed...) gets a traceback file (engine/errors.py).
USER_ERRORS = (ConfigError, FileListError, NonFiniteStop, PipelineRunError, UnsafeWriteError)

# What a training run writes inside its run dir besides config.yaml / ds_config.json, which
# are rewritten with the same resolved content on resume (so --config RUN/config.yaml is fine).
RUN_DIR_OUTPUTS = ("checkpoints", "vis", "tb", "metrics.jsonl", "best.pt", "best.json", "summary.json",
                   "iou_table.tsv", "seg_overlay.png")


def job_parser(description: str) -> argparse.ArgumentParser:
    """--config, --ds_config, --local_rank, overrides; ``--print-config`` prints the resolved config
    as YAML and exits inside ``parse_args`` (ConfigArgumentParser), before any data or device."""
    ap = ConfigArgumentParser(description=description)
    ap.add_argument("--config", help="YAML recipe (launch/recipes/*.yaml)")
    ap.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=DEFAULT_DS_CONFIG,
                    help="DeepSpeed JSON (default: ds_configs/zero2.json)")
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.drop_path=0.2")
    return ap


def run_job(fn: Callable[[], None]) -> int:
    """Run ``fn``; a user error becomes ``error: <one line>`` on stderr (once per job, not per
    rank) and exit code 2; any other error, its line plus the file holding its traceback (the
    run dir once check_run_dir accepted it), exit code 1; ``MAPET_DEBUG=1`` re-raises."""
    return run_main(fn, USER_ERRORS)


def check_run_dir(run_dir: str, inputs: Sequence[tuple[object, str]], field: str) -> Path:
    """Refuse a run dir that is, or would overwrite, one of the run's inputs (a list, the token
    store, tokenizer weights, the checkpoint it starts from)."""
    guard = InputGuard()
    for path, what in inputs:
        guard.add(path, what)
    checked = guard.check_folder(run_dir, RUN_DIR_OUTPUTS, field)
    set_run_dir(checked)  # an unexpected error's traceback goes there (once the run has made it)
    return checked
