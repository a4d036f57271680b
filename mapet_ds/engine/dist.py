"""Process-group set-up for every launch form: deepspeed, torchrun, srun, mpirun, plain python.

deepspeed and torchrun export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
``srun`` (and ``deepspeed --launcher slurm``) gives SLURM_PROCID / SLURM_LOCALID /
SLURM_STEP_NUM_TASKS and the node list; ``mpirun`` of Open MPI (and ``deepspeed
--launcher openmpi``) gives OMPI_COMM_WORLD_RANK / _LOCAL_RANK / _SIZE. Without reading
those, every process of such a launch was rank 0 of a one-process world on GPU 0, all
writing the same run directory.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

import torch

from mapet_ds.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``gpu[07-12,15],cpu1`` -> ``gpu07``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if m is None:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}: export MASTER_ADDR=<first node's address>")
    prefix, ranges = m.group(1), m.group(2)
    return prefix if ranges is None else prefix + re.split(r"[,-]", ranges)[0]


def launcher_env(env: Mapping[str, str]) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for torch's env:// rendezvous.

    From (first match) torchrun/deepspeed's own variables, Open MPI's, SLURM's (an ``srun``
    step), else a one-process world. Raises ConfigError (one line) for a multi-process
    launch without a rank we can read, or an Open MPI launch without MASTER_ADDR.
    """
    if "RANK" in env:
        return {}
    out: dict[str, str] = {}
    if "OMPI_COMM_WORLD_RANK" in env:
        size = env.get("OMPI_COMM_WORLD_SIZE", "1")
        out = dict(RANK=env["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=size,
                   LOCAL_RANK=env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
        if "MASTER_ADDR" not in env and int(size) > 1:
            raise ConfigError(f"launched by Open MPI ({size} processes) without MASTER_ADDR: run "
                              "`mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=<free port> ...`")
        out["MASTER_PORT"] = env.get("MASTER_PORT", "29500")
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        size = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
        out = dict(RANK=env["SLURM_PROCID"], WORLD_SIZE=size, LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if nodes is None and int(size) > 1:
                raise ConfigError(f"launched by srun ({size} tasks) without a node list: export MASTER_ADDR")
            out["MASTER_ADDR"] = first_host(nodes) if nodes else "127.0.0.1"
        if "MASTER_PORT" not in env:
            # the same on every task of the job without talking to each other
            out["MASTER_PORT"] = str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 50000)
    else:
        sizes = {k: env[k] for k in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE",
                                     "SLURM_STEP_NUM_TASKS") if env.get(k, "1").isdigit() and int(env.get(k, "1")) > 1}
        if sizes:
            k, v = next(iter(sizes.items()))
            raise ConfigError(f"this is one of {v} processes ({k}={v}) but no rank variable is set (RANK, "
                              "SLURM_PROCID or OMPI_COMM_WORLD_RANK): launch with deepspeed, torchrun, srun "
                              "or Open MPI's mpirun, or export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT")
        return dict(RANK="0", WORLD_SIZE="1")
    return out


def init_distributed(local_rank_arg: int | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPU).

    The rank comes from the launcher (``launcher_env``); a plain ``python launch/x.py``
    gets a one-process world (DeepSpeed would otherwise try MPI discovery and fail).
    ``--local_rank`` from the deepspeed launcher is honoured when LOCAL_RANK is not in
    the environment. Each process uses GPU ``local_rank % visible GPUs``: srun / mpirun
    set-ups that show every process only its own GPU (CUDA_VISIBLE_DEVICES per task)
    make that GPU 0 whatever the local rank.
    """
    import deepspeed

    os.environ.update(launcher_env(os.environ))
    if os.environ.get("WORLD_SIZE", "1") == "1":
        os.environ.setdefault("LOCAL_RANK", str(local_rank_arg or 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if "LOCAL_RANK" not in os.environ and local_rank_arg is not None:
        os.environ["LOCAL_RANK"] = str(local_rank_arg)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a sync point: call it at log intervals, not every step)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t
