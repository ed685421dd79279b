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
from .attention_tiles import config, split_head_dim  # noqa: F401  (tile choice; re-exported)
from .rounding import round_bf16, round_e4m3

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


@triton.jit
def _store(ptrs, o, mask, RTNE_BF16: tl.constexpr):
    if RTNE_BF16:
        o = round_bf16(o)
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
def _online_softmax(qk, qk_scale, m_i, l_i, RTNE_BF16: tl.constexpr, FP8: tl.constexpr, RTNE_E4M3: tl.constexpr):
    """Raw scores qk [BLOCK_M, BLOCK_N] -> p = exp2(qk * scale - m), the rescale factor of the
    old rows, and the new running max / sum (base 2; scale = log2(e)/sqrt(D), times the Q and K
    block scales in FP8). The scale is applied inside the exponent's argument (one FMA per
    score, as in FlashAttention-2): max(qk) * scale = max(qk * scale) for scale > 0, and masked
    -inf scores stay -inf. FP8: p is returned as p * 448 (e4m3's largest value, so the row's
    max maps to it), rounded to e4m3 by the caller's product; l_i stays unscaled."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if RTNE_BF16:
        p = round_bf16(p)
    if FP8:
        p = p * 448.0
        if RTNE_E4M3:
            p = round_e4m3(p)
    return p, alpha, m_new, l_i


@triton.jit
def _pv(p, v, acc, alpha, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc * alpha + P V for one head-dim chunk, P rounded to v's dtype (as FlashAttention;
    in FP8 that is e4m3, round to nearest even)."""
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    return tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)


@triton.jit
def _kv_block(acc_a, acc_b, m_i, l_i, q_a, q_b, kt_a_ptrs, kt_b_ptrs, v_a_ptrs, v_b_ptrs, n_ok, a_ok, b_ok, scale,
              MASK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, RTNE_BF16: tl.constexpr, FP8: tl.constexpr):
    """One K/V block of BLOCK_N keys: scores, online softmax, P V. kt_*_ptrs: the K^T tiles
    [BLOCK_D*, BLOCK_N]; v_*_ptrs: the V tiles [BLOCK_N, BLOCK_D*] (channel tile a, and b when
    BLOCK_DB > 0). MASK_N: the block crosses Skv (n_ok: the keys inside), so the loads are
    sequence-masked and the scores past the end -inf; otherwise only a tile that crosses the
    head dim is masked, by channel. `scale`: the scores' scale (log2(e)/sqrt(D), times the Q and
    K block scales in FP8)."""
    if MASK_N:
        kt_a = _tile(kt_a_ptrs, a_ok[:, None] & n_ok[None, :], True, UPCAST)
    else:
        kt_a = _tile(kt_a_ptrs, a_ok[:, None], BLOCK_DA > HEAD_DIM, UPCAST)
    qk = tl.dot(q_a, kt_a, input_precision=DOT_PRECISION)
    if BLOCK_DB > 0:
        if MASK_N:
            kt_b = _tile(kt_b_ptrs, b_ok[:, None] & n_ok[None, :], True, UPCAST)
        else:
            kt_b = _tile(kt_b_ptrs, b_ok[:, None], BLOCK_DA + BLOCK_DB > HEAD_DIM, UPCAST)
        qk = tl.dot(q_b, kt_b, qk, input_precision=DOT_PRECISION)
    if MASK_N:
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
    p, alpha, m_i, l_i = _online_softmax(qk, scale, m_i, l_i, RTNE_BF16, FP8, UPCAST)
    if MASK_N:
        v_a = _tile(v_a_ptrs, n_ok[:, None] & a_ok[None, :], True, False)
    else:
        v_a = _tile(v_a_ptrs, a_ok[None, :], BLOCK_DA > HEAD_DIM, False)
    acc_a = _pv(p, v_a, acc_a, alpha, UPCAST, DOT_PRECISION)
    if BLOCK_DB > 0:
        if MASK_N:
            v_b = _tile(v_b_ptrs, n_ok[:, None] & b_ok[None, :], True, False)
        else:
            v_b = _tile(v_b_ptrs, b_ok[None, :], BLOCK_DA + BLOCK_DB > HEAD_DIM, False)
        acc_b = _pv(p, v_b, acc_b, alpha, UPCAST, DOT_PRECISION)
    return acc_a, acc_b, m_i, l_i


