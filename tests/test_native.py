"""flgengine._C: the build, the C++ CPU adaln_modulate against the reference, dispatch."""

import pytest
import torch

from flgengine import ops
from flgengine.ops import native, ref, registry
from helpers import assert_close

needs_C = pytest.mark.skipif(native._C is None, reason="flgengine._C not built")

# Tolerance per dtype: bf16/fp16 outputs differ from the fp64 reference by one rounding of
# the output (<= 2^-8 / 2^-11 relative per element); fp32 by accumulated fp32 rounding.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _nonzero(*shape, dtype=torch.float32):
    x = torch.randn(*shape, dtype=torch.float64)
    return (x + 0.1 * x.sign() + (x == 0)).to(dtype)  # never zero


@needs_C
def test_build_info_reports_cuda_arches_and_backends():
    info = native.build_info()
    assert "cpu" in info["backends"] and "adaln_modulate" in info["ops"]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:  # built here with nvcc: the Hopper arch-specific target is in
        assert "90a" in info["cuda_archs"].split(";") and "80" in info["cuda_archs"].split(";")
        assert "cuda" in info["backends"]


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
    torch.library.opcheck(native._adaln_modulate_native, (x, s, h, 1e-6), test_utils=("test_schema", "test_faketensor"))


def test_explicit_backend_that_cannot_serve_raises():
    x, s, h = _nonzero(1, 2, 8), _nonzero(1, 8), _nonzero(1, 8)
    with pytest.raises(registry.BackendUnavailable, match="cuda"):
        ops.adaln_modulate(x, s, h, backend="cuda")  # CPU tensors
    with pytest.raises(registry.BackendUnavailable, match="no 'cpu' backend"):
        ops.attention(x.unsqueeze(2), x.unsqueeze(2), x.unsqueeze(2), backend="cpu")
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
    q = _nonzero(1, 3, 2, 8)
    assert ops.attention(q, q, q).shape == q.shape
    monkeypatch.delenv("FLG_BACKEND")
    expected = "cpu" if native._C is not None else "ref"
    assert registry.pick("adaln_modulate", (x, s, h))[0] == expected
    # inputs that need grad take the reference (fused ops have no backward)
    assert registry.pick("adaln_modulate", (x.requires_grad_(), s, h))[0] == "ref"


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
    assert registry.pick("adaln_modulate", (x, scale, shift))[0] == "cuda"


@needs_C
def test_C_reports_bad_arguments_as_value_errors():
    x = torch.ones(1, 2, 8)
    args = [x.data_ptr()] * 4 + [1, 2, 8, 8, 0, 1e-6]
    with pytest.raises(ValueError, match="unsupported dtypes x=unknown"):
        native._C.adaln_modulate_cpu(*args, 7, 0)
    with pytest.raises(ValueError, match="invalid arguments"):
        native._C.adaln_modulate_cpu(0, *args[1:], 0, 0)
