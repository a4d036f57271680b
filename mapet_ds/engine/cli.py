"""What every launch script shares: the argument shape and the one-line error exit."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from mapet_ds.config import ConfigError
from mapet_ds.engine.ds_config import DEFAULT_DS_CONFIG
from mapet_ds.engine.trainer import NonFiniteStop
from mapet_ds.filelist import FileListError

# Errors caused by the user's input or data: printed as one line, exit code 2.
# (TokenStoreError, CheckpointError, TokenizerWeightsError are ValueErrors.)
USER_ERRORS = (ConfigError, FileListError, NonFiniteStop, ValueError, FileNotFoundError)


def job_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help="YAML recipe (launch/recipes/*.yaml)")
    ap.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=DEFAULT_DS_CONFIG,
                    help="DeepSpeed JSON (default: ds_configs/zero2.json)")
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.drop_path=0.2")
    return ap


def run_job(fn: Callable[[], None]) -> int:
    """Run ``fn``; a user error becomes ``error: <one line>`` on stderr and exit code 2."""
    try:
        fn()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0
