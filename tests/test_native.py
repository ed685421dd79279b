"""flgengine._C: the build, the C++ CPU ops against the reference, dispatch, the CUDA ops
(on a GPU, and their kernels in host emulation everywhere)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flgengine import ops
from flgengine.ops import native, ref, registry
from helpers import assert_close, rel_err

needs_C = pytest.mark.skipif(native._C is None, reason="flgengine._C not built")

# Tolerance per dtype: bf16/fp16 outputs differ from the fp64 reference by one rounding of
# the output (<= 2^-8 / 2^-11 relative per element); fp32 by accumulated fp32 rounding.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _nonzero(*shape, dtype=torch.float32):
    x = torch.randn(*shape, dtype=torch.float64)
    return (x + 0.1 * x.sign() + (x == 0)).to(dtype)  # never zero


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NATIVE_OPS = ("adaln_modulate", "gated_residual_adaln", "qk_norm_rope", "attention")


@needs_C
def test_build_info_reports_cuda_arches_and_backends():
    info = native.build_info()
    assert "cpu" in info["backends"] and set(NATIVE_OPS) <= set(info["ops"])
    assert all(hasattr(native._C, f"{op}_cpu") for op in NATIVE_OPS)
    assert isinstance(info["cuda"], bool)
    if shutil.which("nvcc") or os.environ.get("CUDACXX"):  # a CUDA compiler here: the CUDA ops must be built in
        assert info["cuda"], "nvcc is present but flgengine._C was built without CUDA"
    if info["cuda"]:  # Ampere and the Hopper arch-specific target
        assert {"80", "90a"} <= set(info["cuda_archs"].split(";"))
        assert "cuda" in info["backends"]
        assert all(hasattr(native._C, f"{op}_cuda") for op in NATIVE_OPS)


@needs_C
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,per_token", [((1, 97, 111), False), ((3, 5, 64), True), ((2, 1, 1536), False)])
@pytest.mark.parametrize("mod_fp32", [True, False])
def test_cpu_adaln_modulate_matches_reference(dtype, shape, per_token, mod_fp32):
    B, S, D = shape
    x = _nonzero(B, S, D, dtype=dtype) * 3 + 1
    mshape = (B, S, D) if per_token else (B, D)
    mdt = torch.float32 if mod_fp32 else dtype
    scale, shift = _nonzero(*mshape, dtype=mdt) * 0.5, _nonzero(*mshape, dtype=mdt)
    out = ops.adaln_modulate(x, scale, shift, 1e-6, backend="cpu")
    assert out.dtype == dtype and out.shape == x.shape
    expect = ref.adaln_modulate(x.double(), scale.double(), shift.double(), 1e-6)
    # the reference run in the kernel's dtype sets the bar: at most 2x its own error, or the table
    ref_lo = ref.adaln_modulate(x, scale, shift, 1e-6)
    from helpers import rel_err
    tol = max(2 * rel_err(ref_lo, expect), TOL[dtype])
    assert_close(out, expect, tol, f"cpu adaln_modulate {dtype} {shape}")


@needs_C
def test_cpu_adaln_modulate_reads_strided_modulation_views():
    # the block passes chunk views of a (B, 6, D) modulation: strides (6D, 1), no copies
    B, S, D = 2, 7, 40
    x = _nonzero(B, S, D)
    mod = _nonzero(B, 6, D)
    scale, shift = mod[:, 1], mod[:, 0]
    assert not scale.is_contiguous()
    out = ops.adaln_modulate(x, scale, shift, backend="cpu")
    assert_close(out, ref.adaln_modulate(x.double(), scale.double(), shift.double()), 2e-6, "strided mod")
    # per-token chunk views (B, S, 6, D) and a non-contiguous x
    mod_t = _nonzero(B, S, 6, D)
    xt = _nonzero(B, D, S).transpose(1, 2)
    out = ops.adaln_modulate(xt, mod_t[:, :, 1], mod_t[:, :, 0], backend="cpu")
    assert_close(out, ref.adaln_modulate(xt.double(), mod_t[:, :, 1].double(), mod_t[:, :, 0].double()), 2e-6, "per-token views")


@needs_C
def test_native_op_passes_torch_library_opcheck():
    x, s, h = _nonzero(2, 3, 16), _nonzero(2, 16), _nonzero(2, 16)
    torch.library.opcheck(native.adaln_modulate, (x, s, h, 1e-6), test_utils=("test_schema", "test_faketensor"))


def test_explicit_backend_that_cannot_serve_raises():
    x, s, h = _nonzero(1, 2, 8), _nonzero(1, 8), _nonzero(1, 8)
    with pytest.raises(registry.BackendUnavailable, match="cuda"):
        ops.adaln_modulate(x, s, h, backend="cuda")  # CPU tensors
    with pytest.raises(registry.BackendUnavailable, match="no 'cpu' backend"):
        ops.rms_norm(x, s[0], backend="cpu")
    with pytest.raises(ValueError, match="not a backend"):
        ops.adaln_modulate(x, s, h, backend="tpu")


def test_env_backend_and_automatic_pick(monkeypatch):
    x, s, h = _nonzero(1, 2, 8), _nonzero(1, 8), _nonzero(1, 8)
    monkeypatch.setenv("FLG_BACKEND", "ref")
    assert registry.pick("adaln_modulate", (x, s, h))[0] == "ref"
    monkeypatch.setenv("FLG_BACKEND", "cuda")  # env forces: an unservable forced backend raises
    with pytest.raises(registry.BackendUnavailable):
        ops.adaln_modulate(x, s, h)
    # ...but ops that have no cuda implementation at all run their reference
    assert "cuda" not in ops.backends_for("rms_norm")
    assert ops.rms_norm(x, s[0]).shape == x.shape
    monkeypatch.delenv("FLG_BACKEND")
    expected = "cpu" if native._C is not None else "ref"
    assert registry.pick("adaln_modulate", (x, s, h))[0] == expected
    # inputs that need grad take the reference (fused ops have no backward)
    assert registry.pick("adaln_modulate", (x.requires_grad_(), s, h))[0] == "ref"


def test_cpu_attention_serves_explicit_requests_only(monkeypatch):
    """The C++ attention is correct but slower than torch SDPA on CPU: the automatic pick
    keeps the reference, an explicit request (argument or FLG_BACKEND) gets it."""
    q = _nonzero(1, 5, 2, 8)
    assert registry.pick("attention", (q, q, q))[0] == "ref"
    if native._C is not None:
        assert registry.pick("attention", (q, q, q), "cpu")[0] == "cpu"
        with registry.prefer("cpu"):  # a model-wide preference keeps the faster reference here
            assert registry.pick("attention", (q, q, q))[0] == "ref"
            assert registry.pick("adaln_modulate", (q[:, :, 0], q[:, 0, 0], q[:, 0, 0]))[0] == "cpu"
        monkeypatch.setenv("FLG_BACKEND", "cpu")
        assert registry.pick("attention", (q, q, q))[0] == "cpu"


def test_automatic_pick_falls_back_and_logs_once(caplog):
    x, s, h = _nonzero(1, 2, 8), _nonzero(1, 8), _nonzero(1, 8, dtype=torch.float64)  # float64 mod: native refuses
    caplog.set_level("INFO", logger="flgengine.ops")
    registry._LOGGED.clear()
    for _ in range(3):
        assert registry.pick("adaln_modulate", (x, s, h))[0] == "ref"
    if native._C is not None:
        assert sum("falls back" in r.message for r in caplog.records) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,per_token", [((1, 97, 111), False), ((2, 33, 64), True), ((1, 32760, 1536), False)])
def test_cuda_adaln_modulate_matches_reference(dtype, shape, per_token):
    if not native.build_info()["cuda"]:
        pytest.skip("flgengine._C built without CUDA")
    B, S, D = shape  # (1, 32760, 1536): Wan-1.3B 480p x 81 frames
    x = (_nonzero(B, S, D) * 3 + 1).cuda().to(dtype)
    mshape = (B, S, D) if per_token else (B, 6, D)
    mod = _nonzero(*mshape).cuda()
    scale, shift = (mod, mod * 0.5) if per_token else (mod[:, 1], mod[:, 0])
    out = ops.adaln_modulate(x, scale, shift, backend="cuda")
    torch.cuda.synchronize()
    expect = ref.adaln_modulate(x.double(), scale.double(), shift.double())
    from helpers import rel_err
    tol = max(2 * rel_err(ref.adaln_modulate(x, scale, shift), expect), TOL[dtype])
    assert_close(out, expect, tol, f"cuda adaln_modulate {dtype} {shape}")
    assert registry.pick("adaln_modulate", (x, scale, shift))[0] in ("triton", "cuda")  # a fused kernel, not ref


@needs_C
def test_C_reports_bad_arguments_as_value_errors():
    x = torch.ones(1, 2, 8)
    v = native.view(x)
    mod = native.view(x[:, :1].expand(1, 2, 8))  # a per-sample modulation: stride 0 over S
    good = dict(out=v, x=v, scale=mod, shift=mod, eps=1e-6)
    native._C.adaln_modulate_cpu(**good)
    with pytest.raises(ValueError, match=r"adaln_modulate: argument x: unsupported dtype code 7"):
        native._C.adaln_modulate_cpu(**{**good, "x": (v[0], 7, *v[2:])})
    with pytest.raises(ValueError, match="argument out: null data pointer"):
        native._C.adaln_modulate_cpu(**{**good, "out": (0, *v[1:])})
    with pytest.raises(ValueError, match="argument scale: negative size or stride"):
        native._C.adaln_modulate_cpu(**{**good, "scale": (*mod[:4], (0, -8, 1))})
    with pytest.raises(ValueError, match="argument shift: expected a tensor view"):
        native._C.adaln_modulate_cpu(**{**good, "shift": x.data_ptr()})
    with pytest.raises(ValueError, match="argument x: tensor is on cuda, this entry point takes cpu tensors"):
        native._C.adaln_modulate_cpu(**{**good, "x": (v[0], v[1], 1, *v[3:])})
    with pytest.raises(ValueError, match=r"adaln_modulate \(cpu\): scale must have shape \(1, 2, 8\), got \(1, 8\)"):
        native._C.adaln_modulate_cpu(**{**good, "scale": native.view(x[:, 0])})
    with pytest.raises(ValueError, match="scale dtype bfloat16 must be float32 or x's dtype float16"):
        h = native.view(x.half())
        native._C.adaln_modulate_cpu(out=h, x=h, scale=native.view(x.bfloat16()), shift=h, eps=1e-6)
    with pytest.raises(ValueError, match="x must be contiguous"):
        native._C.adaln_modulate_cpu(**{**good, "x": native.view(torch.ones(1, 8, 2).transpose(1, 2))})
    # arguments go by name: none missing, none unknown (a swap cannot go unnoticed)
    with pytest.raises(TypeError, match="adaln_modulate: missing argument eps"):
        native._C.adaln_modulate_cpu(out=v, x=v, scale=mod, shift=mod)
    with pytest.raises(TypeError, match="adaln_modulate: unexpected argument gate"):
        native._C.adaln_modulate_cpu(**good, gate=mod)
    with pytest.raises(ValueError, match="argument eps: expected a number"):
        native._C.adaln_modulate_cpu(**{**good, "eps": "small"})


@needs_C
def test_C_fused_ops_report_bad_arguments_as_value_errors():
    x = torch.ones(1, 2, 8)
    v, m = native.view(x), native.view(x[:, :1].expand(1, 2, 8))
    gated = dict(x_out=v, h_out=v, x=v, y=v, gate=m, scale=m, shift=m, eps=1e-6)
    native._C.gated_residual_adaln_cpu(**gated)
    with pytest.raises(ValueError, match="gated_residual_adaln: argument x: unsupported dtype code 5"):
        native._C.gated_residual_adaln_cpu(**{**gated, "x": (v[0], 5, *v[2:])})
    with pytest.raises(ValueError, match="gate dtype bfloat16 must be float32 or x's dtype float16"):
        h = native.view(x.half())
        native._C.gated_residual_adaln_cpu(**{**gated, "x_out": h, "h_out": h, "x": h, "y": h,
                                              "gate": native.view(x.bfloat16())})
    with pytest.raises(ValueError, match="gate, scale and shift must share one dtype"):
        h = native.view(x.half())
        native._C.gated_residual_adaln_cpu(**{**gated, "x_out": h, "h_out": h, "x": h, "y": h, "gate": h})
    with pytest.raises(ValueError, match=r"gated_residual_adaln \(cpu\): x has D = 0"):
        e = native.view(torch.ones(1, 2, 0))
        native._C.gated_residual_adaln_cpu(**{k: e for k in gated if k != "eps"}, eps=1e-6)
    with pytest.raises(ValueError, match=r"h_out must have shape \(1, 2, 8\)"):
        native._C.gated_residual_adaln_cpu(**{**gated, "h_out": native.view(torch.ones(1, 8, 2))})
    q, w, cs = native.view(torch.ones(1, 2, 6)), native.view(torch.ones(6)), native.view(torch.ones(2, 1))
    qk = dict(q_out=native.view(torch.ones(1, 2, 3, 2)), k_out=native.view(torch.ones(1, 2, 3, 2)), q=q, k=q,
              q_weight=w, k_weight=w, cos=cs, sin=cs, eps=1e-6)
    native._C.qk_norm_rope_cpu(**qk)
    odd = native.view(torch.ones(1, 2, 2, 3))  # head dim 3
    with pytest.raises(ValueError, match=r"qk_norm_rope \(cpu\): q_out \(1, 2, 2, 3\) must split q's last dim 6 into "
                                         "heads of an even"):
        native._C.qk_norm_rope_cpu(**{**qk, "q_out": odd, "k_out": odd})
    with pytest.raises(ValueError, match="q_weight must be float32, got float16"):
        native._C.qk_norm_rope_cpu(**{**qk, "q_weight": native.view(torch.ones(6).half())})
    with pytest.raises(ValueError, match="unsupported dtype code 9"):
        native._C.qk_norm_rope_cpu(**{**qk, "q": (q[0], 9, *q[2:])})
    a = native.view(torch.ones(1, 2, 2, 8))
    attn = dict(out=a, q=a, k=a, v=a, scale=0.5)
    native._C.attention_cpu(**attn)
    with pytest.raises(ValueError, match=r"attention \(cpu\): k and v have no keys"):
        empty = native.view(torch.ones(1, 0, 2, 8))
        native._C.attention_cpu(**{**attn, "k": empty, "v": empty})
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        native._C.attention_cpu(**{**attn, "scale": float("nan")})
    with pytest.raises(ValueError, match="unsupported dtype code 3"):
        native._C.attention_cpu(**{**attn, "q": (a[0], 3, *a[2:])})
    with pytest.raises(ValueError, match="v must be float32, got float16"):
        native._C.attention_cpu(**{**attn, "v": native.view(torch.ones(1, 2, 2, 8).half())})


# ---- shared helpers of the fused-op tests ---------------------------------------------------

# Tolerance tables (relative Frobenius error vs the float64 reference) where they are looser
# than TOL: attention sums Skv products and exponentials in fp32.
ATTN_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _tol(low, expect, dtype, table=TOL) -> float:
    """At most 2x the reference's own error in the kernel's dtype, or the table's value."""
    return max(2 * rel_err(low, expect), table[dtype])


