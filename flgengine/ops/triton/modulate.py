"""The one Triton kernel behind adaln_modulate and gated_residual_adaln.

    RESIDUAL=False:  h = LayerNorm(x) * (1 + scale) + shift                      (adaln_modulate)
    RESIDUAL=True:   x_new = x + gate * y  (fp32 math, rounded to x's dtype)     (gated_residual_adaln)
                     h = LayerNorm(x_new) * (1 + scale) + shift

LayerNorm has no affine and fp32 statistics; with RESIDUAL they are those of the *rounded* x_new
(the value the next block reads), as in the reference. Program (i, b) normalises ITERS tiles of
ROWS token rows of sample b, one tile at a time (a [ROWS, BLOCK_D] tile, BLOCK_D = D rounded up to
a power of two, masked); a per-sample gate / scale / shift (token stride 0) is read once per
program and reused by all its rows (one [BLOCK_D] row from L2 instead of ROWS x ITERS). Every input
is read through its strides, so the model's `unbind` views of a (B, 6, D) / (B, S, 6, D)
modulation and `(D,).expand(B, D)` vectors go in without copies. Outputs are contiguous, in
their pointers' dtype. RESIDUAL is a constexpr: each variant compiles to its own kernel with
the other's loads and stores removed (with RESIDUAL=False, xo / y / gate are never touched).

FP8_OUT (the FP8 linears' input, `*_fp8` ops): h is not rounded to x's dtype but quantised
per token from its fp32 value, the row's |h| max over 448 as its scale (the row is one tile, so
the max costs no second pass): h is stored e4m3 and one fp32 scale per token to hs_ptr.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from .rounding import round_bf16, to_e4m3

MAX_D = 16384  # the row is one tile


@triton.jit
def modulate_kernel(
    xo_ptr, h_ptr, hs_ptr, x_ptr, y_ptr, gate_ptr, scale_ptr, shift_ptr,
    S, D,
    sxb, sxs, sxd,
    syb, sys_, syd,
    sgb, sgs, sgd,
    scb, scs, scd,
    shb, shs, shd,
    eps,
    ROWS: tl.constexpr, ITERS: tl.constexpr, BLOCK_D: tl.constexpr, RESIDUAL: tl.constexpr,
    GATE_PER_SAMPLE: tl.constexpr, SCALE_PER_SAMPLE: tl.constexpr, SHIFT_PER_SAMPLE: tl.constexpr,
    RTNE_BF16: tl.constexpr, FP8_OUT: tl.constexpr, RTNE_E4M3: tl.constexpr,
):
    # program (i, b): ITERS tiles of ROWS tokens of sample b, from token i*ROWS*ITERS on
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    c_ok = c < D
    # a per-sample modulation: one [1, BLOCK_D] row, read once per program
    if RESIDUAL and GATE_PER_SAMPLE:
        gate_row = tl.load(gate_ptr + b * sgb + c * sgd, mask=c_ok, other=0.0).to(tl.float32)
    if SCALE_PER_SAMPLE:
        scale_row = tl.load(scale_ptr + b * scb + c * scd, mask=c_ok, other=0.0).to(tl.float32)
    if SHIFT_PER_SAMPLE:
        shift_row = tl.load(shift_ptr + b * shb + c * shd, mask=c_ok, other=0.0).to(tl.float32)
    first = tl.program_id(0) * (ROWS * ITERS)
    for it in range(ITERS):
        s = (first + it * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]  # [ROWS, 1]
        mask = (s < S) & c_ok
        out_offs = (b * S + s) * D + c  # [ROWS, BLOCK_D] into the contiguous outputs

        x = tl.load(x_ptr + b * sxb + s * sxs + c * sxd, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            y = tl.load(y_ptr + b * syb + s * sys_ + c * syd, mask=mask, other=0.0).to(tl.float32)
            if GATE_PER_SAMPLE:
                gate = gate_row
            else:
                gate = tl.load(gate_ptr + b * sgb + s * sgs + c * sgd, mask=mask, other=0.0).to(tl.float32)
            x = x + y * gate
            if RTNE_BF16:  # interpreter only: its fp32->bf16 cast truncates
                x = round_bf16(x)
            x_new = x.to(xo_ptr.dtype.element_ty)
            tl.store(xo_ptr + out_offs, x_new, mask=mask)
            x = x_new.to(tl.float32)  # statistics of the rounded value

        mean = tl.sum(x, axis=1) / D                       # [ROWS]
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
        h = (xc * rstd[:, None]) * (1.0 + scale) + shift  # [ROWS, BLOCK_D] fp32
        if FP8_OUT:  # per-token e4m3: scale = max |h| / 448 over the row's D channels
            hs = tl.maximum(tl.max(tl.abs(tl.where(mask, h, 0.0)), axis=1) / 448.0, 1e-12)  # [ROWS]
            tl.store(hs_ptr + b * S + s, hs[:, None], mask=s < S)
            tl.store(h_ptr + out_offs, to_e4m3(h / hs[:, None], RTNE_E4M3), mask=mask)
        else:
            if RTNE_BF16:
                h = round_bf16(h)
            tl.store(h_ptr + out_offs, h.to(h_ptr.dtype.element_ty), mask=mask)


def h_outputs(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The h the kernel writes for x (B, S, D): in x's dtype (and no scales), or e4m3 with its
    per-token fp32 scales (B, S, 1) (FP8_OUT)."""
    if not fp8:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device), None
    return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty((*x.shape[:2], 1), dtype=torch.float32, device=x.device))


def launch(h: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
           tiling: dict | None, residual: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
           h_scale: torch.Tensor | None = None) -> None:
    """Fills h (and, with residual = (x_new, y, gate), x_new) for checked inputs; B * S * D > 0.
    h_scale: (B, S, 1) fp32 for an e4m3 h (FP8_OUT), its per-token scales."""
    B, S, D = x.shape
    block_d = _common.next_pow2(D)
    rows, warps = _common.row_tiling(block_d, S, _common.is_interpreted(x.device), tiling)
    iters = _common.row_iters(tiling)
    xo, y, gate = residual if residual is not None else (h, x, scale)  # unused without RESIDUAL
    _common.launch(modulate_kernel, (triton.cdiv(S, rows * iters), B), x.device,
                   xo, h, h if h_scale is None else h_scale, x, y, gate, scale, shift, S, D, *x.stride(), *y.stride(), *_common.mod_strides(gate),
                   *_common.mod_strides(scale), *_common.mod_strides(shift), float(eps),
                   ROWS=rows, ITERS=iters, BLOCK_D=block_d, RESIDUAL=residual is not None,
                   GATE_PER_SAMPLE=gate.dim() == 2, SCALE_PER_SAMPLE=scale.dim() == 2, SHIFT_PER_SAMPLE=shift.dim() == 2,
                   RTNE_BF16=_common.fix_bf16_rounding(x.dtype, x.device), FP8_OUT=h_scale is not None,
                   RTNE_E4M3=_common.is_interpreted(x.device), num_warps=warps)
