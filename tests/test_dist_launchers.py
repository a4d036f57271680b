"""engine/dist.py under launchers other than deepspeed/torchrun: srun (SLURM) and Open MPI's mpirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, free_port

from mapet_ds.config import ConfigError
from mapet_ds.engine.dist import first_host, launcher_env

WORLD = """
import json, torch
from mapet_ds.engine.dist import init_distributed
d = init_distributed()
t = torch.tensor([float(d.rank + 1)])
torch.distributed.all_reduce(t)
print(json.dumps({"rank": d.rank, "world": d.world_size, "local": d.local_rank, "sum": t.item()}))
"""

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_two_processes_with_only_slurm_variables_form_one_world():
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_"))}
    base.update(PYTHONPATH=str(REPO), SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost",
                SLURM_JOB_ID=str(port - 10000), DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, "-c", WORLD], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted((o["rank"], o["local"]) for o in outs) == [(0, 0), (1, 1)]
    assert all(o["world"] == 2 and o["sum"] == 3.0 for o in outs)  # one all_reduce over both


def test_launcher_env_mapping():
    slurm = dict(SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8",
                 SLURM_STEP_NODELIST="gpu[07-10,15],cpu1", SLURM_JOB_ID="123")
    assert launcher_env(slurm) == dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="gpu07",
                                       MASTER_PORT="10123")
    assert launcher_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "777"})["RANK"] == "5"
    assert "MASTER_ADDR" not in launcher_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "777"})
    ompi = dict(OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_LOCAL_RANK="3", OMPI_COMM_WORLD_SIZE="4",
                MASTER_ADDR="node1")
    assert launcher_env(ompi) == dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", MASTER_PORT="29500")
    assert launcher_env({"RANK": "1", "WORLD_SIZE": "2", **slurm}) == {}  # torchrun/deepspeed win
    assert launcher_env({}) == dict(RANK="0", WORLD_SIZE="1")
    assert first_host("node17") == "node17" and first_host("a[001-004]") == "a001"


@pytest.mark.parametrize("env,needle", [
    ({"WORLD_SIZE": "4"}, "one of 4 processes (WORLD_SIZE=4) but no rank variable"),
    ({"PMI_SIZE": "2"}, "one of 2 processes (PMI_SIZE=2)"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "without MASTER_ADDR: run `mpirun -x MASTER_ADDR"),
])
def test_multi_process_launch_without_rank_is_refused_in_one_line(env, needle):
    with pytest.raises(ConfigError) as e:
        launcher_env(env)
    assert needle in str(e.value) and "\n" not in str(e.value)

