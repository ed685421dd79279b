"""The machine's measured ceilings. On CUDA, the card's two, against which GPU figures are reported as fractions:
copy bandwidth (a large device-to-device copy: bytes read + written per second) and
bf16 matmul throughput (a large square GEMM). Measured once per process (cached).
"""

from __future__ import annotations

import functools

import torch

from timing import median_seconds


@functools.lru_cache(maxsize=None)
def measured(device_type: str = "cuda") -> dict:
    """{"copy_GBps", "matmul_TFLOPs"} on the current device of `device_type` (CUDA only)."""
    if device_type != "cuda":
        raise ValueError("ceilings are measured on CUDA devices only")
    dev = torch.device("cuda")
    n = 1 << 28  # 256 Mi bf16 elements = 512 MiB each way
    src, dst = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_(), torch.empty(n, dtype=torch.bfloat16, device=dev)
    t_copy = median_seconds(lambda: dst.copy_(src), dev, repeat=20, warmup=3)
    m = 8192
    a, b = (torch.randn(m, m, device=dev, dtype=torch.bfloat16) for _ in range(2))
    t_mm = median_seconds(lambda: a @ b, dev, repeat=20, warmup=3)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": 2 * n * 2 / t_copy / 1e9, "matmul_TFLOPs": 2 * m**3 / t_mm / 1e12,
            "card": torch.cuda.get_device_name(dev)}


@functools.lru_cache(maxsize=None)
def cpu_matmul_GFLOPs(n: int = 1024) -> float:
    """fp32 GEMM throughput of this CPU at torch's current thread count (an n x n x n GEMM,
    the size where it peaked here: ~95 GFLOP/s at 512, ~195 at 1024, ~185 at 2048 on 2 threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, torch.device("cpu"), repeat=15, warmup=3) / 1e9
