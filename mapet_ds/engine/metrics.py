"""Metrics: TensorBoard scalars, a JSONL log, throughput and MFU, console lines.

MFU = (3 x analytic forward FLOPs per image x images/s per device) / peak FLOP/s of
the device (``peak_tflops`` in the config, else the dense bf16 figure of the
detected GPU). Activation-checkpointing recomputation is not counted as useful work.
"""

from __future__ import annotations

import json
import re
import resource
import time
from pathlib import Path
from typing import Optional

import torch

# Dense (no sparsity) bf16 peak TFLOP/s by device name, from NVIDIA's datasheets. First
# match wins, so a variant comes before its family: H200 NVL / H100 NVL (835) and H100 PCIe
# (756) are slower than the SXM parts (989; torch names those "NVIDIA H200", "NVIDIA H100
# 80GB HBM3"). V100 has no bf16 (its runs are fp32): no peak, no MFU, unless
# pretrain.peak_tflops says what to divide by.
PEAK_BF16_TFLOPS: tuple[tuple[str, Optional[float]], ...] = (
    (r"H200 NVL", 835.0),
    (r"GH200", 989.0),
    (r"H200", 989.0),
    (r"H100 NVL", 835.0),
    (r"H100 PCIE", 756.0),
    (r"H100", 989.0),
    (r"H800 PCIE", 756.0),
    (r"H800", 989.0),
    (r"A100", 312.0),
    (r"A800", 312.0),
    (r"L40S", 362.0),
    (r"\bA10\b", 125.0),
    (r"V100", None),
)


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a device named like torch.cuda.get_device_name; None if unknown
    or without bf16."""
    name = device_name.upper()
    for pattern, value in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return value
    return None


def detect_peak_tflops(device: torch.device, configured: Optional[float]) -> Optional[float]:
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    return peak_bf16_tflops(torch.cuda.get_device_name(device))


def max_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory (GPU) or peak resident set size (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class MetricLogger:
    """Rank 0 writes TensorBoard scalars (x-axis: images seen) and a JSONL step log."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_after(resume_step)
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop the old lines."""
        if not self.jsonl.is_file():
            return
        keep = []
        for line in self.jsonl.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        from mapet_ds.safe_io import atomic_write_text

        atomic_write_text(self.jsonl, "".join(k + "\n" for k in keep))

    def scalars(self, values: dict[str, float], x: int) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if v is not None:
                self.tb.add_scalar(k, v, x)

    def records(self, recs: list[dict]) -> None:
        """Append one JSON line per record (one open per log interval)."""
        if not self.enabled or not recs:
            return
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in recs))

    def text(self, tag: str, text: str, x: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, x)

    def image(self, tag: str, img_hwc, x: int) -> None:
        if self.enabled:
            self.tb.add_image(tag, img_hwc, x, dataformats="HWC")

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Images/s and data-wait fraction over a logging interval."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.data_wait += data_wait

    def read(self) -> tuple[float, float, float]:
        """(elapsed s, images/s on this rank, data-wait fraction)."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return dt, self.images / dt, min(1.0, self.data_wait / dt)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
