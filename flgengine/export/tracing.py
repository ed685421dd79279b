"""Getting the DiT ready to trace: reference ops (standard PyTorch ops only; RoPE is
written in real arithmetic, which ONNX takes), then `torch.export`.
"""

from __future__ import annotations

import contextlib

import torch

from ..model.embed import clear_rope_cache
from ..ops import registry
from .spec import EngineSpec

__all__ = ["reference_ops", "traceable", "export_program"]


@contextlib.contextmanager
def reference_ops(model):
    """Within the block `model`'s forward runs the reference ops (`ops/ref.py`: standard
    PyTorch ops, which every exporter takes): the model's backend (ops/registry.py, step 2)
    is `ref` there. A model with another backend of its own is refused, not changed."""
    own = getattr(model, "backend", None)
    if own not in (None, "ref"):
        raise ValueError(f"engines are traced and verified with the reference ops; this model's backend is {own!r} "
                         "(set model.backend = None or 'ref')")
    with registry.prefer("ref"):
        yield model


@contextlib.contextmanager
def traceable(model, example_inputs):
    """Within the block `model` runs reference ops (`reference_ops`).

    The RoPE table cache is filled with real tensors for `example_inputs`' token grid first
    (a table first built while tracing would be a fake tensor left in the cache) and
    emptied afterwards. No forward runs: at Wan sizes one eager CPU forward is most of an
    hour.
    """
    text_mask = getattr(model, "text_mask", None)  # a DiT that drops padded text per sample masks it in one pass
    try:
        with reference_ops(model):
            grid = model.check_inputs(*example_inputs)
            model.rope(grid, example_inputs[0].device)  # the forward's call
            if text_mask is not None:
                model.text_mask = "attention"
            yield model
    finally:
        if text_mask is not None:
            model.text_mask = text_mask
        clear_rope_cache()


def export_program(model, spec: EngineSpec, device) -> torch.export.ExportedProgram:
    """`torch.export` of the DiT at `spec`'s example shapes with its dynamic dims."""
    gen = torch.Generator().manual_seed(1234)
    example = spec.random_inputs(gen, device, **spec.example_dims())
    with traceable(model, example), torch.no_grad():
        return torch.export.export(model, example, dynamic_shapes=spec.torch_dynamic_shapes(), strict=False)
