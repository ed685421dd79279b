"""Samplers over flow-matching models.

Convention (docs/distillation.md): x_t = (1 - t) x0 + t eps, t = sigma in [0, 1]; the model
predicts v = eps - x0, so x0_hat = x_t - sigma * v. The DiT takes timesteps in the
teacher's units, t = sigma * num_train_timesteps (Wan: 1000).

- `EulerSampler` (teachers): Euler steps over shifted sigmas, classifier-free guidance.
- `FewStepSampler` (students): at each sigma of an explicit list, predict x0, then
  re-noise it to the next sigma with fresh noise; the last step returns x0.
Both are deterministic under a `torch.Generator`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .config import SamplerConfig

# model(x, t, context) -> velocity; t: (B,) in timestep units
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift of SD3/Wan: sigma' = shift * s / (1 + (shift - 1) * s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def euler_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """num_steps + 1 sigmas from 1 down to 0 (float64), shifted."""
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Noise drawn on the generator's device (CPU by default) then moved: the same seed
    gives the same noise on every device."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device=device, dtype=dtype)


def _guided(model: VelocityFn, x, t, context, uncond, guidance: float):
    """v = v_u + g (v_c - v_u), cond and uncond in one batched call."""
    if uncond is None or guidance == 1.0:
        return model(x, t, context)
    L = max(context.shape[1], uncond.shape[1])
    pad = lambda c: torch.nn.functional.pad(c, (0, 0, 0, L - c.shape[1]))  # noqa: E731 (zero padding)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([pad(context), pad(uncond)]))
    v_c, v_u = v.chunk(2)
    return v_u + guidance * (v_c - v_u)


class EulerSampler:
    """Flow-matching Euler with timestep shift and CFG (guidance > 1 uses `uncond`).

    With `boundary` (a two-expert model's low_noise_boundary) and `low_noise_guidance`, the
    steps at sigma <= boundary (the low-noise expert's) use that CFG scale instead."""

    def __init__(self, num_steps: int = 50, shift: float = 5.0, guidance: float = 5.0, num_train_timesteps: int = 1000,
                 low_noise_guidance: float | None = None, boundary: float | None = None):
        self.num_steps, self.shift, self.guidance, self.T = num_steps, shift, guidance, num_train_timesteps
        self.low_noise_guidance, self.boundary = low_noise_guidance, boundary

    def guidance_at(self, t: float) -> float:
        """The CFG scale of a step at timestep t (0..T): the experts' rule, t <= T * boundary is low noise."""
        low = self.boundary is not None and self.low_noise_guidance is not None and t <= self.T * self.boundary
        return self.low_noise_guidance if low else self.guidance

    @property
    def sigmas(self) -> torch.Tensor:
        return euler_sigmas(self.num_steps, self.shift)

    def sample(self, model: VelocityFn, noise: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None = None,
               generator: torch.Generator | None = None, progress: Iterable | None = None) -> torch.Tensor:
        # noise: (B, C, F, H, W) ~ N(0, I) at sigma = 1
        sig = self.sigmas.tolist()
        x = noise.float()
        steps = range(self.num_steps) if progress is None else progress(range(self.num_steps))
        for i in steps:
            t = torch.full((x.shape[0],), sig[i] * self.T, device=x.device)
            guidance = self.guidance_at(sig[i] * self.T) if uncond is not None else 1.0
            v = _guided(model, x.to(noise.dtype), t, context, uncond, guidance).float()
            x = x + (sig[i + 1] - sig[i]) * v
        return x


class FewStepSampler:
    """Student sampler: x0 prediction at each sigma, re-noised to the next one."""

    def __init__(self, sigmas: list[float], num_train_timesteps: int = 1000, guidance: float = 0.0):
        self.sigmas, self.T, self.guidance = list(sigmas), num_train_timesteps, guidance

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def draw_noises(self, shape, generator: torch.Generator | None, device) -> list[torch.Tensor]:
        """The re-noising draws of one `sample()` call, in its order: `num_steps - 1`
        float32 tensors. Drawn up front they let a CUDA graph replay the whole loop while
        the seed still decides the video."""
        return [randn(shape, generator, device) for _ in range(self.num_steps - 1)]

    def sample(self, model: VelocityFn, noise: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None = None,
               generator: torch.Generator | None = None, progress: Iterable | None = None,
               noises: list[torch.Tensor] | None = None) -> torch.Tensor:
        # noise: (B, C, F, H, W); the first step sees pure noise labelled sigmas[0] (usually 1.0)
        # noises: the re-noising draws (`draw_noises`); None draws them from `generator` as it goes
        if noises is not None and len(noises) != self.num_steps - 1:
            raise ValueError(f"noises must hold {self.num_steps - 1} tensors (one per re-noising), got {len(noises)}")
        x = noise.float()
        steps = range(self.num_steps) if progress is None else progress(range(self.num_steps))
        x0 = x
        for i in steps:
            s = self.sigmas[i]
            t = torch.full((x.shape[0],), s * self.T, device=x.device)
            v = _guided(model, x.to(noise.dtype), t, context, uncond, self.guidance if uncond is not None else 1.0).float()
            x0 = x - s * v
            if i + 1 < self.num_steps:
                s_next = self.sigmas[i + 1]
                eps = randn(x.shape, generator, x.device) if noises is None else noises[i]
                x = (1 - s_next) * x0 + s_next * eps
        return x0


def build_sampler(cfg: SamplerConfig, low_noise_boundary: float | None = None):
    """The sampler of `cfg`; `low_noise_boundary`: a two-expert bundle's (for low_noise_guidance)."""
    if cfg.kind == "euler":
        return EulerSampler(cfg.num_steps, cfg.shift, cfg.guidance, cfg.num_train_timesteps, cfg.low_noise_guidance,
                            low_noise_boundary)
    return FewStepSampler(cfg.sigmas, cfg.num_train_timesteps, cfg.guidance)
