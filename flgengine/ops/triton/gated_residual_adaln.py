"""gated_residual_adaln in Triton: x_new = x + gate * y (fp32 math, rounded to x's dtype) and
h = adaln_modulate(x_new, scale, shift) in one pass over the row.

The kernel is `modulate.modulate_kernel` with RESIDUAL=True (shared with adaln_modulate): the
LayerNorm statistics are those of the *rounded* x_new (the value the next block reads), as in
the reference; gate / scale / shift may each be per sample (B, D), per token (B, S, D), or an
expanded vector with stride 0. Both outputs are contiguous, in x's dtype.
"""

from __future__ import annotations

import torch

from . import _common, modulate
from .modulate import MAX_D


def check(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> str | None:
    if x.dim() != 3:
        return f"x must be (B, S, D), got shape {tuple(x.shape)}"
    reason = _common.dtype_reason("x", x)
    if reason:
        return reason
    if y.shape != x.shape:
        return f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}"
    if y.dtype != x.dtype:
        return f"y dtype {y.dtype} must be x's dtype {x.dtype}"
    if x.shape[-1] > MAX_D:
        return f"x has D={x.shape[-1]} channels; the Triton gated_residual_adaln takes D <= {MAX_D}"
    for name, m in (("gate", gate), ("scale", scale), ("shift", shift)):
        reason = _common.mod_reason(name, m, x)
        if reason:
            return reason
    return None


def why_not(x, y, gate, scale, shift) -> str | None:
    return _common.runtime_reason((x, y, gate, scale, shift)) or check(x, y, gate, scale, shift)


def gated_residual_adaln(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                         shift: torch.Tensor, eps: float = 1e-6,
                         tiling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the kernel; ValueError if the inputs are outside what it serves.
    tiling: {"ROWS": r, "num_warps": w[, "ITERS": n]} instead of `_common.row_tiling`'s (benchmark sweeps)."""
    return _run(x, y, gate, scale, shift, eps, tiling, fp8=False)[:2]


def gated_residual_adaln_fp8(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                             shift: torch.Tensor, eps: float = 1e-6,
                             tiling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_new as above and h quantised per token from its fp32 value in the same pass:
    (x_new, h8 (B, S, D) e4m3, scales (B, S, 1) fp32), `flgengine.ops.ref.gated_residual_adaln_fp8`'s contract."""
    return _run(x, y, gate, scale, shift, eps, tiling, fp8=True)


def _run(x, y, gate, scale, shift, eps, tiling, fp8: bool):
    reason = _common.device_reason((x, y, gate, scale, shift)) or check(x, y, gate, scale, shift)
    if reason:
        raise ValueError(f"triton gated_residual_adaln{'_fp8' if fp8 else ''}: {reason}")
    x_new = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h, h_scale = modulate.h_outputs(x, fp8)
    if h.numel():
        modulate.launch(h, x, scale, shift, eps, tiling, residual=(x_new, y, gate), h_scale=h_scale)
    return x_new, h, h_scale
