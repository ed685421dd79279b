"""Small shared test utilities."""

import pytest
import torch

from flgengine.config import ModelConfig


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, tol: float, what: str = "") -> None:
    """Relative-norm check that says where the worst element is when it fails."""
    err = rel_err(actual, expected)
    if not err <= tol:
        diff = (actual.double() - expected.double()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e}; worst at {idx}: "
                             f"{actual[idx].item():.6g} vs {expected[idx].item():.6g}")


def tiny_config(**kw) -> ModelConfig:
    base = dict(in_channels=4, out_channels=4, patch_size=(1, 2, 2), num_heads=2, head_dim=8, ffn_dim=24,
                text_dim=12, freq_dim=16, num_layers=4)
    base.update(kw)
    return ModelConfig(**base)


def skip_gpu_tests_without_cuda(items) -> None:
    """Collection hook body shared by tests/ and bench/: `gpu` items skip without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