def _rope_tables(S, half, device="cpu"):
    angles = torch.rand(S, half, dtype=torch.float64, device=device) * 6 - 3
    return angles.cos().float(), angles.sin().float()


def _check_gated(x, y, gate, scale, shift, backend, what):
    x_new, h = ops.gated_residual_adaln(x, y, gate, scale, shift, 1e-6, backend=backend)
    assert x_new.dtype == h.dtype == x.dtype and x_new.shape == h.shape == x.shape
    assert x_new.is_contiguous() and h.is_contiguous()
    expect_x, expect_h = ref.gated_residual_adaln(x.double(), y.double(), gate.double(), scale.double(), shift.double())
    low_x, low_h = ref.gated_residual_adaln(x, y, gate, scale, shift)
    assert_close(x_new, expect_x, _tol(low_x, expect_x, x.dtype), f"{what} x_new")
    assert_close(h, expect_h, _tol(low_h, expect_h, x.dtype), f"{what} h")
    return x_new, h, low_x


# ---- gated_residual_adaln (cpu) ---------------------------------------------------------------

def _gated_inputs(case, dtype, mod_dtype, device="cpu"):
    """x, y and (gate, scale, shift) laid out as the model passes them."""
    if case == "per_sample":  # (B, D) chunk views of the (B, 6, D) timestep modulation
        B, S, D = 1, 97, 111
        mod = _nonzero(B, 6, D, dtype=mod_dtype).to(device)
        gate, scale, shift = mod[:, 2], mod[:, 1] * 0.5, mod[:, 0]
    elif case == "per_token":  # (B, S, D) chunk views of a (B, S, 6, D) modulation: S-stride 6D
        B, S, D = 2, 5, 64
        mod = _nonzero(B, S, 6, D, dtype=mod_dtype).to(device)
        gate, scale, shift = mod[:, :, 2], mod[:, :, 1], mod[:, :, 0]
    else:  # "expanded": an affine LayerNorm's (D,) vectors expanded over B (B-stride 0), a per-token gate
        B, S, D = 3, 7, 40
        w, b = _nonzero(D, dtype=mod_dtype).to(device), _nonzero(D, dtype=mod_dtype).to(device)
        gate = _nonzero(B, S, D, dtype=mod_dtype).to(device)
        scale, shift = (w - 1).expand(B, D), b.expand(B, D)
        assert scale.stride(0) == 0
    x = (_nonzero(B, S, D) * 3 + 1).to(device=device, dtype=dtype)
    y = _nonzero(B, S, D).to(device=device, dtype=dtype)
    return x, y, gate, scale, shift


