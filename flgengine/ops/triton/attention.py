"""Non-causal flash attention forward in Triton.

q: (B, Sq, H, D); k, v: (B, Skv, H, D) (Skv may differ from Sq: cross-attention), read
through their strides (no copies of transposed / sliced views). Output (B, Sq, H, D)
contiguous in q's dtype. Softmax scale 1/sqrt(D), fp32 accumulation, online softmax in base 2.

Program (pid_m, b*H + h) owns BLOCK_M query rows of one head and streams K/V in BLOCK_N
blocks: the full blocks without sequence masks, then one masked tail block, so any Sq / Skv
works without padding. Head dims that are not powers of two (40, 72, 96, 112, pruned
widths) run on a BLOCK_D = next power of two tile with channel masks (EVEN_D skips them).

fp16 / bf16 go to tl.dot as they are (tensor cores, fp32 accumulate; P is rounded to v's
dtype for the second product, as in FlashAttention). fp32 uses input_precision="tf32x3"
(three TF32 products: about fp32 accuracy on tensor cores; plain "ieee" runs on FMA units and
spills badly at these tiles). Under the interpreter (CPU tests) the operands are upcast to
fp32 after that rounding, since the interpreter's bf16 dot is wrong, and the dot is exact fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr,
    H, Sq, Skv,
    sqb, sqs, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    qk_scale,
    HEAD_DIM: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    # The batch / token / head strides arrive divided by STRIDE_ALIGN (a power of two that
    # divides them all): multiplying back by the constant tells the compiler the row
    # alignment, which Triton's own specialisation only sees for multiples of 16 (head dims
    # 40, 72 would otherwise lose vectorised loads and spill).
    sqb = sqb * STRIDE_ALIGN
    sqs = sqs * STRIDE_ALIGN
    sqh = sqh * STRIDE_ALIGN
    skb = skb * STRIDE_ALIGN
    sks = sks * STRIDE_ALIGN
    skh = skh * STRIDE_ALIGN
    svb = svb * STRIDE_ALIGN
    svs = svs * STRIDE_ALIGN
    svh = svh * STRIDE_ALIGN
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM

    q_ptrs = q_ptr + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kt_ptrs = k_ptr + b * skb + h * skh + offs_n[None, :] * sks + offs_d[:, None] * skd  # K^T tile [BLOCK_D, BLOCK_N]
    v_ptrs = v_ptr + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :] * svd  # [BLOCK_N, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    n_full = Skv - Skv % BLOCK_N
    for _start_n in range(0, n_full, BLOCK_N):  # full blocks: no sequence mask
        if EVEN_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if RTNE_BF16:  # interpreter only: its fp32->bf16 cast truncates
            u = p.to(tl.uint32, bitcast=True)
            p = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        p = p.to(v.dtype)
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        kt_ptrs += BLOCK_N * sks
        v_ptrs += BLOCK_N * svs

    if n_full < Skv:  # the tail block: 1..BLOCK_N-1 keys, masked
        n_ok = offs_n < Skv - n_full
        kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if RTNE_BF16:  # interpreter only: its fp32->bf16 cast truncates
            u = p.to(tl.uint32, bitcast=True)
            p = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        p = p.to(v.dtype)
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    if RTNE_BF16:  # interpreter only: its fp32->bf16 cast truncates
        u = acc.to(tl.uint32, bitcast=True)
        acc = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    o_ptrs = out_ptr + ((b * Sq + offs_m[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def config(head_dim: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Tile sizes and launch options. GPU numbers aim at an H100 (228 KB shared memory per SM):
    BLOCK_M 128 x BLOCK_N 64 for fp16/bf16 up to D=128 (sm_90 build, offline: 185-246
    registers, no spills, 64-128 KB shared), 64 x 32 with 8 warps for D=256 (182 registers).
    fp32 (3xTF32 dots) gets small tiles and still spills some (~1 KB stack): it is the
    verification path, not the fast one. The interpreter gets small tiles so CPU tests cover
    several K/V blocks plus a tail."""
    block_d = max(16, _common.next_pow2(head_dim))
    if interpret:
        bm, bn, warps, stages = 32, 16, 4, 1
    elif dtype == torch.float32:
        bm, bn, warps, stages = (64, 32, 4, 2) if block_d <= 128 else (32, 16, 4, 2)
    elif block_d <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    elif block_d <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 8, 2
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            return f"{name} must be (B, S, H, D), got shape {tuple(t.shape)}"
    reason = _common.dtype_reason("q", q)
    if reason:
        return reason
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            return f"{name} dtype {t.dtype} must be q's dtype {q.dtype}"
    B, Sq, H, D = q.shape
    if k.shape != v.shape:
        return f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        return f"k/v shape {tuple(k.shape)} must be (B, Skv, H, D) with q's B={B}, H={H}, D={D}"
    if not 1 <= D <= MAX_HEAD_DIM:
        return f"head dim D={D} is not supported (1..{MAX_HEAD_DIM})"
    if k.shape[1] == 0 and Sq > 0:
        return "k/v have no tokens (Skv=0): softmax over an empty set"
    if B * H > 65535:
        return f"B*H={B * H} exceeds the grid's 65535 limit"
    return None


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    return _common.runtime_reason((q, k, v)) or check(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiling: dict | None = None) -> torch.Tensor:
    """Launches the kernel; ValueError if the inputs are outside what it serves.
    tiling: some of BLOCK_M, BLOCK_N, num_warps, num_stages over `config`'s (benchmark sweeps)."""
    reason = _common.device_reason((q, k, v)) or check(q, k, v)
    if reason:
        raise ValueError(f"triton attention: {reason}")
    B, Sq, H, D = q.shape
    Skv = k.shape[1]
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    interpret = _common.is_interpreted(q.device)
    cfg = config(D, q.dtype, interpret)
    if tiling:
        unknown = set(tiling) - {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
        if unknown:
            raise ValueError(f"tiling keys {sorted(unknown)} are not tunable (BLOCK_M, BLOCK_N, num_warps, num_stages)")
        cfg.update(tiling)
    grid = (triton.cdiv(Sq, cfg["BLOCK_M"]), B * H)
    outer = [t.stride(i) for t in (q, k, v) for i in range(3)]  # batch, token, head strides
    align = 16
    while any(s % align for s in outer):
        align //= 2
    strides = [s // align if i < 3 else s for t in (q, k, v) for i, s in enumerate(t.stride())]
    _common.launch(_attention_kernel, grid, q.device,
                   out, q, k, v, H, Sq, Skv, *strides, _LOG2E / math.sqrt(D), HEAD_DIM=D, STRIDE_ALIGN=align,
                   EVEN_D=cfg["BLOCK_D"] == D, UPCAST=interpret, RTNE_BF16=_common.fix_bf16_rounding(q.dtype, q.device),
                   DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32", **cfg)
    return out
