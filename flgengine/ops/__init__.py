"""The op facade: the model calls these; each picks a backend through `registry`.

Every op takes `backend=None|"ref"|"cpu"|"cuda"|"triton"` (None: the `FLG_BACKEND`
environment variable, else an automatic pick). `ref` is the definition (`ref.py`).
"""

from __future__ import annotations

import torch

from . import flex, native, ref, registry
from . import triton as triton_ops
from .block_mask import BlockMask
from .registry import BACKENDS, BackendUnavailable

__all__ = ["BlockMask", "adaln_modulate", "gated_residual_adaln", "qk_norm_rope", "rms_norm", "apply_rope", "attention",
           "adaln_modulate_fp8", "gated_residual_adaln_fp8", "gelu_fp8", "BACKENDS", "BackendUnavailable", "backends_for"]

_ALWAYS = lambda *tensors: None  # noqa: E731  (the reference serves every input)

for _op in ("adaln_modulate", "gated_residual_adaln", "qk_norm_rope", "rms_norm", "apply_rope", "attention",
            "adaln_modulate_fp8", "gated_residual_adaln_fp8", "gelu_fp8"):
    registry.register(_op, "ref", getattr(ref, _op), _ALWAYS)
registry.register("attention_ext", "ref", ref.attention, _ALWAYS)  # block-sparse / FP8 attention
registry.register("attention_ext", "flex", flex.attention, flex.why_not)  # torch's FlexAttention (masks only)
native.register(registry)  # "cpu" and "cuda": the C++ / CUDA ops in _C
triton_ops.register(registry)  # "triton": Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)


def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """LayerNorm (no affine) then x * (1 + scale) + shift. x: (B, S, D); scale/shift: (B, D) or (B, S, D)."""
    _, impl = registry.pick("adaln_modulate", (x, scale, shift), backend)
    return impl(x, scale, shift, eps)


def gated_residual_adaln(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                         eps: float = 1e-6, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * y, adaln_modulate(x + gate * y, scale, shift)) in one pass. x, y: (B, S, D);
    gate/scale/shift: (B, D) or (B, S, D)."""
    return _impl("gated_residual_adaln", (x, y, gate, scale, shift), backend)(x, y, gate, scale, shift, eps)


def adaln_modulate_fp8(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6, *,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """adaln_modulate for an FP8 linear's input, quantised in the same pass: (h8 (B, S, D) e4m3,
    scales (B, S, 1) fp32) with h ~= h8 * scales, one scale per token from h's fp32 value."""
    return _impl("adaln_modulate_fp8", (x, scale, shift), backend)(x, scale, shift, eps)


def gated_residual_adaln_fp8(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                             shift: torch.Tensor, eps: float = 1e-6, *,
                             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gated_residual_adaln with h quantised as in adaln_modulate_fp8: (x_new, h8, scales)."""
    return _impl("gated_residual_adaln_fp8", (x, y, gate, scale, shift), backend)(x, y, gate, scale, shift, eps)


def gelu_fp8(x: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """tanh GELU (fp32) quantised per token for an FP8 linear: x (..., K) -> (e4m3 (..., K),
    fp32 scales (..., 1))."""
    return _impl("gelu_fp8", (x,), backend)(x)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, num_heads: int, eps: float = 1e-6, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm across heads + RoPE on q and k. q, k: (B, S, H*Dh) -> two (B, S, H, Dh); cos, sin: (S, Dh/2)."""
    impl = _impl("qk_norm_rope", (q, k, q_weight, k_weight, cos, sin), backend)
    return impl(q, k, q_weight, k_weight, cos, sin, num_heads, eps)


def _impl(op: str, tensors, backend: str | None):
    return registry.pick(op, tensors, backend)[1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim. x: (..., N); weight: (N,)."""
    return _impl("rms_norm", (x, weight), backend)(x, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Interleaved-pair RoPE. x: (B, S, H, Dh); cos, sin: (S, Dh/2)."""
    return _impl("apply_rope", (x, cos, sin), backend)(x, cos, sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_mask: BlockMask | None = None,
              precision: str | None = None, backend: str | None = None) -> torch.Tensor:
    """Non-causal attention. q: (B, Sq, H, Dh); k, v: (B, Skv, H, Dh) -> (B, Sq, H, Dh).

    block_mask: a `BlockMask` of (query block, key block) tiles to compute; the others are
    skipped (block-sparse attention). precision="fp8": Q, K, V (and P) in e4m3 with fp32
    scales (`ops/fp8.py`); on the CPU (`ref`) the same numerics emulated in fp32. Either
    option is served by `ref` and `triton` (and FlexAttention, `backend="flex"`, for masks)."""
    if block_mask is None and precision is None:
        return _impl("attention", (q, k, v), backend)(q, k, v)
    if precision not in (None, "fp8"):
        raise ValueError(f"precision={precision!r} is not one of None, 'fp8'")
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        raise ValueError(f"block_mask must be a flgengine.ops.BlockMask, got {type(block_mask).__name__}")
    if block_mask is not None:
        reason = block_mask.check(q, k)  # before any backend is picked or launched
        if reason:
            raise ValueError(f"attention: {reason}")
    # the same choice as every op (registry.pick): the block mask and precision go to each
    # backend's why_not with the tensors
    _, impl = registry.pick("attention_ext", (q, k, v, block_mask, precision), backend)
    return impl(q, k, v, block_mask=block_mask, precision=precision)


def backends_for(op: str) -> list[str]:
    return sorted(registry.available(op))