@needs_C
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["per_sample", "per_token", "expanded"])
@pytest.mark.parametrize("mod_fp32", [True, False])
def test_cpu_gated_residual_adaln_matches_reference(dtype, case, mod_fp32):
    x, y, gate, scale, shift = _gated_inputs(case, dtype, torch.float32 if mod_fp32 else dtype)
    x_new, _, low_x = _check_gated(x, y, gate, scale, shift, "cpu", f"cpu gated_residual_adaln {dtype} {case}")
    # the residual is the reference's fp32 sum rounded once to x's dtype: bit for bit
    assert torch.equal(x_new, low_x)


@needs_C
def test_cpu_gated_residual_adaln_reads_strided_views_and_mixed_dtypes():
    B, S, D = 2, 9, 48
    # x a slice of a wider buffer (row strides, no copy), y transposed (last dim not contiguous)
    x = _nonzero(B, S, 2 * D, dtype=torch.bfloat16)[..., :D]
    y = _nonzero(B, D, S, dtype=torch.bfloat16).transpose(1, 2)
    assert not x.is_contiguous() and y.stride(-1) != 1
    gate = _nonzero(B, D, dtype=torch.bfloat16)  # x's dtype, while scale/shift are fp32
    scale, shift = _nonzero(B, S, D) * 0.5, _nonzero(1, D).expand(B, D)
    _check_gated(x, y, gate, scale, shift, "cpu", "strided / mixed dtypes")


