"""The FP8-out ops that make an FP8 linear's input in the pass before it: adaln_modulate_fp8,
gated_residual_adaln_fp8 (the block's norms) and gelu_fp8 (the FFN's activation).

The reference (flgengine/ops/ref.py) is checked against the analytic bound of per-token e4m3
rounding of the float64 value; the Triton kernels (Triton's interpreter on the CPU, compiled
with the `gpu` marker) against the reference, code for code."""

import pytest
import torch
import torch.nn.functional as F

from flgengine import ops
from flgengine.ops import ref, registry
from helpers import assert_close
from opcases import DTYPES, WAN, activations, case_id, f64, mod, needs_triton, nonzero, tol

CASES = [  # B, S, D, x layout, modulation kind
    (1, 7, 40, "contiguous", "sample"),
    (2, 37, 72, "transposed", "token_view"),
    (1, 9, 112, "sliced", "sample_view"),
    (3, 5, 64, "contiguous", "token"),
    (2, 1, 1536, "contiguous", "sample"),
]


def dequant(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x8.double() * scale.double()


def assert_e4m3_rounding_of(x8, scale, value: torch.Tensor, what: str):
    """x8 * scale is `value` (float64, (..., K)) rounded per token to e4m3: scale = max |value|
    / 448 per token, and each element within half an e4m3 step (relative 2^-4 in the normal
    range, 2^-10 * scale below it), with fp32 slack."""
    assert x8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32, what
    assert x8.shape == value.shape and scale.shape == (*value.shape[:-1], 1), what
    amax = value.abs().amax(dim=-1, keepdim=True)
    assert_close(scale.double(), (amax / 448).clamp_min(1e-12), 1e-6, f"{what}: scales")
    err = (dequant(x8, scale) - value).abs()
    bound = value.abs() * 2.0**-4 + scale.double() * 2.0**-10 + amax * 1e-6
    assert (err <= bound).all(), f"{what}: worst error {(err / bound).max().item():.3f} x the rounding bound"


def assert_same_codes(a8, a_scale, b8, b_scale, what: str):
    """Two quantisations of the same value computed in different fp32 orders: scales equal to
    fp32 rounding; codes equal but for rare ties (one e4m3 step at most, < 1% of elements)."""
    assert a8.shape == b8.shape and a_scale.shape == b_scale.shape, what
    assert_close(a_scale, b_scale, 1e-6, f"{what}: scales")
    a, b = a8.double(), b8.double()
    differ = a != b
    assert differ.double().mean() < 0.01, f"{what}: {differ.double().mean().item():.2%} of the codes differ"
    step = b.abs().clamp_min(2.0**-6) * 2.0**-3  # one e4m3 step at b
    assert ((a - b).abs() <= step + 2.0**-9).all(), f"{what}: codes differ by more than one step"


def _inputs(B, S, D, dtype, device, x_layout, mod_kind):
    x = activations(B, S, D, dtype, device, x_layout)
    y = activations(B, S, D, dtype, device, "contiguous") * 0.5
    gate = mod(mod_kind, B, S, D, torch.float32, device, 2)
    scale = mod(mod_kind, B, S, D, torch.float32, device, 1, mul=0.5)
    shift = mod(mod_kind, B, S, D, torch.float32, device, 0)
    return x, y, gate, scale, shift


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[:3], ids=case_id)
def test_reference_is_the_per_token_rounding_of_the_fp32_value(case, dtype):
    x, y, gate, scale, shift = _inputs(*case[:3], dtype, "cpu", *case[3:])
    h64 = ref.adaln_modulate(*f64(x, scale, shift), 1e-6)
    assert_e4m3_rounding_of(*ref.adaln_modulate_fp8(x, scale, shift), h64, "adaln_modulate_fp8")
    x_new, h8, hs = ref.gated_residual_adaln_fp8(x, y, gate, scale, shift)
    assert torch.equal(x_new, ref.gated_residual_adaln(x, y, gate, scale, shift)[0])  # the stream as without FP8
    assert_e4m3_rounding_of(h8, hs, ref.adaln_modulate(*f64(x_new, scale, shift), 1e-6), "gated_residual_adaln_fp8")
    g = (x * 1.5).to(dtype)
    assert_e4m3_rounding_of(*ref.gelu_fp8(g), F.gelu(g.double(), approximate="tanh"), "gelu_fp8")


