"""adaln_modulate in Triton: LayerNorm without affine (fp32 statistics) then x * (1 + scale) + shift.

Program (i, b) normalises ITERS tiles of ROWS token rows of sample b, one tile at a time (a
[ROWS, BLOCK_D] tile, BLOCK_D = D rounded up to a power of two, masked); a per-sample scale /
shift is read once per program and reused by all its rows (one [BLOCK_D] row from L2 instead
of ROWS x ITERS). x, scale and shift are read through their strides, so
the model's `unbind` views of a (B, 6, D) / (B, S, 6, D) modulation and `(D,).expand(B, D)`
vectors go in without copies. The output is contiguous, in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

MAX_D = 16384  # the row is one tile


@triton.jit
def _adaln_modulate_kernel(
    out_ptr, x_ptr, scale_ptr, shift_ptr,
    S, D,
    sxb, sxs, sxd,
    scb, scs, scd,
    shb, shs, shd,
    eps,
    ROWS: tl.constexpr, ITERS: tl.constexpr, BLOCK_D: tl.constexpr, SCALE_PER_SAMPLE: tl.constexpr,
    SHIFT_PER_SAMPLE: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    # program (i, b): ITERS tiles of ROWS tokens of sample b, from token i*ROWS*ITERS on
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    c_ok = c < D
    # a per-sample modulation (token stride 0): one [1, BLOCK_D] row, read once per program
    if SCALE_PER_SAMPLE:
        scale_row = tl.load(scale_ptr + b * scb + c * scd, mask=c_ok, other=0.0).to(tl.float32)
    if SHIFT_PER_SAMPLE:
        shift_row = tl.load(shift_ptr + b * shb + c * shd, mask=c_ok, other=0.0).to(tl.float32)
    first = tl.program_id(0) * (ROWS * ITERS)
    for it in range(ITERS):
        s = (first + it * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]  # [ROWS, 1]
        mask = (s < S) & c_ok

        x = tl.load(x_ptr + b * sxb + s * sxs + c * sxd, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + eps)

        if SCALE_PER_SAMPLE:
            scale = scale_row
        else:
            scale = tl.load(scale_ptr + b * scb + s * scs + c * scd, mask=mask, other=0.0).to(tl.float32)
        if SHIFT_PER_SAMPLE:
            shift = shift_row
        else:
            shift = tl.load(shift_ptr + b * shb + s * shs + c * shd, mask=mask, other=0.0).to(tl.float32)
        out = (xc * rstd[:, None]) * (1.0 + scale) + shift
        if RTNE_BF16:  # interpreter only: its fp32->bf16 cast truncates
            u = out.to(tl.uint32, bitcast=True)
            out = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        tl.store(out_ptr + (b * S + s) * D + c, out.to(out_ptr.dtype.element_ty), mask=mask)


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
    reason = _common.device_reason((x, scale, shift)) or check(x, scale, shift)
    if reason:
        raise ValueError(f"triton adaln_modulate: {reason}")
    B, S, D = x.shape
    out = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
    if B * S == 0 or D == 0:
        return out
    block_d = _common.next_pow2(D)
    rows, warps = _common.row_tiling(block_d, S, _common.is_interpreted(x.device), tiling)
    iters = _common.row_iters(tiling)
    grid = (triton.cdiv(S, rows * iters), B)
    _common.launch(_adaln_modulate_kernel, grid, x.device,
                   out, x, scale, shift, S, D, *x.stride(), *_common.mod_strides(scale),
                   *_common.mod_strides(shift), float(eps), ROWS=rows, ITERS=iters, BLOCK_D=block_d,
                   SCALE_PER_SAMPLE=scale.dim() == 2, SHIFT_PER_SAMPLE=shift.dim() == 2,
                   RTNE_BF16=_common.fix_bf16_rounding(x.dtype, x.device), num_warps=warps)
    return out
