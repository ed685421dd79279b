"""Reference ops: readable PyTorch, the definition every fused backend is tested against.

Shapes: x (B, S, D) token streams; q/k/v (B, S, H, Dh) per-head layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_token(m: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, 1, D) so a per-sample modulation broadcasts over tokens."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine, then x * (1 + scale) + shift; fp32 math, x's dtype out.

    x: (B, S, D); scale, shift: (B, D) per sample or (B, S, D) per token.
    """
    return _modulated(x, scale, shift, eps).to(x.dtype)


def _modulated(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """adaln_modulate's value in fp32, before rounding to x's dtype."""
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return y * (1 + _per_token(scale).float()) + _per_token(shift).float()


def _quantized_tokens(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h (..., K) -> (e4m3 (..., K), fp32 scales (..., 1)): one scale per token (`fp8.quantize_tokens`)."""
    from . import fp8

    h8, scale = fp8.quantize_tokens(h.reshape(-1, h.shape[-1]))
    return h8.view(h.shape), scale.view(*h.shape[:-1], 1)


def adaln_modulate_fp8(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """adaln_modulate for an FP8 linear's input: h quantised per token from its fp32 value (no
    rounding to x's dtype in between). Returns h8 (B, S, D) e4m3 and scales (B, S, 1) fp32,
    h ~= h8 * scales."""
    return _quantized_tokens(_modulated(x, scale, shift, eps))


def gated_residual_adaln(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                         shift: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated residual add fused with the next adaLN: returns (x_new, h) with

        x_new = x + gate * y            (fp32 math, rounded to x's dtype)
        h     = adaln_modulate(x_new, scale, shift, eps)   (statistics of the rounded x_new)

    x, y: (B, S, D) same dtype; gate, scale, shift: (B, D) per sample or (B, S, D) per token
    (any strides, e.g. a (D,) vector expanded over B).
    """
    x_new = _gated_residual(x, y, gate)
    return x_new, adaln_modulate(x_new, scale, shift, eps)


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y in fp32, rounded to x's dtype."""
    return (x.float() + y.float() * _per_token(gate).float()).to(x.dtype)


def gated_residual_adaln_fp8(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                             shift: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gated_residual_adaln with h for an FP8 linear: (x_new, h8 (B, S, D) e4m3, scales (B, S, 1)
    fp32), h quantised per token as in adaln_modulate_fp8."""
    x_new = _gated_residual(x, y, gate)
    return (x_new, *adaln_modulate_fp8(x_new, scale, shift, eps))


def gelu_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN's hidden activation for its FP8 second linear: tanh GELU in fp32, quantised per
    token. x: (..., K) -> (e4m3 (..., K), fp32 scales (..., 1))."""
    return _quantized_tokens(F.gelu(x.float(), approximate="tanh"))


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's q/k path of self-attention: RMSNorm across all heads (with weight), split into
    heads, interleaved-pair RoPE. Returns q, k as (B, S, H, Dh), the layout `attention` reads.

    q, k: (B, S, H*Dh) (the q/k projections); q_weight, k_weight: (H*Dh,); cos, sin:
    (S, Dh/2) fp32. The normalised value is rounded to q's dtype before the rotation (as the
    unfused model does); RoPE math in fp32.
    """
    q = rms_norm(q, q_weight, eps).unflatten(-1, (num_heads, -1))  # (B, S, H, Dh)
    k = rms_norm(k, k_weight, eps).unflatten(-1, (num_heads, -1))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim with a weight (Wan's q/k norm runs it across all heads)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved channel pairs (x[2i], x[2i+1]) by per-token angles.

    x: (B, S, H, Dh); cos, sin: (S, Dh // 2) fp32. Math in fp32, x's dtype out. Written in
    real arithmetic (no complex tensors), so exporters (ONNX) take it as it is.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, S, H, Dh/2, 2): pairs (x1, x2)
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    # (x1 + i x2) * (cos + i sin) = (x1 cos - x2 sin) + i (x1 sin + x2 cos)
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask=None, precision: str | None = None) -> torch.Tensor:
    """Non-causal softmax attention. q: (B, Sq, H, Dh); k, v: (B, Skv, H, Dh) -> (B, Sq, H, Dh).

    block_mask: a `BlockMask` (tiles of query x key blocks that are computed); a query whose
    tiles are all masked gets zeros. precision="fp8": the kernel's FP8 numerics emulated
    (`fp8.attention_reference`)."""
    token_mask = None if block_mask is None else block_mask.token_mask()  # (Hm, Sq, Skv)
    if precision == "fp8":
        from . import fp8

        return fp8.attention_reference(q, k, v, token_mask=token_mask)
    if token_mask is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=token_mask.unsqueeze(0))
    return torch.nan_to_num(out.transpose(1, 2), nan=0.0)
