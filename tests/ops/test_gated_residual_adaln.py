"""gated_residual_adaln on every backend against flgengine/ops/ref.py: the gated residual
add x + gate * y fused with the next adaLN, for the layouts the model passes (per-sample and
per-token chunk views of the timestep modulation, an affine LayerNorm's vectors expanded
over the batch)."""

import pytest
import torch
import torch.nn.functional as F

from flgengine import ops
from flgengine.ops import native, ref, registry
from helpers import assert_close, rel_err
from opcases import CPU_BACKENDS, DTYPES, GPU_BACKENDS, WAN, activations, case_id, f64, mod, needs_C, nonzero, tol

# B, S, D, x layout (y is transposed unless x is), (gate, scale, shift) kinds, their dtypes:
# "fp32", "x" (x's dtype) or "mixed" (gate and scale fp32, shift x's dtype)
CASES = [
    (1, 7, 40, "contiguous", ("sample", "sample", "sample"), "mixed"),
    (2, 37, 72, "contiguous", ("sample_view", "vector", "vector"), "mixed"),  # the model's cross-attn norm fusion
    (2, 13, 24, "transposed", ("ones", "token_view", "token_view"), "mixed"),  # the model's FFN fusion, per-token
    (1, 9, 112, "sliced", ("token", "token_bcast", "sample"), "mixed"),
    # (B, D) chunk views of the (B, 6, D) timestep modulation
    (1, 97, 111, "contiguous", ("sample_view", "sample_view", "sample_view"), "fp32"),
    (1, 97, 111, "contiguous", ("sample_view", "sample_view", "sample_view"), "x"),
    # (B, S, D) chunk views of a (B, S, 6, D) modulation: S-stride 6D
    (2, 5, 64, "contiguous", ("token_view", "token_view", "token_view"), "fp32"),
    (2, 5, 64, "contiguous", ("token_view", "token_view", "token_view"), "x"),
    # an affine LayerNorm's (D,) vectors expanded over B (B-stride 0), a per-token gate
    (3, 7, 40, "contiguous", ("token", "vector", "vector"), "fp32"),
    (3, 7, 40, "contiguous", ("token", "vector", "vector"), "x"),
]


def inputs(B, S, D, dtype, x_layout, kinds, mod_dtypes, device="cpu"):
    x = activations(B, S, D, dtype, device, x_layout)
    y = activations(B, S, D, dtype, device, "contiguous" if x_layout == "transposed" else "transposed")
    dts = {"fp32": (torch.float32,) * 3, "x": (dtype,) * 3, "mixed": (torch.float32, torch.float32, dtype)}[mod_dtypes]
    gate = mod(kinds[0], B, S, D, dts[0], device, 2)
    scale = mod(kinds[1], B, S, D, dts[1], device, 4, mul=0.5)
    shift = mod(kinds[2], B, S, D, dts[2], device, 3)
    return x, y, gate, scale, shift


def check(backend, x, y, gate, scale, shift, what):
    x_new, h = ops.gated_residual_adaln(x, y, gate, scale, shift, 1e-6, backend=backend)
    for t in (x_new, h):
        assert t.dtype == x.dtype and t.shape == x.shape and t.is_contiguous()
    ex_x, ex_h = ref.gated_residual_adaln(*f64(x, y, gate, scale, shift), 1e-6)
    lo_x, lo_h = ref.gated_residual_adaln(x, y, gate, scale, shift, 1e-6)
    what = f"{backend} gated_residual_adaln {what}"
    assert_close(x_new, ex_x, tol(backend, x.dtype, lo_x, ex_x), what + " x_new")
    assert_close(h, ex_h, tol(backend, x.dtype, lo_h, ex_h), what + " h")
    return x_new, lo_x


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(backend, case, dtype):
    B, S, D, x_layout, kinds, mod_dtypes = case
    x_new, lo_x = check(backend, *inputs(B, S, D, dtype, x_layout, kinds, mod_dtypes), f"{dtype} {case}")
    if backend == "cpu":  # the residual is the reference's fp32 sum rounded once to x's dtype: bit for bit
        assert torch.equal(x_new, lo_x)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_reads_strided_views_and_mixed_dtypes(backend):
    B, S, D = 2, 9, 48
    # x a slice of a wider buffer (row strides, no copy), y transposed (last dim not contiguous)
    x = nonzero(B, S, 2 * D, dtype=torch.bfloat16)[..., :D]
    y = nonzero(B, D, S, dtype=torch.bfloat16).transpose(1, 2)
    assert not x.is_contiguous() and y.stride(-1) != 1
    gate = nonzero(B, D, dtype=torch.bfloat16)  # x's dtype, while scale/shift are fp32
    scale, shift = nonzero(B, S, D) * 0.5, nonzero(1, D).expand(B, D)
    check(backend, x, y, gate, scale, shift, "strided / mixed dtypes")


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_normalises_the_rounded_sum(backend):
    # bf16 near 256 (ulp 2, or 1 just below): x + y with |y| < half an ulp rounds back to x, so
    # the statistics of the rounded x_new and of the fp32 sum differ, and h shows which were used
    B, S, D = 1, 3, 64
    x = (256 + 2 * torch.randint(-1, 2, (B, S, D))).to(torch.bfloat16)
    y = (0.45 * torch.randint(0, 2, (B, S, D)) * 2 - 0.45).to(torch.bfloat16)
    gate, zero = torch.ones(B, D), torch.zeros(B, D)
    x_new, h = ops.gated_residual_adaln(x, y, gate, zero, zero, 1e-6, backend=backend)
    assert torch.equal(x_new, x)
    expect = ref.gated_residual_adaln(x, y, gate, zero, zero, 1e-6)[1]
    unrounded = F.layer_norm(x.float() + y.float(), (D,), eps=1e-6)  # what a kernel skipping the rounding gets
    assert rel_err(unrounded, expect) > 0.1  # the two are far apart: the check below can tell them apart
    assert_close(h, expect, 1e-2, "h from the rounded x_new")


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_passes_torch_library_opcheck(backend):
    from flgengine.ops import triton as tri

    op = native.gated_residual_adaln if backend == "cpu" else tri.gated_residual_adaln_triton
    x, y, g, h = nonzero(2, 3, 16), nonzero(2, 3, 16), nonzero(2, 16), nonzero(2, 3, 16)
    torch.library.opcheck(op, (x, y, g, g, h, 1e-6), test_utils=("test_schema", "test_faketensor"))