def check_triton(B, S, D, dtype, x_layout, mod_kind, device="cpu"):
    x, y, gate, scale, shift = _inputs(B, S, D, dtype, device, x_layout, mod_kind)
    what = f"{dtype} {(B, S, D)} x={x_layout} mod={mod_kind}"
    a = ops.adaln_modulate_fp8(x, scale, shift, backend="triton")
    assert_same_codes(*a, *ref.adaln_modulate_fp8(x, scale, shift), f"adaln_modulate_fp8 {what}")
    x_new, *h = ops.gated_residual_adaln_fp8(x, y, gate, scale, shift, backend="triton")
    r_new, *r = ref.gated_residual_adaln_fp8(x, y, gate, scale, shift)
    expect = ref.gated_residual_adaln(*f64(x, y, gate, scale, shift))[0]
    assert x_new.dtype == dtype and x_new.is_contiguous()
    assert_close(x_new, expect, tol("triton", dtype, r_new, expect), f"gated x_new {what}")
    assert_same_codes(*h, *r, f"gated_residual_adaln_fp8 {what}")
    g = x * 3  # tails of the tanh (|x| up to ~20) and a non-contiguous layout where x has one
    assert_same_codes(*ops.gelu_fp8(g, backend="triton"), *ref.gelu_fp8(g), f"gelu_fp8 {what}")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(interpreter, case, dtype):
    check_triton(*case[:3], dtype, *case[3:])


@needs_triton
def test_triton_refuses_what_it_cannot_serve(interpreter):
    x = torch.randn(2, 3, 16)
    with pytest.raises(registry.BackendUnavailable, match="x dtype torch.float64"):
        ops.gelu_fp8(x.double(), backend="triton")
    with pytest.raises(registry.BackendUnavailable, match=r"K <= 16384"):
        ops.gelu_fp8(torch.randn(1, 16385), backend="triton")
    with pytest.raises(registry.BackendUnavailable, match=r"scale must be \(B, D\)"):
        ops.adaln_modulate_fp8(x, torch.randn(2, 8), torch.randn(2, 16), backend="triton")


@needs_triton
def test_triton_custom_ops_pass_torch_library_opcheck(interpreter):
    """The torch.library wrappers (what torch.compile and CUDA graphs see): schema and fake
    tensors (e4m3 (B, S, D) and fp32 (B, S, 1) outputs) agree with the kernels."""
    from flgengine.ops import triton as tri

    x, y, m = nonzero(2, 3, 16), nonzero(2, 3, 16), nonzero(2, 16)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(tri.adaln_modulate_fp8_triton, (x, m, m, 1e-6), test_utils=checks)
    torch.library.opcheck(tri.gated_residual_adaln_fp8_triton, (x, y, m, m, m, 1e-6), test_utils=checks)
    torch.library.opcheck(tri.gelu_fp8_triton, (x,), test_utils=checks)


def test_the_cpu_picks_the_reference():
    x = torch.randn(1, 2, 8)
    assert registry.pick("gelu_fp8", (x,))[0] == "ref"
    assert registry.pick("adaln_modulate_fp8", (x, x[:, 0], x[:, 0]))[0] == "ref"


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [*CASES, (*WAN, "contiguous", "sample_view")], ids=case_id)
def test_gpu_triton_matches_reference(compiled, case, dtype):
    # (1, 32760, 1536): Wan-1.3B 480p x 81 frames; the compiled kernels are picked automatically
    check_triton(*case[:3], dtype, *case[3:], device="cuda")
    x = torch.randn(1, 4, 16, device="cuda", dtype=dtype)
    assert registry.pick("gelu_fp8", (x,))[0] == "triton"
