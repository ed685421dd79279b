"""adaln_modulate in Triton: LayerNorm without affine (fp32 statistics) then x * (1 + scale) + shift.

The kernel is `modulate.modulate_kernel` with RESIDUAL=False (shared with gated_residual_adaln):
program (i, b) normalises ITERS tiles of ROWS token rows of sample b, a per-sample scale / shift
is read once per program, and every input is read through its strides. The output is
contiguous, in x's dtype.
"""

from __future__ import annotations

import torch

from . import _common, modulate
from .modulate import MAX_D


def check(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> str | None:
    """Why these shapes / dtypes are not served (None: they are)."""
    if x.dim() != 3:
        return f"x must be (B, S, D), got shape {tuple(x.shape)}"
    reason = _common.dtype_reason("x", x)
    if reason:
        return reason
    if x.shape[-1] > MAX_D:
        return f"x has D={x.shape[-1]} channels; the Triton adaln_modulate takes D <= {MAX_D}"
    return _common.mod_reason("scale", scale, x) or _common.mod_reason("shift", shift, x)


def why_not(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> str | None:
    return _common.runtime_reason((x, scale, shift)) or check(x, scale, shift)


def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6,
                   tiling: dict | None = None) -> torch.Tensor:
    """Launches the kernel; ValueError if the inputs are outside what it serves.
    tiling: {"ROWS": r, "num_warps": w[, "ITERS": n]} instead of `_common.row_tiling`'s (benchmark sweeps)."""
    return _run(x, scale, shift, eps, tiling, fp8=False)[0]


def adaln_modulate_fp8(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6,
                       tiling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same h, quantised per token from its fp32 value in the same pass: (h8 (B, S, D) e4m3,
    scales (B, S, 1) fp32), `flgengine.ops.ref.adaln_modulate_fp8`'s contract."""
    return _run(x, scale, shift, eps, tiling, fp8=True)


def _run(x, scale, shift, eps, tiling, fp8: bool):
    reason = _common.device_reason((x, scale, shift)) or check(x, scale, shift)
    if reason:
        raise ValueError(f"triton adaln_modulate{'_fp8' if fp8 else ''}: {reason}")
    h, h_scale = modulate.h_outputs(x, fp8)
    if h.numel():
        modulate.launch(h, x, scale, shift, eps, tiling, h_scale=h_scale)
    return h, h_scale
