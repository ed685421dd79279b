"""Timing helpers for the benchmarks: device-synchronised medians, ratios in one run."""

from __future__ import annotations

import statistics
import time

import torch


def median_seconds(fn, device: torch.device, repeat: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in seconds; CUDA work is timed with events."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
