"""qk_norm_rope in Triton: RMSNorm over all H*Dh channels (with weight) then interleaved-pair
RoPE per head, for q and k; outputs (B, S, H, Dh) contiguous in q's dtype.

A row of N = H*Dh channels is N/2 pairs (x[2j], x[2j+1]); pair j rotates by angle index
j % (Dh/2) (pairs never straddle heads since Dh is even), so one program reads ROWS whole rows
contiguously (vector loads), splits them into the even and the odd channels as two
[ROWS, BLOCK_P] tiles in registers, and needs no per-head loop: any
even head dim works, powers of two or not. The normalised value is rounded to the output
dtype before the rotation (what the unfused model does: F.rms_norm returns q's dtype); the
rotation is fp32. q and k are two launches of the same kernel (their strides may differ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

MAX_N = 32768  # the row (N/2 pairs) is one tile


@triton.jit
def _rms_norm_rope_kernel(
    out_ptr, x_ptr, w_ptr, cos_ptr, sin_ptr,
    n_rows, S, N,
    sxb, sxs, sxd, sw,
    scs, sci, sss, ssi,
    eps,
    HALF: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    pairs = tl.arange(0, BLOCK_P)
    cols = tl.arange(0, 2 * BLOCK_P)  # channels, read and written as whole contiguous rows
    row_ok = (rows < n_rows)[:, None]
    mask = row_ok & (pairs < N // 2)[None, :]  # [ROWS, BLOCK_P]
    mask2 = row_ok & (cols < N)[None, :]  # [ROWS, 2 * BLOCK_P]
    rows = rows.to(tl.int64)
    b = (rows // S)[:, None]
    s = (rows % S)[:, None]
    i = (pairs % HALF)[None, :]  # rotation index inside the head (HALF = Dh/2, a constant: cheap modulo)

    x = tl.load(x_ptr + b * sxb + s * sxs + cols[None, :] * sxd, mask=mask2, other=0.0).to(tl.float32)
    x1, x2 = tl.split(tl.reshape(x, [ROWS, BLOCK_P, 2]))  # even, odd channels: [ROWS, BLOCK_P] each
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / N + eps)
    w = tl.load(w_ptr + cols * sw, mask=cols < N, other=0.0).to(tl.float32)
    w1, w2 = tl.split(tl.reshape(w, [BLOCK_P, 2]))
    w1 = w1[None, :]
    w2 = w2[None, :]
    # the normalised value in the output dtype, as F.rms_norm hands it to the rotation
    n1 = x1 * rstd[:, None] * w1
    n2 = x2 * rstd[:, None] * w2
    if RTNE_BF16:  # interpreter only: its fp32->bf16 cast truncates
        u = n1.to(tl.uint32, bitcast=True)
        n1 = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        u = n2.to(tl.uint32, bitcast=True)
        n2 = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    n1 = n1.to(out_ptr.dtype.element_ty).to(tl.float32)
    n2 = n2.to(out_ptr.dtype.element_ty).to(tl.float32)

    c = tl.load(cos_ptr + s * scs + i * sci, mask=mask, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + s * sss + i * ssi, mask=mask, other=0.0).to(tl.float32)
    o1 = n1 * c - n2 * sn
    o2 = n1 * sn + n2 * c
    if RTNE_BF16:  # interpreter only: its fp32->bf16 cast truncates
        u = o1.to(tl.uint32, bitcast=True)
        o1 = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        u = o2.to(tl.uint32, bitcast=True)
        o2 = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    out = tl.reshape(tl.join(o1, o2), [ROWS, 2 * BLOCK_P])  # pairs interleaved back
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask2)


def check(q, k, q_weight, k_weight, cos, sin, num_heads: int | None = None) -> str | None:
    """Why these inputs are not served. `num_heads` is checked when given (the dispatcher's
    why_not sees tensors only; the head dim then comes from cos: Dh = 2 * cos.shape[1])."""
    if q.dim() != 3:
        return f"q must be (B, S, H*Dh), got shape {tuple(q.shape)}"
    if k.shape != q.shape:
        return f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}"
    for name, t in (("q", q), ("k", k)):
        reason = _common.dtype_reason(name, t)
        if reason:
            return reason
    if k.dtype != q.dtype:
        return f"k dtype {k.dtype} must be q's dtype {q.dtype}"
    B, S, N = q.shape
    if N > MAX_N:
        return f"q has H*Dh={N} channels; the Triton qk_norm_rope takes at most {MAX_N}"
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if tuple(w.shape) != (N,):
            return f"{name} must be (H*Dh,)=({N},), got shape {tuple(w.shape)}"
        reason = _common.dtype_reason(name, w)
        if reason:
            return reason
    if cos.dim() != 2 or cos.shape[0] != S or cos.shape[1] < 1:
        return f"cos must be (S, Dh/2) with S={S}, got shape {tuple(cos.shape)}"
    if sin.shape != cos.shape:
        return f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}"
    for name, t in (("cos", cos), ("sin", sin)):
        reason = _common.dtype_reason(name, t)
        if reason:
            return reason
    head_dim = 2 * cos.shape[1]
    if N % head_dim:
        return f"H*Dh={N} is not a multiple of the head dim 2*cos.shape[1]={head_dim}"
    if num_heads is not None and num_heads * head_dim != N:
        return (f"num_heads={num_heads} does not match: q has H*Dh={N} channels and cos gives Dh={head_dim} "
                f"(so num_heads would be {N // head_dim})")
    return None


def why_not(q, k, q_weight, k_weight, cos, sin) -> str | None:
    return _common.runtime_reason((q, k, q_weight, k_weight, cos, sin)) or check(q, k, q_weight, k_weight, cos, sin)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, num_heads: int, eps: float = 1e-6,
                 tiling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the kernel for q and for k; ValueError if the inputs are outside what it serves.
    tiling: {"ROWS": r, "num_warps": w} instead of `_common.row_tiling`'s (benchmark sweeps)."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"triton qk_norm_rope: num_heads must be a positive int, got {num_heads!r}")
    tensors = (q, k, q_weight, k_weight, cos, sin)
    reason = _common.device_reason(tensors) or check(*tensors, num_heads=num_heads)
    if reason:
        raise ValueError(f"triton qk_norm_rope: {reason}")
    B, S, N = q.shape
    head_dim = N // num_heads
    q_out = torch.empty((B, S, num_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, S, num_heads, head_dim), dtype=q.dtype, device=q.device)
    n_rows = B * S
    if n_rows == 0:
        return q_out, k_out
    block_p = _common.next_pow2(N // 2)
    if tiling and "ITERS" in tiling:
        raise ValueError("triton qk_norm_rope: tiling takes ROWS and num_warps (no ITERS)")
    rows, warps = _common.row_tiling(block_p, n_rows, _common.is_interpreted(q.device), tiling)
    grid = (triton.cdiv(n_rows, rows),)
    for out, x, w in ((q_out, q, q_weight), (k_out, k, k_weight)):
        _common.launch(_rms_norm_rope_kernel, grid, q.device,
                       out, x, w, cos, sin, n_rows, S, N, *x.stride(), w.stride(0),
                       *cos.stride(), *sin.stride(), float(eps), HALF=head_dim // 2, ROWS=rows, BLOCK_P=block_p,
                       RTNE_BF16=_common.fix_bf16_rounding(q.dtype, q.device), num_warps=warps)
    return q_out, k_out
