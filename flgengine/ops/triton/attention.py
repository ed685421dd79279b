"""Non-causal flash attention forward in Triton.

q: (B, Sq, H, D); k, v: (B, Skv, H, D) (Skv may differ from Sq: cross-attention), read
through their strides (no copies of transposed / sliced views). Output (B, Sq, H, D)
contiguous in q's dtype. Softmax scale 1/sqrt(D), fp32 accumulation, online softmax in base 2.

Program (pid_m, b*H + h) owns BLOCK_M query rows of one head and streams K/V in BLOCK_N
blocks: the full blocks without sequence masks, then one masked tail block, so any Sq / Skv
works without padding. Head dims that are not powers of two (40, 72, 96, 112, pruned
widths) run on two power-of-two channel tiles where that computes fewer channels (72 on
64 + 16 instead of 128: `split_head_dim`), otherwise on the next power of two, with channel
masks only on a tile that crosses D.

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
def _round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32: the interpreter's own
    fp32 -> bf16 cast truncates, so its bf16 results would differ from a GPU's."""
    u = x.to(tl.uint32, bitcast=True)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _store(ptrs, o, mask, RTNE_BF16: tl.constexpr):
    if RTNE_BF16:
        o = _round_bf16(o)
    tl.store(ptrs, o.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _tile(ptrs, mask, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """A Q, K^T or V tile; a masked load only where the tile crosses the sequence or head-dim end."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _online_softmax(qk, qk_scale, m_i, l_i, RTNE_BF16: tl.constexpr):
    """Raw scores qk [BLOCK_M, BLOCK_N] -> p = exp2(qk * scale - m), the rescale factor of the
    old rows, and the new running max / sum (base 2; scale = log2(e)/sqrt(D)). The scale is
    applied inside the exponent's argument (one FMA per score, as in FlashAttention-2):
    max(qk) * scale = max(qk * scale) for scale > 0, and masked -inf scores stay -inf."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if RTNE_BF16:
        p = _round_bf16(p)
    return p, alpha, m_new, l_i


@triton.jit
def _pv(p, v, acc, alpha, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc * alpha + P V for one head-dim chunk, P rounded to v's dtype (as FlashAttention)."""
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    return tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)


@triton.jit
def _attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr,
    H, Sq, Skv,
    sqb, sqs, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    qk_scale,
    HEAD_DIM: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RTNE_BF16: tl.constexpr,
):
    # The head dim runs on one tile of BLOCK_DA channels, or (BLOCK_DB > 0) on two: channels
    # [0, BLOCK_DA) and [BLOCK_DA, BLOCK_DA + BLOCK_DB), each a power of two, so a pruned head
    # dim computes on 64 + 16 = 80 channels for D = 72 instead of 128 (`split_head_dim`).
    # S = Q_a K_a^T + Q_b K_b^T; O_a = P V_a and O_b = P V_b share the softmax.
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
    offs_a = tl.arange(0, BLOCK_DA)
    m_ok = offs_m < Sq
    a_ok = offs_a < HEAD_DIM
    q_rows = q_ptr + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqs
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    o_rows = out_ptr + ((b * Sq + offs_m[:, None]) * H + h) * HEAD_DIM

    q_a = _tile(q_rows + offs_a[None, :] * sqd, m_ok[:, None] & a_ok[None, :], True, UPCAST)  # [BLOCK_M, BLOCK_DA]
    kt_a_ptrs = k_base + offs_n[None, :] * sks + offs_a[:, None] * skd  # K^T tile [BLOCK_DA, BLOCK_N]
    v_a_ptrs = v_base + offs_n[:, None] * svs + offs_a[None, :] * svd  # [BLOCK_N, BLOCK_DA]
    acc_a = tl.zeros([BLOCK_M, BLOCK_DA], tl.float32)
    if BLOCK_DB > 0:
        offs_b = BLOCK_DA + tl.arange(0, BLOCK_DB)
        b_ok = offs_b < HEAD_DIM
        q_b = _tile(q_rows + offs_b[None, :] * sqd, m_ok[:, None] & b_ok[None, :], True, UPCAST)  # [BLOCK_M, BLOCK_DB]
        kt_b_ptrs = k_base + offs_n[None, :] * sks + offs_b[:, None] * skd  # [BLOCK_DB, BLOCK_N]
        v_b_ptrs = v_base + offs_n[:, None] * svs + offs_b[None, :] * svd  # [BLOCK_N, BLOCK_DB]
        acc_b = tl.zeros([BLOCK_M, BLOCK_DB], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)

    n_full = Skv - Skv % BLOCK_N
    for _start_n in range(0, n_full, BLOCK_N):  # full blocks: no sequence mask
        qk = tl.dot(q_a, _tile(kt_a_ptrs, a_ok[:, None], BLOCK_DA > HEAD_DIM, UPCAST), input_precision=DOT_PRECISION)
        if BLOCK_DB > 0:
            qk = tl.dot(q_b, _tile(kt_b_ptrs, b_ok[:, None], BLOCK_DA + BLOCK_DB > HEAD_DIM, UPCAST), qk, input_precision=DOT_PRECISION)
        p, alpha, m_i, l_i = _online_softmax(qk, qk_scale, m_i, l_i, RTNE_BF16)
        acc_a = _pv(p, _tile(v_a_ptrs, a_ok[None, :], BLOCK_DA > HEAD_DIM, False), acc_a, alpha, UPCAST, DOT_PRECISION)
        kt_a_ptrs += BLOCK_N * sks
        v_a_ptrs += BLOCK_N * svs
        if BLOCK_DB > 0:
            acc_b = _pv(p, _tile(v_b_ptrs, b_ok[None, :], BLOCK_DA + BLOCK_DB > HEAD_DIM, False), acc_b, alpha, UPCAST, DOT_PRECISION)
            kt_b_ptrs += BLOCK_N * sks
            v_b_ptrs += BLOCK_N * svs

    if n_full < Skv:  # the tail block: 1..BLOCK_N-1 keys, masked
        n_ok = offs_n < Skv - n_full
        qk = tl.dot(q_a, _tile(kt_a_ptrs, a_ok[:, None] & n_ok[None, :], True, UPCAST), input_precision=DOT_PRECISION)
        if BLOCK_DB > 0:
            qk = tl.dot(q_b, _tile(kt_b_ptrs, b_ok[:, None] & n_ok[None, :], True, UPCAST), qk,
                        input_precision=DOT_PRECISION)
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(qk, qk_scale, m_i, l_i, RTNE_BF16)
        acc_a = _pv(p, _tile(v_a_ptrs, n_ok[:, None] & a_ok[None, :], True, False), acc_a, alpha, UPCAST, DOT_PRECISION)
        if BLOCK_DB > 0:
            acc_b = _pv(p, _tile(v_b_ptrs, n_ok[:, None] & b_ok[None, :], True, False), acc_b, alpha, UPCAST,
                        DOT_PRECISION)

    _store(o_rows + offs_a[None, :], acc_a / l_i[:, None], m_ok[:, None] & a_ok[None, :], RTNE_BF16)
    if BLOCK_DB > 0:
        _store(o_rows + offs_b[None, :], acc_b / l_i[:, None], m_ok[:, None] & b_ok[None, :], RTNE_BF16)


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(BLOCK_DA, BLOCK_DB): the head dim's one power-of-two tile (BLOCK_DB = 0), or two
    power-of-two tiles when they cover it with fewer channels: 72 -> 64 + 16 (80 channels
    of work instead of 128), 40 -> 32 + 16, 96 -> 64 + 32, 160 -> 128 + 32; 112 stays 128
    (64 + 64 saves nothing). Both tiles are >= 16 (the dot's minimum)."""
    whole = max(16, _common.next_pow2(head_dim))
    if head_dim == whole or head_dim <= 16:
        return whole, 0
    da = whole // 2
    db = max(16, _common.next_pow2(head_dim - da))
    return (da, db) if da + db < whole else (whole, 0)


def config(head_dim: int, dtype: torch.dtype, interpret: bool, split: bool = True) -> dict:
    """Tile sizes and launch options. GPU numbers aim at an H100 (228 KB shared memory per SM):
    BLOCK_M 128 x BLOCK_N 64 for fp16/bf16 up to D=128 (sm_90 build, offline: 185-246
    registers, no spills, 64-128 KB shared), 64 x 32 with 8 warps for D=256 (182 registers).
    fp32 (3xTF32 dots) gets small tiles and still spills some (~1 KB stack): it is the
    verification path, not the fast one. The interpreter gets small tiles so CPU tests cover
    several K/V blocks plus a tail. `split`: the head dim on two tiles where that computes
    fewer channels (`split_head_dim`); off: one next-power-of-two tile."""
    da, db = split_head_dim(head_dim) if split else (max(16, _common.next_pow2(head_dim)), 0)
    width = da + db
    if interpret:
        bm, bn, warps, stages = 32, 16, 4, 1
    elif dtype == torch.float32:
        bm, bn, warps, stages = (64, 32, 4, 2) if width <= 128 else (32, 16, 4, 2)
    elif width <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    elif width <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 8, 2
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DA=da, BLOCK_DB=db, num_warps=warps, num_stages=stages)


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
    tiling: some of BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT_D over `config`'s (benchmark sweeps)."""
    reason = _common.device_reason((q, k, v)) or check(q, k, v)
    if reason:
        raise ValueError(f"triton attention: {reason}")
    B, Sq, H, D = q.shape
    Skv = k.shape[1]
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    interpret = _common.is_interpreted(q.device)
    tiling = dict(tiling or {})
    unknown = set(tiling) - {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "SPLIT_D"}
    if unknown:
        raise ValueError(f"tiling keys {sorted(unknown)} are not tunable "
                         f"(BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT_D)")
    cfg = config(D, q.dtype, interpret, split=tiling.pop("SPLIT_D", True))
    cfg.update(tiling)
    grid = (triton.cdiv(Sq, cfg["BLOCK_M"]), B * H)
    outer = [t.stride(i) for t in (q, k, v) for i in range(3)]  # batch, token, head strides
    align = 16
    while any(s % align for s in outer):
        align //= 2
    strides = [s // align if i < 3 else s for t in (q, k, v) for i, s in enumerate(t.stride())]
    _common.launch(_attention_kernel, grid, q.device,
                   out, q, k, v, H, Sq, Skv, *strides, _LOG2E / math.sqrt(D), HEAD_DIM=D, STRIDE_ALIGN=align,
                   UPCAST=interpret, RTNE_BF16=_common.fix_bf16_rounding(q.dtype, q.device),
                   DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32", **cfg)
    return out
