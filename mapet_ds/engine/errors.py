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
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

RANK_ZERO_HEAD_START_S = 0.5


def rank_and_world() -> tuple[int, int]:
    """From the launcher's environment (valid before torch.distributed is initialised)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _job_dir() -> Path:
    ppid = os.getppid()
    try:  # the parent's start time makes the name unique even if its pid is reused later
        start = Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "0"
    port = os.environ.get("MASTER_PORT", "0")
    return Path(tempfile.gettempdir()) / f"mapet_ds_errors_{ppid}_{start}_{port}"


def report_error(message: str) -> bool:
    """Print ``error: <message>`` unless another rank of this job already printed it; True if printed."""
    message = " ".join(str(message).split())  # one line, whatever the exception text holds
    rank, world = rank_and_world()
    if world > 1:
        folder = _job_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if rank != 0:
            time.sleep(RANK_ZERO_HEAD_START_S)
        claim = folder / hashlib.sha1(message.encode()).hexdigest()[:16]
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


def run_main(fn: Callable[[], None], user_errors: tuple[type[BaseException], ...]) -> int:
    """Run ``fn``: 0 on success; a user error -> one ``error:`` line per job and exit code 2.

    Any other exception keeps its traceback (a bug to report), unless a peer rank already
    reported an error: then it is the collective breaking under us, and the peer's line
    says why.
    """
    try:
        fn()
    except user_errors as err:
        report_error(describe(err))
        return 2
    except Exception:
        if peer_failed():
            return 2
        raise
    return 0
