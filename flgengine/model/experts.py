"""Two experts by noise level (Wan2.2 A14B's split): one DiT for the high-noise steps, where
the layout and the motion of a clip are decided, and one for the low-noise steps, where its
detail is cleaned up.

    t > boundary  -> high(x, t, context)     (the bundle's own DiT)
    t <= boundary -> low(x, t, context)      (the bundle's low_noise/ DiT)

with t in timestep units (0..1000) and `boundary` in 0..1 (pipeline.json's
low_noise_boundary). A batch whose samples sit on both sides is split and put back
together. Distillation prunes and trains the high-noise expert (`.blocks` is its blocks);
the low-noise one stays whole. `backend` is the pair's ops backend: both experts run with it
unless one has a backend of its own (ops/registry.py, step 2).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .dit import DiT


class TwoExpertDiT(nn.Module):
    def __init__(self, high: DiT, low: DiT, boundary: float):
        super().__init__()
        if not 0.0 < boundary < 1.0:
            raise ValueError(f"boundary must be in (0, 1), got {boundary!r}")
        for what, a, b in (("in_channels", high.config.in_channels, low.config.in_channels),
                           ("out_channels", high.config.out_channels, low.config.out_channels),
                           ("patch_size", high.config.patch_size, low.config.patch_size),
                           ("text_dim", high.config.text_dim, low.config.text_dim)):
            if a != b:
                raise ValueError(f"the two experts differ in {what}: high {a!r}, low {b!r}")
        self.high, self.low, self.boundary = high, low, float(boundary)
        self.backend: str | None = None  # ops backend of both experts; None = automatic

    # the high-noise expert stands for the pair where one DiT is expected (shapes, pruning)
    @property
    def config(self):
        return self.high.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.high.blocks

    def experts(self) -> tuple[DiT, DiT]:
        return self.high, self.low

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, image_context=None):
        return self.high.check_inputs(x, t, context, image_context)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                image_context: torch.Tensor | None = None) -> torch.Tensor:
        with ops.registry.prefer(self.backend):
            return self._forward(x, t, context, image_context)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 image_context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, F, H, W); t: (B,) timesteps 0..1000; context: (B, L, text_dim)
        self.check_inputs(x, t, context, image_context)
        # a sample's noise level: its t, or its noisiest token's (per-token t: an image's clean
        # first frame sits at t = 0 beside the noisy frames, which decide the expert)
        level = t if t.dim() == 1 else t.amax(dim=1)
        low = level <= 1000.0 * self.boundary  # (B,) bool
        n_low = int(low.sum())
        if n_low == 0:
            return self.high(x, t, context, image_context)
        if n_low == len(t):
            return self.low(x, t, context, image_context)
        hi = ~low
        img = (lambda m: None) if image_context is None else (lambda m: image_context[m])
        out_hi = self.high(x[hi], t[hi], context[hi], img(hi))
        out = out_hi.new_empty((x.shape[0], *out_hi.shape[1:]))
        out[hi] = out_hi
        out[low] = self.low(x[low], t[low], context[low], img(low)).to(out.dtype)
        return out

    def num_params(self) -> int:
        return self.high.num_params() + self.low.num_params()

    def cast(self, dtype: torch.dtype) -> "TwoExpertDiT":
        self.high.cast(dtype)
        self.low.cast(dtype)
        return self


def main_expert(model):
    """The DiT that pruning and distillation act on: a two-expert model's high-noise expert,
    else the model itself."""
    return model.high if isinstance(model, TwoExpertDiT) else model
