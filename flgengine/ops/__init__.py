"""The op facade: the model calls these; each picks a backend through `registry`.

Every op takes `backend=None|"ref"|"cpu"|"cuda"|"triton"` (None: the `FLG_BACKEND`
environment variable, else an automatic pick). `ref` is the definition (`ref.py`).
"""

from __future__ import annotations

import torch

from . import native, ref, registry
from .registry import BACKENDS, BackendUnavailable

__all__ = ["adaln_modulate", "rms_norm", "apply_rope", "attention", "BACKENDS", "BackendUnavailable", "backends_for"]

_ALWAYS = lambda *tensors: None  # noqa: E731  (the reference serves every input)

registry.register("adaln_modulate", "ref", ref.adaln_modulate, _ALWAYS)
registry.register("adaln_modulate", "cpu", native.adaln_modulate, native.adaln_why_not("cpu"))
registry.register("adaln_modulate", "cuda", native.adaln_modulate, native.adaln_why_not("cuda"))
for _op in ("rms_norm", "apply_rope", "attention"):
    registry.register(_op, "ref", getattr(ref, _op), _ALWAYS)


def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """LayerNorm (no affine) then x * (1 + scale) + shift. x: (B, S, D); scale/shift: (B, D) or (B, S, D)."""
    _, impl = registry.pick("adaln_modulate", (x, scale, shift), backend)
    return impl(x, scale, shift, eps)


def _impl(op: str, tensors, backend: str | None):
    return registry.pick(op, tensors, backend)[1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim. x: (..., N); weight: (N,)."""
    return _impl("rms_norm", (x, weight), backend)(x, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Interleaved-pair RoPE. x: (B, S, H, Dh); cos, sin: (S, Dh/2)."""
    return _impl("apply_rope", (x, cos, sin), backend)(x, cos, sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Non-causal attention. q: (B, Sq, H, Dh); k, v: (B, Skv, H, Dh) -> (B, Sq, H, Dh)."""
    return _impl("attention", (q, k, v), backend)(q, k, v)


def backends_for(op: str) -> list[str]:
    return sorted(registry.available(op))
