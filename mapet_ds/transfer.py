"""Per-step host -> device copies.

``tensor.to("cuda", non_blocking=True)`` from pageable host memory is not asynchronous:
the driver stages it through a pinned buffer and the host waits for the GPU work queued
before it. Every per-step copy goes through ``to_device``, which pins first so the
copy is a real asynchronous DMA and the host keeps queueing kernels.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t (any shape) on ``device``: pinned + non-blocking from the host to an accelerator, else ``t.to``.

    On the CPU (or already on the device) this is ``t.to(device)``: the same tensor, no copy.
    """
    device = torch.device(device)
    if device.type != "cpu" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)
