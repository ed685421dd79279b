"""Inputs, tolerances and backend lists shared by the per-op tests (tests/ops/test_<op>.py).

Every backend of an op is checked against its definition in flgengine/ops/ref.py: the
reference run on float64 copies of the inputs is the expectation, and a backend passes at
max(2 x the error the reference itself makes in the kernel's dtype, a per-backend floor).
On the CPU, "cpu" runs the C++ ops and "triton" the Triton kernels in Triton's interpreter
(~5 ms per program instance and loop iteration, so shapes are small and odd: masks, tails);
the `gpu` tests run "cuda" and compiled "triton" at the odd shapes and at the Wan-1.3B 480p
production shape (32760 tokens x 1536, 12 heads x 128).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from flgengine.ops import native
from helpers import rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

needs_C = pytest.mark.skipif(native._C is None, reason="flgengine._C not built")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# Backends on CPU tensors and on CUDA tensors, for `backend` / `gpu_backend` (tests/ops/conftest.py).
CPU_BACKENDS = [pytest.param("cpu", marks=needs_C), pytest.param("triton", marks=needs_triton)]
GPU_BACKENDS = [pytest.param("cuda", marks=needs_C), pytest.param("triton", marks=needs_triton)]

# Floors per backend and dtype. The C++ / CUDA ops differ from the float64 reference by one
# rounding of the output (bf16 / fp16) or accumulated fp32 rounding; attention sums Skv
# products and exponentials in fp32.
_NATIVE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
_NATIVE_ATTN = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
_TRITON = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
FLOOR = {"cpu": _NATIVE, "cuda": _NATIVE, "triton": _TRITON}
ATTN_FLOOR = {"cpu": _NATIVE_ATTN, "cuda": _NATIVE_ATTN, "triton": _TRITON}
WAN = (1, 32760, 1536)  # Wan-1.3B 480p x 81 frames: 21 x 30 x 52 latent tokens, 12 heads x 128
WAN_GRID = (21, 30, 52)


def tol(backend: str, dtype, low, expect, table=FLOOR) -> float:
    """At most 2x the reference's own error in the kernel's dtype (`low` vs `expect`), or the floor."""
    return max(2 * rel_err(low, expect), table[backend][dtype])


def nonzero(*shape, dtype=torch.float32, device="cpu"):
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    return (x + 0.1 * x.sign() + (x == 0)).to(dtype)  # never zero


def f64(*ts):
    return tuple(t.double() for t in ts)


def case_id(case) -> str:
    return "-".join(map(str, case))


# ---- layouts the model produces ----------------------------------------------------------------

def mod(kind: str, B: int, S: int, D: int, dtype, device, k: int = 0, mul: float = 1.0):
    """A scale / shift / gate (values times `mul`) of one layout: 'sample' (B, D) contiguous,
    'sample_view' (B, D) unbind view of a (B, 6, D), 'token_view' (B, S, D) unbind view of a
    (B, S, 6, D), 'vector' a (D,) expanded to (B, D) (stride 0), 'token_bcast' (B, 1, D)
    expanded to (B, S, D), 'token' (B, S, D) contiguous, 'ones' torch.ones(1, D).expand(B, D)."""
    rnd = lambda *shape: (nonzero(*shape, device=device) * mul).to(dtype)  # noqa: E731
    if kind == "sample":
        m = rnd(B, D)
    elif kind == "sample_view":
        m = rnd(B, 6, D).unbind(1)[k]
    elif kind == "token_view":
        m = rnd(B, S, 6, D).unbind(2)[k]
    elif kind == "vector":
        m = rnd(D).expand(B, D)
    elif kind == "token_bcast":
        m = rnd(B, 1, D).expand(B, S, D)
    elif kind == "token":
        m = rnd(B, S, D)
    elif kind == "ones":
        m = torch.ones(1, D, dtype=dtype, device=device).expand(B, D)
    else:
        raise ValueError(kind)
    # the layout is the one named (a (D,) expanded to (1, D) is contiguous: B = 1 cannot tell them apart)
    contiguous = kind in ("sample", "token") or (B == 1 and kind in ("vector", "ones"))
    assert contiguous == (m.stride() == torch.empty(m.shape).stride()), (kind, m.stride())
    return m


def activations(B, S, D, dtype, device, layout="contiguous"):
    """x of (B, S, D): 'contiguous', 'transposed' (channel stride S) or 'sliced' (a slice of a
    wider row, as a fused projection's output)."""
    if layout == "contiguous":
        return (nonzero(B, S, D, device=device) * 2 + 0.5).to(dtype)
    if layout == "transposed":
        return (nonzero(B, D, S, device=device) * 2 + 0.5).to(dtype).transpose(1, 2)
    if layout == "sliced":
        return (nonzero(B, S, 3 * D, device=device) * 2 + 0.5).to(dtype)[..., D:2 * D]
    raise ValueError(layout)


def rope_tables(S, half, device="cpu", layout="contiguous"):
    """fp32 cos, sin of (S, Dh/2); 'strided': every other column of a wider table."""
    theta = torch.rand(S, half, dtype=torch.float64, device=device) * 2 * math.pi
    cos, sin = theta.cos().float(), theta.sin().float()
    if layout == "strided":
        cos = torch.stack([cos, torch.ones_like(cos)], -1).flatten(-2)[:, ::2]
        sin = torch.stack([sin, torch.zeros_like(sin)], -1).flatten(-2)[:, ::2]
        assert cos.stride() == (2 * half, 2)
    return cos, sin


def qkv(B, Sq, Skv, H, D, dtype, device, layout):
    """q (B, Sq, H, D), k, v (B, Skv, H, D): 'contiguous', or 'strided': q stored (B, H, Sq, D),
    k and v slices of a packed (B, Skv, 2, H, D)."""
    if layout == "contiguous":
        return (nonzero(B, Sq, H, D, dtype=dtype, device=device), nonzero(B, Skv, H, D, dtype=dtype, device=device),
                nonzero(B, Skv, H, D, dtype=dtype, device=device))
    q = nonzero(B, H, Sq, D, dtype=dtype, device=device).transpose(1, 2)
    kv = nonzero(B, Skv, 2, H, D, dtype=dtype, device=device)
    return q, kv[:, :, 0], kv[:, :, 1]