@needs_C
def test_cpu_gated_residual_adaln_refuses_bad_inputs_before_compute():
    x, y = _nonzero(2, 3, 8), _nonzero(2, 3, 8)
    good = _nonzero(2, 8)
    with pytest.raises(registry.BackendUnavailable, match=r"gate must be \(B, D\)"):
        ops.gated_residual_adaln(x, y, _nonzero(3, 8), good, good, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="y must match x"):
        ops.gated_residual_adaln(x, y.half(), good, good, good, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="scale dtype torch.float64"):
        ops.gated_residual_adaln(x.half(), y.half(), good, good.double(), good, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="require grad"):
        ops.gated_residual_adaln(x.requires_grad_(), y, good, good, good, backend="cpu")


# ---- qk_norm_rope (cpu) -----------------------------------------------------------------------

def _qk_inputs(B, S, heads, head_dim, dtype, weight_dtype=torch.float32, device="cpu"):
    """q, k as strided views of a fused (B, S, 3 * H * Dh) projection, RMSNorm weights, rope tables."""
    N = heads * head_dim
    qkv = _nonzero(B, S, 3 * N).to(device=device, dtype=dtype)
    q, k = qkv[..., :N], qkv[..., N:2 * N] - 0.5
    q_weight = (1 + 0.3 * _nonzero(N)).to(device=device, dtype=weight_dtype)
    k_weight = _nonzero(N).to(device=device, dtype=weight_dtype)
    cos, sin = _rope_tables(S, head_dim // 2, device)
    return q, k, q_weight, k_weight, cos, sin


def _check_qk(args, heads, backend, what):
    q = args[0]
    q_out, k_out = ops.qk_norm_rope(*args, heads, 1e-6, backend=backend)
    B, S, N = q.shape
    assert q_out.shape == k_out.shape == (B, S, heads, N // heads)
    assert q_out.dtype == k_out.dtype == q.dtype and q_out.is_contiguous() and k_out.is_contiguous()
    expect = ref.qk_norm_rope(*(t.double() for t in args), heads, 1e-6)
    low = ref.qk_norm_rope(*args, heads, 1e-6)
    for got, e, lo, name in zip((q_out, k_out), expect, low, "qk"):
        assert_close(got, e, _tol(lo, e, q.dtype), f"{what} {name}")


@needs_C
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(1, 40), (2, 72), (3, 96), (2, 112), (3, 24)])
def test_cpu_qk_norm_rope_matches_reference(dtype, heads, head_dim):
    args = _qk_inputs(2, 7, heads, head_dim, dtype, weight_dtype=torch.float32 if head_dim != 96 else dtype)
    assert not args[0].is_contiguous()
    _check_qk(args, heads, "cpu", f"cpu qk_norm_rope {dtype} {heads}x{head_dim}")


