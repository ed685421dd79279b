"""Which backend serves an op (flgengine/ops/registry.py): the `backend=` argument,
FLG_BACKEND, the automatic pick and its fallback, and the refusals of backends that cannot
serve an input (the C++ / CUDA ops and the Triton kernels)."""

import pytest
import torch

from flgengine import ops
from flgengine.ops import native, ref, registry
from flgengine.ops.triton import _common
from helpers import assert_close
from opcases import f64, needs_triton, nonzero


def test_explicit_backend_that_cannot_serve_raises():
    x, s, h = nonzero(1, 2, 8), nonzero(1, 8), nonzero(1, 8)
    with pytest.raises(registry.BackendUnavailable, match="cuda"):
        ops.adaln_modulate(x, s, h, backend="cuda")  # CPU tensors
    with pytest.raises(registry.BackendUnavailable, match="no 'cpu' backend"):
        ops.rms_norm(x, s[0], backend="cpu")
    with pytest.raises(ValueError, match="not a backend"):
        ops.adaln_modulate(x, s, h, backend="tpu")


def test_env_backend_and_automatic_pick(monkeypatch):
    x, s, h = nonzero(1, 2, 8), nonzero(1, 8), nonzero(1, 8)
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


def test_automatic_pick_falls_back_and_logs_once(caplog):
    x, s, h = nonzero(1, 2, 8), nonzero(1, 8), nonzero(1, 8, dtype=torch.float64)  # float64 mod: native refuses
    caplog.set_level("INFO", logger="flgengine.ops")
    registry._LOGGED.clear()
    for _ in range(3):
        assert registry.pick("adaln_modulate", (x, s, h))[0] == "ref"
    if native._C is not None:
        assert sum("falls back" in r.message for r in caplog.records) == 1


@needs_triton
def test_env_backend_picks_triton_under_the_interpreter(interpreter, monkeypatch):
    x, s, h = nonzero(1, 3, 16), nonzero(1, 16), nonzero(1, 16)
    q = nonzero(1, 5, 2, 8)
    monkeypatch.setenv("FLG_BACKEND", "triton")
    assert registry.pick("adaln_modulate", (x, s, h))[0] == "triton"
    assert registry.pick("attention", (q, q, q))[0] == "triton"
    assert_close(ops.attention(q, q, q), ref.attention(*f64(q, q, q)), 1e-5, "FLG_BACKEND=triton attention")
    assert "triton" in ops.backends_for("qk_norm_rope")


def test_explicit_triton_backend_that_cannot_serve_raises(monkeypatch):
    monkeypatch.delenv("FLG_BACKEND", raising=False)
    x, s, h = nonzero(1, 3, 16), nonzero(1, 16), nonzero(1, 16)
    q = nonzero(1, 5, 2, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(registry.BackendUnavailable, match="TRITON_INTERPRET=1"):
        ops.adaln_modulate(x, s, h, backend="triton")  # CPU tensors, no interpreter
    monkeypatch.setattr(_common, "import_error", lambda: "triton is not importable (ImportError: test)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(registry.BackendUnavailable, match="triton is not importable"):
        ops.attention(q, q, q, backend="triton")


@needs_triton
def test_explicit_triton_backend_refuses_unsupported_inputs(interpreter):
    x, s, h = nonzero(1, 3, 16), nonzero(1, 16), nonzero(1, 16)
    q = nonzero(1, 5, 2, 8)
    refuse = lambda match: pytest.raises(registry.BackendUnavailable, match=match)  # noqa: E731
    with refuse("no backward"):
        ops.adaln_modulate(x.clone().requires_grad_(), s, h, backend="triton")
    with torch.no_grad():  # without autograd the same input is served
        ops.adaln_modulate(x.clone().requires_grad_(), s, h, backend="triton")
    with refuse("x dtype torch.float64"):
        ops.adaln_modulate(x.double(), s, h, backend="triton")
    with refuse(r"scale must be \(B, D\)"):
        ops.adaln_modulate(x, s[:, :8], h, backend="triton")
    with refuse("gate dtype torch.float16 must be float32 or x's dtype"):
        ops.gated_residual_adaln(x, x, s.half(), s, h, backend="triton")
    with refuse("head dim D=264"):
        big = nonzero(1, 2, 1, 264)
        ops.attention(big, big, big, backend="triton")
    with refuse("v dtype torch.float16 must be q's dtype"):
        ops.attention(q, q, q.half(), backend="triton")
    with refuse(r"cos must be \(S, Dh/2\) with S=3"):
        ops.qk_norm_rope(x, x, s[0], s[0], torch.ones(4, 4), torch.ones(4, 4), 2, backend="triton")
    with refuse("not a multiple of the head dim"):
        ops.qk_norm_rope(x, x, s[0], s[0], torch.ones(3, 3), torch.ones(3, 3), 2, backend="triton")
