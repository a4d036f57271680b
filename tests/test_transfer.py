"""Per-step host -> device copies go through mapet_ds.transfer.to_device (pinned first on GPUs)."""

from __future__ import annotations

import re

import torch
from conftest import REPO

from mapet_ds.transfer import to_device


def test_to_device_on_cpu_is_the_same_tensor():
    t = torch.arange(6, dtype=torch.int16).view(2, 3)
    out = to_device(t, "cpu")
    assert out is t and out.device.type == "cpu"
    assert to_device(t, torch.device("cpu")) is t


def test_every_non_blocking_copy_goes_through_the_helper():
    """A pageable ``.to(device, non_blocking=True)`` makes the host wait for the GPU: the only one
    left in the package is the helper's own (after pinning)."""
    sites = []
    for path in sorted((REPO / "mapet_ds").rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\.to\([^)]*non_blocking\s*=\s*True", line) and not line.lstrip().startswith(("#", "``")):
                sites.append(f"{path.relative_to(REPO)}:{n}")
    assert sites == ["mapet_ds/transfer.py:23"]
    users = {p.relative_to(REPO).as_posix() for p in (REPO / "mapet_ds").rglob("*.py")
             if "to_device(" in p.read_text(encoding="utf-8") and p.name != "transfer.py"}
    assert {"mapet_ds/engine/pretrain.py", "mapet_ds/engine/finetune.py", "mapet_ds/pipelines/loaders.py",
            "mapet_ds/pipelines/shards.py", "mapet_ds/models/objectives.py"} <= users
