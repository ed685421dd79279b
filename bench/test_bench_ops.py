"""adaln_modulate per backend: GB/s and the ratio to the reference, measured in one run.

CPU: a small shape. GPU (`gpu` marker): the Wan-1.3B 480p x 81-frame shape, 32760 x 1536.
Bytes counted: x read once, out written once, scale + shift read once per sample.
"""

import pytest
import torch

from flgengine import ops
from flgengine.ops import native
from timing import median_seconds

CASES = [
    pytest.param("cpu", (1, 2048, 512), torch.float32, id="cpu-2048x512-fp32"),
    pytest.param("cuda", (1, 32760, 1536), torch.bfloat16, id="cuda-wan480p-bf16", marks=pytest.mark.gpu),
    pytest.param("cuda", (1, 32760, 1536), torch.float32, id="cuda-wan480p-fp32", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("backend,shape,dtype", CASES)
def test_adaln_modulate(benchmark, backend, shape, dtype):
    if backend not in native.build_info()["backends"]:
        pytest.skip(f"_C has no {backend} backend in this build")
    device = torch.device("cuda" if backend == "cuda" else "cpu")
    B, S, D = shape
    x = torch.randn(B, S, D, device=device).to(dtype)
    mod = torch.randn(B, 6, D, device=device)
    scale, shift = mod[:, 1], mod[:, 0]
    fused = lambda: ops.adaln_modulate(x, scale, shift, backend=backend)  # noqa: E731
    reference = lambda: ops.adaln_modulate(x, scale, shift, backend="ref")  # noqa: E731
    t_ref = median_seconds(reference, device)
    t_fused = median_seconds(fused, device)
    benchmark.pedantic(fused, rounds=10, iterations=1, warmup_rounds=2)
    nbytes = 2 * x.numel() * x.element_size() + 2 * B * D * 4
    benchmark.extra_info.update({
        "shape": list(shape), "dtype": str(dtype), "backend": backend,
        "fused_s": t_fused, "ref_s": t_ref, "speedup_vs_ref": t_ref / t_fused,
        "fused_GBps": nbytes / t_fused / 1e9, "ref_GBps": nbytes / t_ref / 1e9,
    })
    print(f"\nadaln_modulate {backend} {shape} {dtype}: {t_fused * 1e6:.1f} us, {nbytes / t_fused / 1e9:.1f} GB/s, "
          f"{t_ref / t_fused:.2f}x the reference ({t_ref * 1e6:.1f} us)")
