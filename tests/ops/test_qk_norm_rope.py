"""qk_norm_rope on every backend against flgengine/ops/ref.py: RMSNorm across heads (with
weight) and interleaved-pair RoPE on q and k, from (B, S, H*Dh) to (B, S, H, Dh)."""

import pytest
import torch

from flgengine import ops
from flgengine.ops import native, ref, registry
from helpers import assert_close
from opcases import (CPU_BACKENDS, DTYPES, GPU_BACKENDS, WAN_GRID, case_id, f64, needs_C, needs_triton, nonzero,
                     rope_tables, tol)

CASES = [  # B, S, H, Dh, q/k layout, weight dtype (fp32 or x's)
    (1, 7, 1, 40, "contiguous", "fp32"),
    (2, 13, 3, 72, "fused", "x"),
    (1, 9, 2, 112, "transposed", "fp32"),
    (2, 5, 3, 24, "contiguous", "x"),
    (2, 7, 1, 40, "fused", "fp32"),
    (2, 7, 2, 72, "fused", "fp32"),
    (2, 7, 3, 96, "fused", "x"),
    (2, 7, 2, 112, "fused", "fp32"),
    (2, 7, 3, 24, "fused", "fp32"),
]


def inputs(B, S, H, Dh, dtype, layout, w_dtype, device="cpu", cos_sin=None):
    N = H * Dh
    if layout == "fused":  # q, k: slices of one (B, S, 3N) projection
        qkv = nonzero(B, S, 3 * N, device=device).to(dtype)
        q, k = qkv[..., :N], qkv[..., N:2 * N]
        assert not q.is_contiguous()
    elif layout == "transposed":  # (S, B, N) storage
        q = nonzero(S, B, N, device=device).to(dtype).transpose(0, 1)
        k = nonzero(S, B, N, device=device).to(dtype).transpose(0, 1)
    else:
        q, k = nonzero(B, S, N, device=device).to(dtype), (nonzero(B, S, N, device=device) * 3).to(dtype)
    wdt = dtype if w_dtype == "x" else torch.float32
    qw, kw = (1 + 0.3 * nonzero(N, device=device)).to(wdt), (1 + 0.3 * nonzero(N, device=device)).to(wdt)
    if cos_sin is None:
        cos_sin = rope_tables(S, Dh // 2, device, "strided" if layout == "transposed" else "contiguous")
    return (q, k, qw, kw, *cos_sin)


def check(backend, args, H, what):
    q, k, qw, kw, cos, sin = args
    B, S, N = q.shape
    q_out, k_out = ops.qk_norm_rope(*args, H, 1e-6, backend=backend)
    for t in (q_out, k_out):
        assert t.dtype == q.dtype and t.shape == (B, S, H, N // H) and t.is_contiguous()
    expect = ref.qk_norm_rope(*f64(*args), H, 1e-6)
    # the reference in the kernel's dtype sets the bar (for Triton with the weights in that dtype too)
    lw = (qw.to(q.dtype), kw.to(q.dtype)) if backend == "triton" else (qw, kw)
    low = ref.qk_norm_rope(q, k, *lw, cos, sin, H, 1e-6)
    for got, e, lo, name in zip((q_out, k_out), expect, low, "qk"):
        assert_close(got, e, tol(backend, q.dtype, lo, e), f"{backend} qk_norm_rope {what} {name}")
    return args


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(backend, case, dtype):
    B, S, H, Dh, layout, w_dtype = case
    check(backend, inputs(B, S, H, Dh, dtype, layout, w_dtype), H, f"{dtype} {case}")


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_strided_tables_and_transposed_input(backend):
    B, S, H, Dh = 2, 5, 2, 40
    q = nonzero(B, H * Dh, S).transpose(1, 2)  # last dim not contiguous: copied
    k = nonzero(S, B, H * Dh).transpose(0, 1)  # batch stride smaller than the token stride
    angles = torch.rand(S, 2 * Dh) * 6 - 3
    cos, sin = angles.cos()[:, :Dh // 2], angles.sin()[:, 5:5 + Dh // 2]  # row stride 2*Dh
    check(backend, (q, k, nonzero(H * Dh), nonzero(H * Dh), cos, sin), H, "strided")


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_passes_torch_library_opcheck(backend):
    from flgengine.ops import triton as tri

    op = native.qk_norm_rope if backend == "cpu" else tri.qk_norm_rope_triton
    q, k = nonzero(1, 3, 16), nonzero(1, 3, 16)
    cos, sin = rope_tables(3, 4)
    torch.library.opcheck(op, (q, k, nonzero(16), nonzero(16), cos, sin, 2, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))


@needs_C
def test_cpu_refuses_bad_inputs_before_compute():
    q, k, qw, kw, cos, sin = inputs(1, 3, 2, 8, torch.float32, "fused", "fp32")
    with pytest.raises(ValueError, match="num_heads=3 does not split"):
        ops.qk_norm_rope(q, k, qw, kw, cos, sin, 3, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match=r"cos must be \(S, Dh/2\)"):
        ops.qk_norm_rope(q, k, qw, kw, cos[:2], sin[:2], 2, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match=r"q_weight must be \(H\*Dh,\)"):
        ops.qk_norm_rope(q, k, qw[:4], kw, cos, sin, 2, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="not a multiple of the head dim"):
        ops.qk_norm_rope(q, k, qw, kw, cos[:, :3], sin[:, :3], 2, backend="cpu")


@needs_C
def test_cpu_passes_empty_batches_through():
    q, k, qw, kw, cos, sin = inputs(1, 3, 2, 8, torch.float32, "fused", "fp32")
    q_out, k_out = ops.qk_norm_rope(q[:0], k[:0], qw, kw, cos, sin, 2, backend="cpu")
    assert q_out.shape == k_out.shape == (0, 3, 2, 8)


@needs_triton
def test_triton_launcher_raises_value_errors_naming_the_bad_value(interpreter):
    from flgengine.ops.triton import qk_norm_rope as tri_qk

    x, w = nonzero(1, 3, 16), nonzero(16)
    cos = torch.ones(3, 4)  # head dim 8 -> 2 heads
    with pytest.raises(ValueError, match="num_heads=4 does not match"):
        tri_qk.qk_norm_rope(x, x, w, w, cos, cos, 4)
    q_out, _ = tri_qk.qk_norm_rope(x, x, w, w, cos, cos, 2)
    assert q_out.shape == (1, 3, 2, 8)


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_odd_shapes_and_layouts(gpu_backend, dtype):
    for B, S, H, Dh, layout, w_dtype in CASES + [(1, 97, 2, 40, "fused", "fp32"), (2, 33, 3, 72, "fused", "fp32"),
                                                 (1, 50, 2, 96, "fused", "fp32"), (1, 50, 2, 112, "fused", "fp32")]:
        args = check(gpu_backend, inputs(B, S, H, Dh, dtype, layout, w_dtype, device="cuda"), H,
                     f"{dtype} {(B, S, H, Dh)} {layout} w={w_dtype}")
    torch.cuda.synchronize()
    # the automatic pick follows registry.CUDA_ORDER: Triton first where it can run, else the CUDA kernel
    runnable = []
    for cand in registry.CUDA_ORDER["qk_norm_rope"]:
        try:
            runnable.append(registry.pick("qk_norm_rope", args, cand)[0])
        except registry.BackendUnavailable:
            pass
    assert runnable[0] in ("triton", "cuda") and registry.pick("qk_norm_rope", args)[0] == runnable[0]


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "fused"])
def test_gpu_wan_1_3b_480p(gpu_backend, dtype, layout):
    from flgengine.model.embed import rope_3d

    # Wan-1.3B 480p: 32760 tokens, 1536 = 12 heads x 128, the model's 3D RoPE tables
    args = inputs(1, 32760, 12, 128, dtype, layout, "fp32", device="cuda",
                  cos_sin=rope_3d(128, WAN_GRID, 10000.0, 1024, "cuda"))
    check(gpu_backend, args, 12, f"{dtype} Wan {layout}")
