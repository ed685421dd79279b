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
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * (1 + _per_token(scale).float()) + _per_token(shift).float()).to(x.dtype)


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention. q: (B, Sq, H, Dh); k, v: (B, Skv, H, Dh) -> (B, Sq, H, Dh)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
