"""MFU's denominator: the dense bf16 peak told apart per GPU variant (fake device names)."""

from __future__ import annotations

import pytest
import torch

from mapet_ds.engine import metrics


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H200", 989.0),  # SXM
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None),  # a different part: no guess
    ("Tesla V100-SXM2-32GB", None),  # no bf16
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.detect_peak_tflops(torch.device("cuda", 0), None) == peak
    assert metrics.detect_peak_tflops(torch.device("cuda", 0), 100.0) == 100.0  # the config wins
    assert metrics.detect_peak_tflops(torch.device("cpu"), None) is None
