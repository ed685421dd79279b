"""Embeddings of the DiTs: sinusoidal timesteps, the time/text MLPs and 3D RoPE.

Patchify is the DiT's Conv3d (`patch_embed`); unpatchify lives with the output head.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, [cos | sin] halves (Wan/diffusers `flip_sin_to_cos=True`).

    t: (N,) in the teacher's timestep units (0..1000) -> (N, dim) fp32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # (N, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimeEmbedding(nn.Module):
    """freq embedding -> Linear -> SiLU -> Linear: (N, freq_dim) -> (N, D)."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(f)))


class TextProjection(nn.Module):
    """Text encoder states into model width: Linear -> GELU(tanh) -> Linear, (B, L, text_dim) -> (B, L, D)."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(c), approximate="tanh"))


class ImageEmbedding(nn.Module):
    """CLIP image tokens (B, Li, image_dim) -> (B, Li, D): LayerNorm, Linear, GELU (exact),
    Linear, LayerNorm, both norms computed in fp32 (Wan2.1-I2V's image embedder)."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(image_dim, eps=1e-5)
        self.fc1 = nn.Linear(image_dim, image_dim)
        self.fc2 = nn.Linear(image_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)

    @staticmethod
    def _fp32_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).type_as(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self._fp32_norm(self.norm1, image.to(self.fc1.weight.dtype))
        return self._fp32_norm(self.norm2, self.fc2(F.gelu(self.fc1(h))))


def per_token(m: torch.Tensor) -> torch.Tensor:
    """A modulation as it broadcasts over tokens: (B, D) per sample -> (B, 1, D); (B, S, D) stays."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def mean_text(context: torch.Tensor) -> torch.Tensor:
    """Mean of a prompt's text states over its real tokens: (B, L, text_dim) -> (B, text_dim).

    Padding rows are exactly zero (both text encoders zero them), so the mean does not
    depend on how far a prompt is padded; an all-padding prompt (the empty, unconditional
    one) pools to zero.
    """
    real = context.abs().amax(dim=-1).gt(0).to(context.dtype)  # (B, L) 1 = real token
    return context.sum(dim=1) / real.sum(dim=1, keepdim=True).clamp(min=1.0)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to (frame, height, width) positions, as Wan splits them."""
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


@lru_cache(maxsize=32)
def _rope_table(head_dim: int, grid: tuple[int, int, int], theta: float, max_len: int,
                split: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    f, h, w = grid
    angles = []
    for n_pos, n_ch, axis in zip(grid, split or rope_split(head_dim), range(3)):
        inv = 1.0 / theta ** (torch.arange(0, n_ch, 2, dtype=torch.float64)[: n_ch // 2] / n_ch)  # (n_ch/2,)
        a = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv)  # (n_pos, n_ch/2)
        shape = [1, 1, 1, -1]
        shape[axis] = n_pos
        angles.append(a.view(*shape).expand(f, h, w, -1))
    a = torch.cat(angles, dim=-1).reshape(f * h * w, head_dim // 2)  # (S, Dh/2), token order (f, h, w)
    return torch.cos(a).float(), torch.sin(a).float()


def rope_3d(head_dim: int, grid: tuple[int, int, int], theta: float, max_len: int, device,
            split: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (S, head_dim/2) fp32 for a (frames, height, width) token grid. `split`:
    the channels of a head given to (frame, height, width), summing to head_dim (HunyuanVideo's
    rope_axes); None = Wan's (rope_split)."""
    if max(grid) > max_len:
        raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={max_len} along one axis")
    return _rope_on_device(head_dim, tuple(grid), float(theta), max_len, torch.device(device),
                           None if split is None else tuple(split))


@lru_cache(maxsize=32)
def _rope_on_device(head_dim: int, grid: tuple[int, int, int], theta: float, max_len: int,
                    device: torch.device, split: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables kept on `device`: no host-to-device copy per forward, which also lets a
    CUDA graph capture the forward (a pageable copy cannot be captured)."""
    cos, sin = _rope_table(head_dim, grid, theta, max_len, split)
    return cos.to(device), sin.to(device)


def clear_rope_cache() -> None:
    """Empties the RoPE table caches. Tracing (torch.export) would otherwise leave fake
    tensors in them when it is the first to build a table."""
    _rope_table.cache_clear()
    _rope_on_device.cache_clear()
