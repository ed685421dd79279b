"""A student's whole few-step loop as one CUDA graph: every DiT call and the sampler's
arithmetic between them, captured once per shape and replayed.

    noise, re-noising draws (drawn from the seeded CPU generator, as the eager loop does)
      --copy--> static buffers --graph.replay()--> static x0 --clone--> latents

The random draws are not part of the graph: they are drawn up front on the CPU in the
eager loop's order (`FewStepSampler.draw_noises`) and copied into the graph's input
buffers, so the same seed gives the same video with or without the graph.
"""

from __future__ import annotations

import torch

from .sampling import FewStepSampler

__all__ = ["GraphedFewStepLoop", "graph_key"]


def graph_key(sampler: FewStepSampler, noise: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None) -> tuple:
    """What a captured loop is specific to: the sampler's schedule and every input's shape and dtype."""
    return (tuple(sampler.sigmas), sampler.T, sampler.guidance, tuple(noise.shape), noise.dtype, noise.device,
            tuple(context.shape), context.dtype, None if uncond is None else tuple(uncond.shape))


class GraphedFewStepLoop:
    """`sampler.sample(model, ...)` captured as one CUDA graph for fixed input shapes."""

    def __init__(self, sampler: FewStepSampler, model, noise: torch.Tensor, context: torch.Tensor,
                 uncond: torch.Tensor | None = None, warmup: int = 2):
        if noise.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs CUDA tensors, got noise on {noise.device}")
        self.sampler, self.model, self.key = sampler, model, graph_key(sampler, noise, context, uncond)
        device = noise.device
        # 1. static input buffers (the graph reads these addresses on every replay)
        self.noise = torch.zeros_like(noise)
        self.noises = torch.zeros((sampler.num_steps - 1, *noise.shape), dtype=torch.float32, device=device)
        self.context = torch.zeros_like(context)
        self.uncond = None if uncond is None else torch.zeros_like(uncond)
        # 2. warm up on a side stream (kernel selection, cuBLAS workspaces, RoPE tables), as capture requires
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._loop()
        torch.cuda.current_stream(device).wait_stream(side)
        # 3. capture; `self.out` is the graph's output buffer
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._loop()

    def _loop(self) -> torch.Tensor:
        return self.sampler.sample(self.model, self.noise, self.context, self.uncond, noises=list(self.noises.unbind(0)))

    def __call__(self, noise: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None,
                 generator: torch.Generator | None) -> torch.Tensor:
        """Same result as `sampler.sample(model, noise, context, uncond, generator=generator)`."""
        if graph_key(self.sampler, noise, context, uncond) != self.key:
            raise ValueError("these inputs have other shapes than the captured graph's; capture another one")
        self.noise.copy_(noise)
        for buf, eps in zip(self.noises.unbind(0), self.sampler.draw_noises(noise.shape, generator, noise.device)):
            buf.copy_(eps)
        self.context.copy_(context)
        if uncond is not None:
            self.uncond.copy_(uncond)
        self.graph.replay()
        return self.out.clone()
