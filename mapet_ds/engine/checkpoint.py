"""Checkpoints: DeepSpeed ``save_checkpoint`` + per-rank state + a completion marker.

Layout::

    <run_dir>/checkpoints/
        step00000100/                 DeepSpeed files (model, ZeRO partitions, client state)
            rank00000.pt              this rank's data-loader position and RNG states
            complete.json             written last, once every rank has finished
        latest                        DeepSpeed's pointer (not trusted by us)

A save killed at any point leaves a tag without ``complete.json``; resume only ever
considers tags that have it, so it falls back to the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mapet_ds.engine.dist import barrier
from mapet_ds.safe_io import atomic_write, atomic_write_text

MARKER = "complete.json"
_TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _TAG_RE.match(p.name)
        if m and (p / MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def newest_complete(ckpt_dir: str | os.PathLike) -> Optional[Path]:
    tags = complete_tags(ckpt_dir)
    return tags[-1][1] if tags else None


def rng_state(generator: Optional[torch.Generator] = None) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if generator is not None:
        state["plan_generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: Optional[torch.Generator] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state.get("plan_generator") is not None:
        generator.set_state(state["plan_generator"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    # an exclusive random temp name (safe_io.temp_file): a fixed "<name>.tmp" could be a pre-placed link
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save(engine, ckpt_dir: str | os.PathLike, step: int, client_state: dict, rank_state: dict,
         *, rank: int, keep_last: int) -> Path:
    """Save a checkpoint on every rank (collective); returns the tag directory."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover incomplete save of the same step
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    _atomic_torch_save(rank_state, tag_dir / f"rank{rank:05d}.pt")
    fault_point("after_shards", step)
    barrier()
    if rank == 0:
        # world size, ZeRO stage and micro batch: an elastic resume detects a change before DeepSpeed would
        marker = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                  "zero_stage": int(engine.zero_optimization_stage()),
                  "micro_batch": int(engine.train_micro_batch_size_per_gpu())}
        # fsync: the marker is what makes the tag loadable, so its content must be on disk before its name
        atomic_write_text(tag_dir / MARKER, json.dumps(marker), fsync=True)
        prune(ckpt_dir, keep_last)
    barrier()
    return tag_dir


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop older and stale partial ones."""
    tags = complete_tags(ckpt_dir)
    for _, path in tags[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    newest = tags[-1][0] if tags else -1
    for p in ckpt_dir.iterdir():
        m = _TAG_RE.match(p.name)
        if m and int(m.group(1)) < newest and not (p / MARKER).is_file():
            shutil.rmtree(p, ignore_errors=True)


def load(engine, tag_dir: Path, *, rank: int, load_optimizer: bool = True) -> tuple[dict, dict]:
    """Load a complete checkpoint into ``engine``; return (client_state, this rank's state)."""
    if not (tag_dir / MARKER).is_file():
        raise FileNotFoundError(f"{tag_dir} has no {MARKER}: it is an interrupted save; resume from an older one")
    _, client_state = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name,
        load_optimizer_states=load_optimizer, load_lr_scheduler_states=False,
        load_module_only=not load_optimizer,
    )
    rank_file = tag_dir / f"rank{rank:05d}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{rank_file} is missing: the checkpoint was written by a different world size; "
            f"resume with the same number of ranks, or start a new run from it with resume=none and an init"
        )
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return client_state or {}, rank_state


def fault_point(where: str, step: int) -> None:
    """Fault injection for crash tests: MAPET_FAULT=<where>:<step> kills the process here."""
    spec = os.environ.get("MAPET_FAULT", "")
    if spec == f"{where}:{step}":
        os.kill(os.getpid(), 9)
