"""FP8 quantisation of attention's Q, K and V in one pass each (the contract of
`flgengine.ops.fp8.quantize_attention`, which is its reference).

Program (token block, b*H + h) loads a [BLOCK_S, D] tile of one head, and:
- Q / K (PER_CHANNEL False): subtracts the per-channel mean (K only: SMOOTH), takes the
  tile's |x| max, writes the e4m3 tile (B, S, H, D) and one fp32 scale per (b, h, block);
- V (PER_CHANNEL True): divides by the given per-channel scales and writes the tile
  transposed into V's token-contiguous storage (B, H, D, S').
Rounding to e4m3 is to nearest even (the GPU's cvt); under the interpreter, whose cast does
not round to nearest, the value is rounded by hand first (exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from .rounding import to_e4m3

E4M3_MAX = 448.0


@triton.jit
def _quant_kernel(out_ptr, scale_ptr, x_ptr, mean_ptr, vscale_ptr,
                  H, S, sxb, sxs, sxh, sxd, sos, sod,
                  D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                  SMOOTH: tl.constexpr, PER_CHANNEL: tl.constexpr, RTNE: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_s[:, None] < S) & (offs_d[None, :] < D)
    x = tl.load(x_ptr + b * sxb + h * sxh + offs_s.to(tl.int64)[:, None] * sxs + offs_d[None, :] * sxd, mask=ok,
                other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
    if PER_CHANNEL:  # V: per-channel scales given; stored (B, H, D, S'): out[b, h, d, s]
        s = tl.load(vscale_ptr + bh * D + offs_d, mask=offs_d < D, other=1.0)
        q8 = to_e4m3(x / s[None, :], RTNE)
        tl.store(out_ptr + bh * D * sod + offs_d[None, :] * sod + offs_s[:, None] * sos, q8, mask=ok)
    else:  # Q / K: one scale per block; stored (B, S, H, D) contiguous
        if SMOOTH:
            mu = tl.load(mean_ptr + bh * D + offs_d, mask=offs_d < D, other=0.0)
            x = tl.where(ok, x - mu[None, :], 0.0)
        s = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0) / 448.0, 1e-12)
        tl.store(scale_ptr + bh * tl.cdiv(S, BLOCK_S) + pid, s)
        q8 = to_e4m3(x / s, RTNE)
        tl.store(out_ptr + ((b * S + offs_s[:, None]) * H + h) * D + offs_d[None, :], q8, mask=ok)


def _launch_rows(x, block: int, smooth: bool, interpret: bool):
    B, S, H, D = x.shape
    out = torch.empty((B, S, H, D), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((B, H, triton.cdiv(S, block)), dtype=torch.float32, device=x.device)
    mean = x.mean(dim=1, dtype=torch.float32).contiguous() if smooth else scale  # (B, H, D)
    _common.launch(_quant_kernel, (triton.cdiv(S, block), B * H), x.device, out, scale, x, mean, scale, H, S,
                   *x.stride(), 0, 0, D=D, BLOCK_S=block, BLOCK_D=max(16, _common.next_pow2(D)), SMOOTH=smooth,
                   PER_CHANNEL=False, RTNE=interpret, num_warps=4 if block * D <= 8192 else 8)
    return out, scale


def quantize_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int, pad_kv: int = 1):
    """Same outputs as `flgengine.ops.fp8.quantize_attention`, in three launches (plus torch's
    mean of K and |V| max over tokens)."""
    interpret = _common.is_interpreted(q.device)
    q8, q_scale = _launch_rows(q, block_q, False, interpret)
    k8, k_scale = _launch_rows(k, block_k, True, interpret)
    B, S, H, D = v.shape
    v_scale = (torch.maximum(v.amax(dim=1), -v.amin(dim=1)).float() / E4M3_MAX).clamp_min(1e-12).contiguous()  # (B, H, D)
    s_pad = S + (-S % pad_kv)
    v8 = torch.empty((B, H, D, s_pad), dtype=torch.float8_e4m3fn, device=v.device)
    block = 64
    _common.launch(_quant_kernel, (triton.cdiv(S, block), B * H), v.device, v8, v_scale, v, v_scale, v_scale, H, S,
                   *v.stride(), 1, s_pad, D=D, BLOCK_S=block, BLOCK_D=max(16, _common.next_pow2(D)), SMOOTH=False,
                   PER_CHANNEL=True, RTNE=interpret, num_warps=4)
    return q8, q_scale, k8, k_scale, v8[..., :S], v_scale


@triton.jit
def _token_quant_kernel(out_ptr, scale_ptr, x_ptr, M, K, sxm, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                        GELU: tl.constexpr, RTNE: tl.constexpr):
    # ROWS tokens of x (M, K) per program: one pass, |x| max per row, e4m3 out (M, K) + scales (M,)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    ok = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sxm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if GELU:  # tanh GELU in fp32: 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))  # (capped: no inf; gelu ~ 0 there)
    s = tl.maximum(tl.max(tl.abs(x), 1) / 448.0, 1e-12)  # [ROWS]
    tl.store(scale_ptr + rows, s, mask=rows < M)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], to_e4m3(x / s[:, None], RTNE), mask=ok)


def quantize_tokens(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), unit stride along K -> (e4m3 (M, K), fp32 scales (M, 1)): dynamic per-token
    scales, the contract of `flgengine.ops.fp8.quantize_tokens`; gelu=True quantises
    gelu_tanh(x) computed in fp32 (`flgengine.ops.ref.gelu_fp8`), the FFN's hidden layer
    activated and quantised in the one pass."""
    M, K = x.shape
    out = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if not out.numel():
        return out, scale.fill_(1e-12)
    block = max(16, _common.next_pow2(K))
    interpret = _common.is_interpreted(x.device)
    rows = max(1, min(16, 4096 // block)) if not interpret else max(1, min(64, 32768 // block))
    _common.launch(_token_quant_kernel, (triton.cdiv(M, rows),), x.device, out, scale, x, M, K, x.stride(0),
                   ROWS=rows, BLOCK_K=block, GELU=gelu, RTNE=interpret, num_warps=4 if rows * block <= 4096 else 8)
    return out, scale


MAX_K = 16384  # a row is one tile


def why_not(x: torch.Tensor) -> str | None:
    """Why gelu_fp8 cannot take x (None: it can)."""
    reason = _common.runtime_reason((x,)) or _common.dtype_reason("x", x)
    if reason:
        return reason
    if x.dim() < 1 or x.shape[-1] > MAX_K:
        return f"x must be (..., K) with K <= {MAX_K}, got shape {tuple(x.shape)}"
    return None


def gelu_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (e4m3 (..., K), fp32 scales (..., 1)): tanh GELU and per-token quantisation
    in one pass, `flgengine.ops.ref.gelu_fp8`'s contract."""
    reason = why_not(x)
    if reason:
        raise ValueError(f"triton gelu_fp8: {reason}")
    flat = x.reshape(-1, x.shape[-1])
    x8, scale = quantize_tokens(flat if flat.stride(-1) == 1 else flat.contiguous(), gelu=True)
    return x8.view(x.shape), scale.view(*x.shape[:-1], 1)
