"""adaln_modulate on every backend against flgengine/ops/ref.py: LayerNorm without affine,
then x * (1 + scale) + shift, for the x layouts and modulation layouts the model produces."""

import pytest
import torch

from flgengine import ops
from flgengine.ops import native, ref, registry
from helpers import assert_close
from opcases import (CPU_BACKENDS, DTYPES, GPU_BACKENDS, WAN, activations, case_id, f64, mod, needs_C, needs_triton,
                     nonzero, tol)

CASES = [  # B, S, D, x layout, modulation kind, modulation dtype (fp32 or x's)
    (1, 7, 40, "contiguous", "sample", "fp32"),
    (2, 37, 72, "contiguous", "token_view", "fp32"),
    (2, 13, 24, "transposed", "vector", "x"),
    (1, 9, 112, "sliced", "sample_view", "x"),
    (2, 5, 96, "contiguous", "token_bcast", "fp32"),
    (1, 97, 111, "contiguous", "sample", "fp32"),
    (1, 97, 111, "contiguous", "sample", "x"),
    (3, 5, 64, "contiguous", "token", "fp32"),
    (3, 5, 64, "contiguous", "token", "x"),
    (2, 1, 1536, "contiguous", "sample", "fp32"),
    (2, 1, 1536, "contiguous", "sample", "x"),
    (2, 7, 40, "contiguous", "sample_view", "fp32"),  # the block's chunk views of a (B, 6, D) modulation
    (2, 7, 40, "transposed", "token_view", "fp32"),  # per-token chunk views and a non-contiguous x
]


def check(backend, B, S, D, dtype, x_layout, mod_kind, mod_dtype, device="cpu"):
    x = activations(B, S, D, dtype, device, x_layout)
    mdt = dtype if mod_dtype == "x" else torch.float32
    scale = mod(mod_kind, B, S, D, mdt, device, 1, mul=0.5)
    shift = mod(mod_kind, B, S, D, mdt, device, 0)
    out = ops.adaln_modulate(x, scale, shift, 1e-6, backend=backend)
    assert out.dtype == dtype and out.shape == (B, S, D) and out.is_contiguous()
    expect = ref.adaln_modulate(*f64(x, scale, shift), 1e-6)
    low = ref.adaln_modulate(x, scale, shift, 1e-6)
    what = f"{backend} adaln_modulate {dtype} {(B, S, D)} x={x_layout} mod={mod_kind}/{mod_dtype}"
    assert_close(out, expect, tol(backend, dtype, low, expect), what)
    return x, scale, shift


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(backend, case, dtype):
    check(backend, *case[:3], dtype, *case[3:])


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_passes_torch_library_opcheck(backend):
    from flgengine.ops import triton as tri

    op = native.adaln_modulate if backend == "cpu" else tri.adaln_modulate_triton
    x, s, h = nonzero(2, 3, 16), nonzero(2, 16), nonzero(2, 3, 16)
    torch.library.opcheck(op, (x, s, h, 1e-6), test_utils=("test_schema", "test_faketensor"))


@needs_triton
@pytest.mark.parametrize("mod_kind", ["sample", "token"])
def test_triton_row_tilings_give_the_same_result(interpreter, mod_kind):
    """The tilings a sweep may choose (rows per tile, tiles per program) change the schedule,
    not the math: 2 samples x 13 tokens (tails in every tiling) against the default launch;
    for gated_residual_adaln too (the same kernel)."""
    from flgengine.ops.triton import adaln_modulate as A
    from flgengine.ops.triton import gated_residual_adaln as G

    B, S, D = 2, 13, 40
    x, y = activations(B, S, D, torch.float32, "cpu"), activations(B, S, D, torch.float32, "cpu", "transposed")
    gate, scale, shift = (mod(mod_kind, B, S, D, torch.float32, "cpu", i) for i in (2, 1, 0))
    base_a, base_g = A.adaln_modulate(x, scale, shift), G.gated_residual_adaln(x, y, gate, scale, shift)
    for tiling in ({"ROWS": 1, "num_warps": 4}, {"ROWS": 2, "num_warps": 4, "ITERS": 3},
                   {"ROWS": 4, "num_warps": 8, "ITERS": 5}):
        assert_close(A.adaln_modulate(x, scale, shift, tiling=tiling), base_a, 1e-6, f"adaln {tiling}")
        for a, b in zip(G.gated_residual_adaln(x, y, gate, scale, shift, tiling=tiling), base_g):
            assert_close(a, b, 1e-6, f"gated {tiling}")
    with pytest.raises(ValueError, match="ITERS must be >= 1"):
        A.adaln_modulate(x, scale, shift, tiling={"ROWS": 1, "num_warps": 4, "ITERS": 0})
    with pytest.raises(ValueError, match="not tunable"):
        A.adaln_modulate(x, scale, shift, tiling={"ROWS": 1, "num_warps": 4, "BLOCK_D": 64})


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_odd_shapes_and_layouts(gpu_backend, dtype):
    for case in CASES:
        check(gpu_backend, *case[:3], dtype, *case[3:], device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(1, 97, 111, "sample_view"), (2, 33, 64, "token"), (*WAN, "sample_view")], ids=case_id)
def test_gpu_matches_reference(gpu_backend, dtype, case):
    # (1, 32760, 1536): Wan-1.3B 480p x 81 frames, (B, 6, D) chunk views of the timestep modulation
    B, S, D, mod_kind = case
    x, scale, shift = check(gpu_backend, B, S, D, dtype, "contiguous", mod_kind, "fp32", device="cuda")
    torch.cuda.synchronize()
    assert registry.pick("adaln_modulate", (x, scale, shift))[0] in ("triton", "cuda")  # a fused kernel, not ref
    assert registry.pick("adaln_modulate", (x, scale, shift), gpu_backend)[0] == gpu_backend


@needs_C
def test_cpu_backend_serves_by_default_and_refuses_what_it_cannot_serve():
    x, s, h = nonzero(1, 2, 8), nonzero(1, 8), nonzero(1, 8)
    assert registry.pick("adaln_modulate", (x, s, h))[0] == "cpu"
    with pytest.raises(registry.BackendUnavailable, match="x dtype torch.float64"):
        ops.adaln_modulate(x.double(), s, h, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match=r"scale must be \(B, D\)"):
        ops.adaln_modulate(x, s[:, :4], h, backend="cpu")
