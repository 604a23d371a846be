"""Wall-clock timing that waits for the device: a GPU runs kernels asynchronously, so a timer read
without synchronizing measures only the launches. Shared by the benchmark scripts."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished its queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_seconds(fn, device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start