@triton.jit
def _kv_block_at(acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, start_n, Skv, offs_n, offs_a, offs_b, a_ok, b_ok,
                 sks, skd, svs, svd, qk_scale, k_scale_row,
                 MASK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr,
                 BLOCK_DB: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, RTNE_BF16: tl.constexpr,
                 FP8: tl.constexpr):
    """`_kv_block` for the keys from start_n, its tile pointers made from the scalar bases (few
    live registers: the block-sparse loop and FP8's 128-key tiles); in FP8 the K block's scale
    joins the scores' scale."""
    scale = qk_scale
    if FP8:
        scale = qk_scale * tl.load(k_scale_row + start_n // BLOCK_N)
    kn = start_n + offs_n
    return _kv_block(acc_a, acc_b, m_i, l_i, q_a, q_b, k_base + kn[None, :] * sks + offs_a[:, None] * skd,
                     k_base + kn[None, :] * sks + offs_b[:, None] * skd, v_base + kn[:, None] * svs + offs_a[None, :] * svd,
                     v_base + kn[:, None] * svs + offs_b[None, :] * svd, kn < Skv, a_ok, b_ok, scale,
                     MASK_N, HEAD_DIM, BLOCK_DA, BLOCK_DB, UPCAST, DOT_PRECISION, RTNE_BF16, FP8)


@triton.jit
def _attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr,
    H, Sq, Skv,
    sqb, sqs, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    qk_scale,
    kv_index_ptr, kv_count_ptr, kv_full_ptr, s_ih, s_iq, s_ch,
    q_scale_ptr, k_scale_ptr, v_scale_ptr,
    HEAD_DIM: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RTNE_BF16: tl.constexpr,
    SPARSE: tl.constexpr, MASK_BQ: tl.constexpr, MASK_BK: tl.constexpr, MASK_HEADS: tl.constexpr,
    FP8: tl.constexpr, BLOCK_DBX: tl.constexpr,
):
    # The head dim runs on one tile of BLOCK_DA channels, or (BLOCK_DB > 0) on two: channels
    # [0, BLOCK_DA) and [BLOCK_DA, BLOCK_DA + BLOCK_DB), each a power of two, so a pruned head
    # dim computes on 64 + 16 = 80 channels for D = 72 instead of 128 (`split_head_dim`).
    # S = Q_a K_a^T + Q_b K_b^T; O_a = P V_a and O_b = P V_b share the softmax.
    # The batch / token / head strides arrive divided by STRIDE_ALIGN (a power of two that
    # divides them all): multiplying back by the constant tells the compiler the row
    # alignment, which Triton's own specialisation only sees for multiples of 16 (head dims
    # 40, 72 would otherwise lose vectorised loads and spill).
    # SPARSE: the K/V blocks of this query block are the mask's list (kv_index[h, row, :
    # kv_count]), each MASK_BK keys walked in BLOCK_N steps; key blocks not listed cost nothing.
    # FP8: q, k, v are e4m3 with fp32 scales (per Q block, per K block, per V channel: see
    # flgengine/ops/fp8.py); scores and P V accumulate in fp32.
    sqb = sqb * STRIDE_ALIGN
    sqs = sqs * STRIDE_ALIGN
    sqh = sqh * STRIDE_ALIGN
    skb = skb * STRIDE_ALIGN
    sks = sks * STRIDE_ALIGN
    skh = skh * STRIDE_ALIGN
    svb = svb * STRIDE_ALIGN
    svh = svh * STRIDE_ALIGN
    if FP8:  # v is (B, H, D, Skv'): tokens contiguous, the channel stride is the aligned one
        svd = svd * STRIDE_ALIGN
    else:
        svs = svs * STRIDE_ALIGN
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, BLOCK_DA)
    offs_b = BLOCK_DA + tl.arange(0, BLOCK_DBX)
    m_ok = offs_m < Sq
    a_ok = offs_a < HEAD_DIM
    b_ok = offs_b < HEAD_DIM
    q_rows = q_ptr + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqs
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    o_rows = out_ptr + ((b * Sq + offs_m[:, None]) * H + h) * HEAD_DIM

    q_a = _tile(q_rows + offs_a[None, :] * sqd, m_ok[:, None] & a_ok[None, :], True, UPCAST)  # [BLOCK_M, BLOCK_DA]
    kt_a_ptrs = k_base + offs_n[None, :] * sks + offs_a[:, None] * skd  # K^T tile [BLOCK_DA, BLOCK_N]
    v_a_ptrs = v_base + offs_n[:, None] * svs + offs_a[None, :] * svd  # [BLOCK_N, BLOCK_DA]
    q_b = q_a
    kt_b_ptrs = kt_a_ptrs
    v_b_ptrs = v_a_ptrs
    acc_a = tl.zeros([BLOCK_M, BLOCK_DA], tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_DBX], tl.float32)
    if BLOCK_DB > 0:
        q_b = _tile(q_rows + offs_b[None, :] * sqd, m_ok[:, None] & b_ok[None, :], True, UPCAST)  # [BLOCK_M, BLOCK_DB]
        kt_b_ptrs = k_base + offs_n[None, :] * sks + offs_b[:, None] * skd  # [BLOCK_DB, BLOCK_N]
        v_b_ptrs = v_base + offs_n[:, None] * svs + offs_b[None, :] * svd  # [BLOCK_N, BLOCK_DB]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    scale = qk_scale
    k_scale_row = k_scale_ptr
    if FP8:
        qk_scale = qk_scale * tl.load(q_scale_ptr + bh * tl.cdiv(Sq, BLOCK_M) + pid_m)
        k_scale_row = k_scale_ptr + bh * tl.cdiv(Skv, BLOCK_N)

    if SPARSE:
        row = (pid_m * BLOCK_M) // MASK_BQ
        hm = h if MASK_HEADS else 0
        n_listed = tl.load(kv_count_ptr + hm * s_ch + row)
        n_whole = tl.load(kv_full_ptr + hm * s_ch + row)  # listed blocks inside Skv (all but a partial last)
        index_row = kv_index_ptr + hm * s_ih + row * s_iq
        for i in range(0, n_whole):  # per listed block, its MASK_BK // BLOCK_N steps unrolled
            kb = tl.load(index_row + i)  # (one flat loop over all steps measured 8% slower on an H200)
            for j in tl.static_range(MASK_BK // BLOCK_N):
                acc_a, acc_b, m_i, l_i = _kv_block_at(
                    acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, kb * MASK_BK + j * BLOCK_N, Skv, offs_n, offs_a,
                    offs_b, a_ok, b_ok, sks, skd, svs, svd, qk_scale, k_scale_row, False, HEAD_DIM, BLOCK_N, BLOCK_DA,
                    BLOCK_DB, UPCAST, DOT_PRECISION, RTNE_BF16, FP8)
        if n_listed > n_whole:  # the partial last key block: its first sub-block holds >= 1 key
            kb = tl.load(index_row + n_whole)
            for j in tl.static_range(MASK_BK // BLOCK_N):
                if kb * MASK_BK + j * BLOCK_N < Skv:
                    acc_a, acc_b, m_i, l_i = _kv_block_at(
                        acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, kb * MASK_BK + j * BLOCK_N, Skv, offs_n,
                        offs_a, offs_b, a_ok, b_ok, sks, skd, svs, svd, qk_scale, k_scale_row, True, HEAD_DIM, BLOCK_N,
                        BLOCK_DA, BLOCK_DB, UPCAST, DOT_PRECISION, RTNE_BF16, FP8)
        l_i = tl.where(l_i > 0, l_i, 1.0)  # a query row with no allowed key: zeros out
    else:
        n_full = Skv - Skv % BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):  # full blocks: no sequence mask
            if FP8:  # pointers from the scalar bases each block: FP8's 128-key tiles leave no registers
                acc_a, acc_b, m_i, l_i = _kv_block_at(  # for [D, BLOCK_N] pointer tiles
                    acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, start_n, Skv, offs_n, offs_a, offs_b, a_ok, b_ok,
                    sks, skd, svs, svd, qk_scale, k_scale_row, False, HEAD_DIM, BLOCK_N, BLOCK_DA, BLOCK_DB, UPCAST,
                    DOT_PRECISION, RTNE_BF16, FP8)
            else:
                acc_a, acc_b, m_i, l_i = _kv_block(
                    acc_a, acc_b, m_i, l_i, q_a, q_b, kt_a_ptrs, kt_b_ptrs, v_a_ptrs, v_b_ptrs, offs_n < BLOCK_N, a_ok,
                    b_ok, scale, False, HEAD_DIM, BLOCK_DA, BLOCK_DB, UPCAST, DOT_PRECISION, RTNE_BF16, FP8)
                kt_a_ptrs += BLOCK_N * sks
                v_a_ptrs += BLOCK_N * svs
                kt_b_ptrs += BLOCK_N * sks
                v_b_ptrs += BLOCK_N * svs
        if n_full < Skv:  # the tail block: 1..BLOCK_N-1 keys, masked
            if FP8:
                scale = qk_scale * tl.load(k_scale_row + n_full // BLOCK_N)
                kt_a_ptrs += n_full * sks  # (the FP8 loop above left the pointers at key 0)
                v_a_ptrs += n_full * svs
                kt_b_ptrs += n_full * sks
                v_b_ptrs += n_full * svs
            acc_a, acc_b, m_i, l_i = _kv_block(
                acc_a, acc_b, m_i, l_i, q_a, q_b, kt_a_ptrs, kt_b_ptrs, v_a_ptrs, v_b_ptrs, offs_n < Skv - n_full, a_ok,
                b_ok, scale, True, HEAD_DIM, BLOCK_DA, BLOCK_DB, UPCAST, DOT_PRECISION, RTNE_BF16, FP8)

    if FP8:  # P was scaled by 448; V's per-channel scales
        l_i = l_i * 448.0
        acc_a = acc_a * tl.load(v_scale_ptr + bh * HEAD_DIM + offs_a, mask=a_ok, other=0.0)[None, :]
        if BLOCK_DB > 0:
            acc_b = acc_b * tl.load(v_scale_ptr + bh * HEAD_DIM + offs_b, mask=b_ok, other=0.0)[None, :]
    _store(o_rows + offs_a[None, :], acc_a / l_i[:, None], m_ok[:, None] & a_ok[None, :], RTNE_BF16)
    if BLOCK_DB > 0:
        _store(o_rows + offs_b[None, :], acc_b / l_i[:, None], m_ok[:, None] & b_ok[None, :], RTNE_BF16)


PRECISIONS = (None, "fp8")


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask=None, precision: str | None = None) -> str | None:
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
    if precision not in PRECISIONS:
        return f"precision={precision!r} is not served (None: the inputs' dtype, or 'fp8')"
    if precision == "fp8" and q.device.type == "cuda" and not _common.interpreting():
        if torch.cuda.get_device_capability(q.device) < (8, 9):
            cap = torch.cuda.get_device_capability(q.device)
            return f"precision='fp8' needs a GPU of compute capability >= 8.9 (FP8 tensor cores); this one has {cap}"
    if block_mask is not None:
        return block_mask.check(q, k)
    return None


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask=None, precision: str | None = None) -> str | None:
    return _common.runtime_reason((q, k, v)) or check(q, k, v, block_mask, precision)