@needs_C
def test_cpu_refuses_bad_inputs_before_compute():
    x, y = nonzero(2, 3, 8), nonzero(2, 3, 8)
    good = nonzero(2, 8)
    with pytest.raises(registry.BackendUnavailable, match=r"gate must be \(B, D\)"):
        ops.gated_residual_adaln(x, y, nonzero(3, 8), good, good, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="y must match x"):
        ops.gated_residual_adaln(x, y.half(), good, good, good, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="scale dtype torch.float64"):
        ops.gated_residual_adaln(x.half(), y.half(), good, good.double(), good, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="require grad"):
        ops.gated_residual_adaln(x.requires_grad_(), y, good, good, good, backend="cpu")


@needs_C
def test_cpu_passes_empty_batches_through():
    x, g = torch.empty(0, 5, 16), torch.empty(0, 16)
    x_new, h = ops.gated_residual_adaln(x, x, g, g, g, backend="cpu")
    assert x_new.shape == h.shape == (0, 5, 16)


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_odd_shapes_and_layouts(gpu_backend, dtype):
    for B, S, D, x_layout, kinds, mod_dtypes in CASES:
        x, y, gate, scale, shift = inputs(B, S, D, dtype, x_layout, kinds, mod_dtypes, device="cuda")
        check(gpu_backend, x, y, gate, scale, shift, f"{dtype} {(B, S, D)} {x_layout} {kinds} {mod_dtypes}")
    torch.cuda.synchronize()
    assert registry.pick("gated_residual_adaln", (x, y, gate, scale, shift))[0] in ("triton", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kinds", [("sample_view", "sample_view", "sample_view"), ("sample_view", "vector", "vector"),
                                   ("ones", "sample_view", "sample_view")], ids=case_id)
def test_gpu_wan_1_3b_480p(gpu_backend, dtype, kinds):
    # Wan-1.3B 480p x 81 frames: 32760 tokens x 1536; (B, 6, D) chunk views, the cross-attention
    # norm fusion (affine LayerNorm vectors) and the FFN fusion
    x, y, gate, scale, shift = inputs(*WAN, dtype, "contiguous", kinds, "fp32", device="cuda")
    check(gpu_backend, x, y, gate, scale, shift, f"{dtype} Wan {kinds}")
    torch.cuda.synchronize()
    assert registry.pick("gated_residual_adaln", (x, y, gate, scale, shift))[0] in ("triton", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
def test_gpu_strided_and_x_dtype_modulation(gpu_backend):
    B, S, D = 2, 33, 200
    x = nonzero(B, S, 2 * D, dtype=torch.bfloat16).cuda()[..., :D]
    y = nonzero(B, D, S, dtype=torch.bfloat16).cuda().transpose(1, 2)
    m = nonzero(B, S, 6, D, dtype=torch.bfloat16).cuda()
    check(gpu_backend, x, y, m[:, :, 2], m[:, :, 1], m[:, :, 0], "strided, x-dtype modulation")

