"""gated_residual_adaln in Triton: x_new = x + gate * y (fp32 math, rounded to x's dtype) and
h = adaln_modulate(x_new, scale, shift) in one pass over the row.

The LayerNorm statistics are those of the *rounded* x_new (the value the next block reads),
as in the reference. Program (i, b) handles ITERS tiles of ROWS token rows of sample b (a
per-sample gate / scale / shift is read once per program, as in adaln_modulate); every input is read through its
strides (gate / scale / shift may each be per sample (B, D), per token (B, S, D), or an
expanded vector with stride 0). Both outputs are contiguous, in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

MAX_D = 16384


@triton.jit
def _gated_residual_adaln_kernel(
    xo_ptr, h_ptr, x_ptr, y_ptr, gate_ptr, scale_ptr, shift_ptr,
    S, D,
    sxb, sxs, sxd,
    syb, sys_, syd,
    sgb, sgs, sgd,
    scb, scs, scd,
    shb, shs, shd,
    eps,
    ROWS: tl.constexpr, ITERS: tl.constexpr, BLOCK_D: tl.constexpr, GATE_PER_SAMPLE: tl.constexpr,
    SCALE_PER_SAMPLE: tl.constexpr, SHIFT_PER_SAMPLE: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    # program (i, b): ITERS tiles of ROWS tokens of sample b, from token i*ROWS*ITERS on
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    c_ok = c < D
    # a per-sample modulation (token stride 0): one [1, BLOCK_D] row, read once per program
    if GATE_PER_SAMPLE:
        gate_row = tl.load(gate_ptr + b * sgb + c * sgd, mask=c_ok, other=0.0).to(tl.float32)
    if SCALE_PER_SAMPLE:
        scale_row = tl.load(scale_ptr + b * scb + c * scd, mask=c_ok, other=0.0).to(tl.float32)
    if SHIFT_PER_SAMPLE:
        shift_row = tl.load(shift_ptr + b * shb + c * shd, mask=c_ok, other=0.0).to(tl.float32)
    first = tl.program_id(0) * (ROWS * ITERS)
    for it in range(ITERS):
        s = (first + it * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]  # [ROWS, 1]
        mask = (s < S) & c_ok

        x = tl.load(x_ptr + b * sxb + s * sxs + c * sxd, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b * syb + s * sys_ + c * syd, mask=mask, other=0.0).to(tl.float32)
        if GATE_PER_SAMPLE:
            gate = gate_row
        else:
            gate = tl.load(gate_ptr + b * sgb + s * sgs + c * sgd, mask=mask, other=0.0).to(tl.float32)
        x_new = x + y * gate
        if RTNE_BF16:  # interpreter only: its fp32->bf16 cast truncates
            u = x_new.to(tl.uint32, bitcast=True)
            x_new = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        x_new = x_new.to(xo_ptr.dtype.element_ty)
        out_offs = (b * S + s) * D + c
        tl.store(xo_ptr + out_offs, x_new, mask=mask)

        xn = x_new.to(tl.float32)  # statistics of the rounded value
        mean = tl.sum(xn, axis=1) / D
        xc = tl.where(mask, xn - mean[:, None], 0.0)
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
        h = (xc * rstd[:, None]) * (1.0 + scale) + shift
        if RTNE_BF16:  # interpreter only: its fp32->bf16 cast truncates
            u = h.to(tl.uint32, bitcast=True)
            h = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        tl.store(h_ptr + out_offs, h.to(h_ptr.dtype.element_ty), mask=mask)


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
    reason = _common.device_reason((x, y, gate, scale, shift)) or check(x, y, gate, scale, shift)
    if reason:
        raise ValueError(f"triton gated_residual_adaln: {reason}")
    B, S, D = x.shape
    x_new = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
    h = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
    if B * S == 0 or D == 0:
        return x_new, h
    block_d = _common.next_pow2(D)
    rows, warps = _common.row_tiling(block_d, S, _common.is_interpreted(x.device), tiling)
    iters = _common.row_iters(tiling)
    grid = (triton.cdiv(S, rows * iters), B)
    _common.launch(_gated_residual_adaln_kernel, grid, x.device,
                   x_new, h, x, y, gate, scale, shift, S, D, *x.stride(), *y.stride(),
                   *_common.mod_strides(gate), *_common.mod_strides(scale), *_common.mod_strides(shift), float(eps),
                   ROWS=rows, ITERS=iters, BLOCK_D=block_d, GATE_PER_SAMPLE=gate.dim() == 2, SCALE_PER_SAMPLE=scale.dim() == 2,
                   SHIFT_PER_SAMPLE=shift.dim() == 2,
                   RTNE_BF16=_common.fix_bf16_rounding(x.dtype, x.device), num_warps=warps)
    return x_new, h
