"""FP8 (e4m3) quantisation shared by the kernels and their references.

e4m3 holds values up to 448 with 3 mantissa bits (relative step 2^-3 near each power of two).
Every quantised tensor carries fp32 scales: x ~= fp8(x / s) * s, s = amax / 448 over the
scale's group, so the group's largest value maps to 448. Rounding is to nearest even with
saturation (torch's and the GPU's `cvt.rn.satfinite`).

Attention (`quantize_attention`), in the manner of SageAttention:
- Q: one scale per (batch, head, block of `block_q` query tokens);
- K: smoothed first (the per-channel mean over tokens subtracted: each query row's scores
  shift by one constant, which softmax ignores, and K's outliers shrink), then one scale per
  (batch, head, block of `block_k` key tokens);
- V: one scale per (batch, head, channel), stored token-contiguous (B, H, D, Skv), the layout
  the FP8 tensor-core product P V reads its second operand in;
- P (the softmax numerator, in [0, 1]) is quantised inside the kernel as fp8(P * 448), and
  the 448 divided out with the row sum at the end.
"""

from __future__ import annotations

import math

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_TINY = 1e-12  # scale floor: an all-zero group quantises to zeros, not NaN


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / E4M3_MAX).clamp_min(_TINY).contiguous()


def _block_amax(x: torch.Tensor, block: int) -> torch.Tensor:
    """|x| max per (b, block of tokens, h) of x (B, S, H, D) -> (B, H, ceil(S / block))."""
    B, S, H, D = x.shape
    n = math.ceil(S / block)
    xp = torch.nn.functional.pad(x.float().abs(), (0, 0, 0, 0, 0, n * block - S))
    return xp.view(B, n, block, H, D).amax(dim=(2, 4)).transpose(1, 2)  # (B, H, n)


def _expand_blocks(s: torch.Tensor, block: int, S: int) -> torch.Tensor:
    """(B, H, n) per-block scales -> (B, S, H, 1) per token."""
    return s.repeat_interleave(block, dim=2)[:, :, :S].transpose(1, 2).unsqueeze(-1)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantisation of a GEMM's activation: x (M, K) -> (e4m3 (M, K), fp32
    scales (M, 1)), one scale per row (token)."""
    scale = _scale(x.float().abs().amax(dim=1, keepdim=True))
    return (x.float() / scale).to(E4M3), scale


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel quantisation of a Linear's weight: w (N, K) -> (e4m3 (N, K), fp32 (N, 1))."""
    scale = _scale(w.float().abs().amax(dim=1, keepdim=True))
    return (w.float() / scale).to(E4M3), scale


def quantize_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int,
                       pad_kv: int = 1):
    """q (B, Sq, H, D), k, v (B, Skv, H, D), any float dtype ->
    (q8 (B, Sq, H, D), q_scale (B, H, nQ), k8 (B, Skv, H, D), k_scale (B, H, nK),
     v8 (B, H, D, Skv) token-contiguous, v_scale (B, H, D)); scales fp32, tensors e4m3.
    pad_kv: v8's rows are stored padded to a multiple of this many tokens (aligned rows)."""
    Sq, Skv = q.shape[1], k.shape[1]
    q_scale = _scale(_block_amax(q, block_q))
    q8 = (q.float() / _expand_blocks(q_scale, block_q, Sq)).to(E4M3)
    ks = k.float() - k.float().mean(dim=1, keepdim=True)  # smoothing: softmax is blind to it
    k_scale = _scale(_block_amax(ks, block_k))
    k8 = (ks / _expand_blocks(k_scale, block_k, Skv)).to(E4M3)
    v_scale = _scale(v.float().abs().amax(dim=1))  # (B, H, D)
    vt = (v.float() / v_scale.unsqueeze(1)).permute(0, 2, 3, 1)  # (B, H, D, Skv)
    v8 = torch.nn.functional.pad(vt, (0, -Skv % pad_kv)).to(E4M3)[..., :Skv]
    return q8, q_scale, k8, k_scale, v8, v_scale


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int = 128, block_k: int = 64,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 attention emulated in fp32 (the CPU path and the kernel's reference): the same
    quantisation of Q, K, V and P as the kernel, the products and softmax in fp32. The kernel
    quantises P against its running row max, this against the final one, so the two agree to
    within P's rounding, not bit for bit. token_mask: bool (Hm, Sq, Skv), True = attend."""
    B, Sq, H, D = q.shape
    q8, qs, k8, ks, v8, vs = quantize_attention(q, k, v, block_q, block_k)
    qf = q8.float() * _expand_blocks(qs, block_q, Sq)  # (B, Sq, H, D)
    kf = k8.float() * _expand_blocks(ks, block_k, k.shape[1])
    vf = v8.float().permute(0, 3, 1, 2) * vs.unsqueeze(1)  # (B, Skv, H, D)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(D)
    if token_mask is not None:
        s = s.masked_fill(~token_mask.unsqueeze(0), float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, 0))  # (B, H, Sq, Skv), rows' max -> 1
    p8 = (p * E4M3_MAX).to(E4M3).float()
    out = torch.einsum("bhqk,bkhd->bqhd", p8, vf) / (E4M3_MAX * p.sum(-1).transpose(1, 2).unsqueeze(-1))
    return torch.nan_to_num(out, nan=0.0).to(q.dtype)  # a query with no allowed key: zeros
