"""Getting the DiT ready to trace: reference ops (standard PyTorch ops only) and RoPE in
real arithmetic, then `torch.export`.

The reference `apply_rope` multiplies complex numbers; ONNX has no complex tensors and
the ONNX exporter cannot translate them, so while tracing the reference backend's
`apply_rope` is swapped for the same rotation written on (even, odd) channel pairs
(`rope_real`, equal to the complex form to fp32 rounding, tested).
"""

from __future__ import annotations

import contextlib

import torch

from ..model.embed import clear_rope_cache
from ..ops import registry
from .spec import EngineSpec

__all__ = ["rope_real", "traceable", "export_program"]


def rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`ops.ref.apply_rope` without complex numbers. x: (B, S, H, Dh); cos, sin: (S, Dh/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, S, H, Dh/2, 2)
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).to(x.dtype)


@contextlib.contextmanager
def traceable(model, example_inputs):
    """Within the block `model` runs reference ops with `rope_real`.

    The RoPE table cache is filled with real tensors by one eager forward on
    `example_inputs` first (a table first built while tracing would be a fake tensor left
    in the cache) and emptied afterwards.
    """
    old_backend, old_rope = model.backend, registry.available("apply_rope")["ref"]
    model.backend = "ref"
    registry.register("apply_rope", "ref", rope_real, lambda *t: None)
    try:
        with torch.no_grad():
            model(*example_inputs)  # warms the RoPE cache with real tensors
        yield model
    finally:
        registry.register("apply_rope", "ref", old_rope, lambda *t: None)
        model.backend = old_backend
        clear_rope_cache()


def export_program(model, spec: EngineSpec, device) -> torch.export.ExportedProgram:
    """`torch.export` of the DiT at `spec`'s example shapes with its dynamic dims."""
    gen = torch.Generator().manual_seed(1234)
    example = spec.random_inputs(gen, device, **spec.example_dims())
    with traceable(model, example), torch.no_grad():
        return torch.export.export(model, example, dynamic_shapes=spec.torch_dynamic_shapes(), strict=False)
