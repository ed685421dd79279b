"""Verifying an engine: its output against the PyTorch DiT (reference ops) on fresh random inputs."""

from __future__ import annotations

import torch

from .manifest import EngineError, Verification
from .spec import EngineSpec
from .tracing import reference_ops

__all__ = ["VerificationError", "verify_shapes", "verify_engine"]


class VerificationError(EngineError):
    """The engine's output differs from PyTorch's by more than the tolerance."""


def verify_shapes(spec: EngineSpec) -> list[dict[str, int]]:
    """The opt shape, and when a dim is dynamic another one: one more sample than opt
    (a dynamic batch really batches) and the fewest text tokens."""
    opt = {"batch": spec.batch.opt, "text_len": spec.text_len.opt}
    other = {"batch": min(spec.batch.opt + 1, spec.batch.max), "text_len": spec.text_len.min}
    return [opt] if other == opt else [opt, other]


@torch.no_grad()
def verify_engine(run, model, spec: EngineSpec, device, *, seed: int = 0, tolerance: float | None = None) -> Verification:
    """`run(x, t, context[, image_context])` vs `model` (reference ops) on fresh random inputs; raises
    VerificationError past `tolerance` (default: the spec dtype's)."""
    tol = spec.tolerance if tolerance is None else tolerance
    gen = torch.Generator().manual_seed(seed)
    worst_abs = worst_rel = 0.0
    shapes = verify_shapes(spec)
    with reference_ops(model):
        for dims in shapes:
            inputs = spec.random_inputs(gen, device, **dims)
            want = model(*inputs).double()
            got = run(*inputs).to(want.device).double()
            if got.shape != want.shape:
                raise VerificationError(f"engine output has shape {tuple(got.shape)}, PyTorch's {tuple(want.shape)}")
            if not torch.isfinite(got).all():
                raise VerificationError(f"engine output has NaN or Inf values at {dims}")
            worst_abs = max(worst_abs, (got - want).abs().max().item())
            worst_rel = max(worst_rel, ((got - want).norm() / want.norm().clamp_min(1e-30)).item())
    result = Verification(max_abs_error=worst_abs, rel_error=worst_rel, tolerance=tol, shapes=shapes, seed=seed)
    if not worst_rel <= tol:
        raise VerificationError(f"engine differs from PyTorch: relative error {worst_rel:.3e} > tolerance {tol:.1e} "
                                f"(max abs error {worst_abs:.3e}); rerun with --no-verify to keep it anyway")
    return result