@needs_C
def test_cpu_qk_norm_rope_strided_tables_and_transposed_input():
    B, S, H, Dh = 2, 5, 2, 40
    q = _nonzero(B, H * Dh, S).transpose(1, 2)  # last dim not contiguous: copied
    k = _nonzero(S, B, H * Dh).transpose(0, 1)  # batch stride smaller than the token stride
    angles = torch.rand(S, 2 * Dh) * 6 - 3
    cos, sin = angles.cos()[:, :Dh // 2], angles.sin()[:, 5:5 + Dh // 2]  # row stride 2*Dh
    args = (q, k, _nonzero(H * Dh), _nonzero(H * Dh), cos, sin)
    _check_qk(args, H, "cpu", "strided qk_norm_rope")


@needs_C
def test_cpu_qk_norm_rope_refuses_bad_inputs_before_compute():
    q, k, qw, kw, cos, sin = _qk_inputs(1, 3, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="num_heads=3 does not split"):
        ops.qk_norm_rope(q, k, qw, kw, cos, sin, 3, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match=r"cos must be \(S, Dh/2\)"):
        ops.qk_norm_rope(q, k, qw, kw, cos[:2], sin[:2], 2, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match=r"q_weight must be \(H\*Dh,\)"):
        ops.qk_norm_rope(q, k, qw[:4], kw, cos, sin, 2, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="not a multiple of the head dim"):
        ops.qk_norm_rope(q, k, qw, kw, cos[:, :3], sin[:, :3], 2, backend="cpu")


# ---- attention (cpu) --------------------------------------------------------------------------

ATTN_SHAPES = [(1, 7, 13, 1, 40), (2, 33, 65, 2, 72), (1, 65, 17, 3, 96), (1, 16, 16, 2, 112), (2, 9, 31, 3, 24)]


def _check_attention(q, k, v, backend, what):
    out = ops.attention(q, k, v, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    expect = ref.attention(q.double(), k.double(), v.double())
    low = ref.attention(q, k, v)
    assert_close(out, expect, _tol(low, expect, q.dtype, ATTN_TOL), what)


@needs_C
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Sq,Skv,H,D", ATTN_SHAPES)
def test_cpu_attention_matches_reference(dtype, B, Sq, Skv, H, D):
    q = (_nonzero(B, Sq, H, D) * 1.5).to(dtype)
    k, v = _nonzero(B, Skv, H, D, dtype=dtype), _nonzero(B, Skv, H, D, dtype=dtype)
    _check_attention(q, k, v, "cpu", f"cpu attention {dtype} B={B} Sq={Sq} Skv={Skv} H={H} D={D}")


@needs_C
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_attention_reads_strided_views(dtype):
    B, S, L, H, D = 2, 19, 11, 3, 40
    q, _, _ = _nonzero(B, S, 3, H, D, dtype=dtype).unbind(2)  # a fused qkv projection: token stride 3HD
    k = _nonzero(B, H, L, D, dtype=dtype).transpose(1, 2)  # head-major storage
    v = _nonzero(B, L, D, H, dtype=dtype).transpose(2, 3)  # last dim not contiguous: copied
    assert q.stride(1) == 3 * H * D and k.stride(2) == L * D and v.stride(-1) != 1
    _check_attention(q, k, v, "cpu", f"strided attention {dtype}")


@needs_C
def test_cpu_attention_refuses_bad_inputs_before_compute():
    q = _nonzero(1, 4, 2, 8)
    with pytest.raises(registry.BackendUnavailable, match=r"k and v must be \(B, Skv, H, D\)"):
        ops.attention(q, _nonzero(1, 4, 3, 8), _nonzero(1, 4, 3, 8), backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="no keys"):
        ops.attention(q, _nonzero(1, 0, 2, 8), _nonzero(1, 0, 2, 8), backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="share one dtype"):
        ops.attention(q, q.half(), q, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="must be \\(B, S, H, D\\)"):
        ops.attention(q[0], q[0], q[0], backend="cpu")


@needs_C
def test_cpu_fused_ops_pass_empty_batches_through():
    x = torch.empty(0, 5, 16)
    g = torch.empty(0, 16)
    x_new, h = ops.gated_residual_adaln(x, x, g, g, g, backend="cpu")
    assert x_new.shape == h.shape == (0, 5, 16)
    q, k, qw, kw, cos, sin = _qk_inputs(1, 3, 2, 8, torch.float32)
    q_out, k_out = ops.qk_norm_rope(q[:0], k[:0], qw, kw, cos, sin, 2, backend="cpu")
    assert q_out.shape == k_out.shape == (0, 3, 2, 8)
    q = _nonzero(2, 0, 3, 8)
    assert ops.attention(q, _nonzero(2, 4, 3, 8), _nonzero(2, 4, 3, 8), backend="cpu").shape == (2, 0, 3, 8)


# ---- torch.library registration and the raw entry points --------------------------------------

@needs_C
def test_fused_native_ops_pass_torch_library_opcheck():
    utils = ("test_schema", "test_faketensor")
    x, y, g = _nonzero(2, 3, 16), _nonzero(2, 3, 16), _nonzero(2, 16)
    torch.library.opcheck(native.gated_residual_adaln, (x, y, g, g, g, 1e-6), test_utils=utils)
    args = _qk_inputs(2, 3, 2, 8, torch.float32)
    torch.library.opcheck(native.qk_norm_rope, (*args, 2, 1e-6), test_utils=utils)
    q, k = _nonzero(2, 5, 2, 8), _nonzero(2, 7, 2, 8)
    torch.library.opcheck(native.attention, (q, k, k), test_utils=utils)


# ---- CUDA kernels in host emulation (no GPU needed) -------------------------------------------

@pytest.mark.slow
def test_cuda_kernels_match_reference_in_host_emulation(tmp_path):
    """csrc/emulate/kernels_emulate.cpp runs the device code of the three fused CUDA ops (with
    mma.sync emulated from the PTX fragment tables) on std::threads and checks each against
    a float64 reference: odd shapes, padded head dims, strided and unaligned inputs."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "kernels_emulate"
    subprocess.run([cxx, "-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-DFLG_HOST_EMULATION",
                    f"-I{root / 'csrc/emulate/shim'}", f"-I{root / 'csrc/include'}",
                    str(root / "csrc/emulate/kernels_emulate.cpp"), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(lines) >= 26 and all(line.startswith("ok") for line in lines), run.stdout
    for op in ("attention", "gated_residual_adaln", "qk_norm_rope"):
        assert any(op in line for line in lines)


# ---- cuda backend (GPU) -------------------------------------------------------------------------

def _needs_cuda_build():
    if not native.build_info()["cuda"]:
        pytest.skip("flgengine._C built without CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["per_sample", "per_token", "expanded", "wan"])
def test_cuda_gated_residual_adaln_matches_reference(dtype, case):
    _needs_cuda_build()
    if case == "wan":  # Wan-1.3B 480p x 81 frames: 32760 tokens x 1536, (B, 6, D) chunk views
        B, S, D = 1, 32760, 1536
        x = (_nonzero(B, S, D) * 3 + 1).cuda().to(dtype)
        y = _nonzero(B, S, D).cuda().to(dtype)
        mod = _nonzero(B, 6, D).cuda()
        gate, scale, shift = mod[:, 2], mod[:, 1], mod[:, 0]
    else:
        x, y, gate, scale, shift = _gated_inputs(case, dtype, torch.float32, device="cuda")
    _check_gated(x, y, gate, scale, shift, "cuda", f"cuda gated_residual_adaln {dtype} {case}")
    torch.cuda.synchronize()
    assert registry.pick("gated_residual_adaln", (x, y, gate, scale, shift))[0] in ("triton", "cuda")


@pytest.mark.gpu
def test_cuda_gated_residual_adaln_strided_and_x_dtype_modulation():
    _needs_cuda_build()
    B, S, D = 2, 33, 200
    x = _nonzero(B, S, 2 * D, dtype=torch.bfloat16).cuda()[..., :D]
    y = _nonzero(B, D, S, dtype=torch.bfloat16).cuda().transpose(1, 2)
    mod = _nonzero(B, S, 6, D, dtype=torch.bfloat16).cuda()
    _check_gated(x, y, mod[:, :, 2], mod[:, :, 1], mod[:, :, 0], "cuda", "cuda strided gated")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,heads,head_dim", [(1, 97, 2, 40), (2, 33, 3, 72), (1, 50, 2, 96), (1, 50, 2, 112),
                                                (1, 32760, 12, 128)])
def test_cuda_qk_norm_rope_matches_reference(dtype, B, S, heads, head_dim):
    _needs_cuda_build()  # (1, 32760, 12, 128): Wan-1.3B 480p, 1536 = 12 heads x 128
    args = _qk_inputs(B, S, heads, head_dim, dtype, device="cuda")
    _check_qk(args, heads, "cuda", f"cuda qk_norm_rope {dtype} {heads}x{head_dim}")
    torch.cuda.synchronize()
    # the automatic pick follows registry.CUDA_ORDER: Triton first where it can run, else this kernel
    runnable = []
    for cand in registry.CUDA_ORDER["qk_norm_rope"]:
        try:
            runnable.append(registry.pick("qk_norm_rope", args, cand)[0])
        except registry.BackendUnavailable:
            pass
    assert runnable[0] in ("triton", "cuda") and registry.pick("qk_norm_rope", args)[0] == runnable[0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Sq,Skv,H,D", [(1, 4096, 4096, 12, 128), (2, 77, 200, 3, 40), (1, 130, 77, 2, 72),
                                          (1, 65, 512, 2, 96), (1, 100, 100, 1, 112), (1, 33, 17, 1, 256),
                                          (2, 9, 31, 3, 24)])
def test_cuda_attention_matches_sdpa(dtype, B, Sq, Skv, H, D):
    _needs_cuda_build()  # (1, 4096, 4096, 12, 128): Wan-1.3B's 12 heads x 128 at a moderate length
    q = (_nonzero(B, Sq, H, D) * 1.5).cuda().to(dtype)
    k, v = _nonzero(B, Skv, H, D).cuda().to(dtype), _nonzero(B, Skv, H, D).cuda().to(dtype)
    _check_attention(q, k, v, "cuda", f"cuda attention {dtype} B={B} Sq={Sq} Skv={Skv} H={H} D={D}")
    torch.cuda.synchronize()
    assert registry.pick("attention", (q, k, v))[0] == "ref"  # explicit-only: SDPA measured faster


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_attention_reads_strided_views(dtype):
    _needs_cuda_build()
    B, S, L, H, D = 2, 300, 77, 4, 64
    q, _, _ = _nonzero(B, S, 3, H, D).cuda().to(dtype).unbind(2)
    k = _nonzero(B, H, L, D).cuda().to(dtype).transpose(1, 2)
    v = _nonzero(B, L + 1, H, D).cuda().to(dtype)[:, 1:]  # offset base pointer
    _check_attention(q, k, v, "cuda", f"cuda strided attention {dtype}")


@pytest.mark.gpu
def test_cuda_backend_refuses_what_its_kernels_cannot_serve():
    _needs_cuda_build()
    q = _nonzero(1, 8, 2, 12).cuda()  # head dim 12: not a multiple of 8
    with pytest.raises(registry.BackendUnavailable, match="multiple of 8"):
        ops.attention(q, q, q, backend="cuda")
    assert registry.pick("attention", (q, q, q))[0] != "cuda"  # the automatic pick falls back