def _stride_align(strides) -> int:
    """The largest power of two (<= 16) dividing every stride in `strides`."""
    align = 16
    while any(s % align for s in strides):
        align //= 2
    return align


TUNABLE = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "SPLIT_D")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiling: dict | None = None, block_mask=None,
              precision: str | None = None) -> torch.Tensor:
    """Launches the kernel; ValueError if the inputs are outside what it serves.
    block_mask: a `flgengine.ops.block_mask.BlockMask` (block-sparse attention).
    precision="fp8": q, k, v quantised to e4m3 first (`quantize.py`, one pass each; the contract of
    `flgengine.ops.fp8.quantize_attention`).
    tiling: some of BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT_D over `config`'s (benchmark sweeps)."""
    reason = _common.device_reason((q, k, v)) or check(q, k, v, block_mask, precision)
    if reason:
        raise ValueError(f"triton attention: {reason}")
    B, Sq, H, D = q.shape
    Skv = k.shape[1]
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    interpret = _common.is_interpreted(q.device)
    fp8 = precision == "fp8"
    tiling = dict(tiling or {})
    unknown = set(tiling) - set(TUNABLE)
    if unknown:
        raise ValueError(f"tiling keys {sorted(unknown)} are not tunable ({', '.join(TUNABLE)})")
    split = tiling.pop("SPLIT_D", None)
    if split is None:  # the split tiles are served by the sparse and FP8 loops; the dense bf16 / fp16 loop
        # compiled with them computed wrong results (head dim 40) or faulted (72, 96) on an H200 with
        # torch 2.11 / Triton 3.6 (2026-12-04), so on a GPU it runs one power-of-two tile
        split = interpret or fp8 or block_mask is not None
    cfg = config(D, q.dtype, interpret, split=split, fp8=fp8)
    cfg.update(tiling)
    sparse = dict(SPARSE=False, MASK_BQ=16, MASK_BK=16, MASK_HEADS=False)
    index = count = full = q  # unused pointers when dense
    s_ih = s_iq = s_ch = 0
    if block_mask is not None and block_mask.is_dense:
        block_mask = None  # every tile allowed: the dense loop (no index reads)
    if block_mask is not None:  # the kernel's tiles divide the mask's blocks
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], block_mask.block_q)
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], block_mask.block_k)
        sparse = dict(SPARSE=True, MASK_BQ=block_mask.block_q, MASK_BK=block_mask.block_k,
                      MASK_HEADS=block_mask.heads > 1)
        index, count, full = block_mask.kv_index, block_mask.kv_count, block_mask.kv_full
        s_ih, s_iq, s_ch = index.stride(0), index.stride(1), count.stride(0)
    q_scale = k_scale = v_scale = q  # unused pointers unless FP8
    if fp8:
        from .quantize import quantize_attention

        q, q_scale, k, k_scale, v, v_scale = quantize_attention(q, k, v, cfg["BLOCK_M"], cfg["BLOCK_N"], pad_kv=16)
        v = v.permute(0, 3, 1, 2)  # a (B, Skv, H, D) view of the token-contiguous (B, H, D, Skv) storage
    grid = (triton.cdiv(Sq, cfg["BLOCK_M"]), B * H)
    # the strides the kernel takes divided by STRIDE_ALIGN: batch, token and head of q and k; of
    # v batch, token and head, or in FP8 batch, head and channel (its row stride there)
    aligned = ((q, (0, 1, 2)), (k, (0, 1, 2)), (v, (0, 2, 3) if fp8 else (0, 1, 2)))
    align = _stride_align([t.stride(i) for t, idx in aligned for i in idx])
    strides = [s // align if i in idx else s for t, idx in aligned for i, s in enumerate(t.stride())]
    _common.launch(_attention_kernel, grid, q.device,
                   out, q, k, v, H, Sq, Skv, *strides, _LOG2E / math.sqrt(D),
                   index, count, full, s_ih, s_iq, s_ch, q_scale, k_scale, v_scale,
                   HEAD_DIM=D, STRIDE_ALIGN=align,
                   UPCAST=interpret, RTNE_BF16=_common.fix_bf16_rounding(q.dtype, q.device) and not fp8,
                   DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32", FP8=fp8,
                   BLOCK_DBX=max(cfg["BLOCK_DB"], 16), **sparse, **cfg)
    return out
