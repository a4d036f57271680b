"""One line per failed job: user errors become ``error: ...`` on stderr, printed once per job
however many ranks hit them, and a rank stopped by a peer's failure stays silent.

Kept free of torch / deepspeed imports so every launch script (also launch/tokens.py)
can use it before anything heavy is loaded.

Why files and not a collective: the deepspeed launcher (and torchrun) kill every rank
once one exits non-zero, and a rank that failed cannot rely on its peers reaching an
all-reduce. So each rank claims the message with an exclusive create in a folder
private to the job (named by the launcher process that started all local ranks); the
first claim prints. Rank 0 gets a short head start so an error every rank sees is
printed without a rank prefix. The folder is per node (local /tmp): a job over several
nodes prints the line once per node that hit it.

Which errors are one line (exit code 2): our own error types (any exception class defined
in mapet_ds, and those passed in), a ``raise ValueError(...)`` written in mapet_ds or
launch/ (a check of the user's input), and an OSError naming a file (missing, unreadable).
Anything else (a ValueError or RuntimeError from inside torch, Triton, DeepSpeed, DALI, or
a bug of ours) is not the user's to fix from one line: it prints the line plus the file its
full traceback was written to (the run directory when known, else a temporary file), exit
code 1. ``MAPET_DEBUG=1`` re-raises every error with its traceback instead.
"""

from __future__ import annotations

import hashlib
import linecache
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

RANK_ZERO_HEAD_START_S = 0.5
_PACKAGE = Path(__file__).resolve().parents[1]  # mapet_ds/
OWN_CODE = (_PACKAGE, _PACKAGE.parent / "launch")  # deliberate `raise ValueError` checks live here
_RUN_DIR: Optional[Path] = None


def set_run_dir(path) -> None:
    """Where a traceback of an unexpected error goes (the job's run directory, once known)."""
    global _RUN_DIR
    _RUN_DIR = Path(path) if path is not None else None


def rank_and_world() -> tuple[int, int]:
    """From the launcher's environment (valid before torch.distributed is initialised)."""
    from mapet_ds.engine.dist import launcher_env

    try:
        env = {**os.environ, **launcher_env(os.environ)}
    except ValueError:  # a launch without a rank: reported by init_distributed
        env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))


def _job_dir() -> Path:
    ppid = os.getppid()
    try:  # the parent's start time makes the name unique even if its pid is reused later
        start = Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "0"
    port = os.environ.get("MASTER_PORT", "0")
    return Path(tempfile.gettempdir()) / f"mapet_ds_errors_{ppid}_{start}_{port}"


def report_error(message: str, key: Optional[str] = None) -> bool:
    """Print ``error: <message>`` unless another rank of this job already printed it (the same
    ``key``, default the message); True if printed."""
    message = " ".join(str(message).split())  # one line, whatever the exception text holds
    rank, world = rank_and_world()
    if world > 1:
        folder = _job_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if rank != 0:
            time.sleep(RANK_ZERO_HEAD_START_S)
        claim = folder / hashlib.sha1((key or message).encode()).hexdigest()[:16]
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        if rank != 0:
            message = f"[rank {rank}] {message}"
    from mapet_ds.safe_io import print_error

    print_error(message)  # on a fresh line after any open progress bar
    return True


def peer_failed() -> bool:
    """Has another rank of this job already reported an error (so ours is a consequence of it)?"""
    _, world = rank_and_world()
    folder = _job_dir()
    return world > 1 and folder.is_dir() and any(folder.iterdir())


def describe(err: BaseException) -> str:
    """The one line for a user error; OSErrors name the file and the reason, not an errno."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"cannot access {err.filename}: {err.strerror}"
    return str(err)


def _raised_in_own_code(err: BaseException) -> bool:
    """Was ``err`` raised by a ``raise`` statement in mapet_ds or launch/ (not by a library
    call made from there, whose innermost Python frame would be ours too)?"""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    if not any(root in path.parents for root in OWN_CODE):
        return False
    return linecache.getline(str(path), tb.tb_lineno).lstrip().startswith("raise")


def is_user_error(err: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> bool:
    """One line is enough (see the module docstring)."""
    if isinstance(err, user_errors) or type(err).__module__.split(".")[0] == "mapet_ds":
        return True
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return True
    return isinstance(err, ValueError) and _raised_in_own_code(err)


def write_traceback(err: BaseException) -> Path:
    """The full traceback in a new file (created exclusively): in the run directory if the
    job has one by now, else in the temporary directory."""
    rank, _ = rank_and_world()
    folder = _RUN_DIR if _RUN_DIR is not None and _RUN_DIR.is_dir() else None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    fd, name = tempfile.mkstemp(prefix=f"error-{stamp}-rank{rank}-", suffix=".txt", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(f"{' '.join(sys.argv)}\n\n")
        traceback.print_exception(type(err), err, err.__traceback__, file=f)
    return Path(name)


def run_main(fn: Callable[[], None], user_errors: tuple[type[BaseException], ...]) -> int:
    """Run ``fn``: 0 on success; a user error -> one ``error:`` line per job and exit code 2;
    any other exception -> its one line plus where the traceback was written, exit code 1.

    An unexpected exception after a peer rank already reported an error is the collective
    breaking under us: silent (the peer's line says why), exit code 2. ``MAPET_DEBUG=1``:
    every exception is re-raised with its traceback.
    """
    debug = os.environ.get("MAPET_DEBUG", "") not in ("", "0")
    try:
        fn()
    except Exception as err:
        if debug:
            raise
        if is_user_error(err, user_errors):
            report_error(describe(err))
            return 2
        if peer_failed():
            return 2
        where = write_traceback(err)
        line = " ".join(f"{type(err).__name__}: {err}".split())
        report_error(f"{line} (not a known input problem: full traceback in {where}; MAPET_DEBUG=1 prints it here)",
                     key=line)
        return 1
    return 0
