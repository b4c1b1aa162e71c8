"""``pytest bench --benchmark-only``: pytest-benchmark's table names no device, so the session's
header names the one the entry points time (the CPU, marked as such, where there is no CUDA)."""

from __future__ import annotations

import torch

from bench.harness import device_label


def pytest_report_header() -> str:
    """The entry points' device (their ``_DEVICE``: CUDA where there is one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"crl-fast benchmarks on {device_label(device)}"
