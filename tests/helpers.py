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


def write_clips(directory, captions, frames: int, height: int, width: int, size: int, step: int, seed: int = 0):
    """Captioned test clips: clip{i}.gif (a `size`-pixel square of a random colour drifting
    right `step` pixels a frame on black) + clip{i}.txt, one per caption; returns `directory`."""
    import imageio.v3 as iio
    import numpy as np

    rng = np.random.default_rng(seed)
    top = (height - size) // 2
    for i, caption in enumerate(captions):
        video = np.zeros((frames, height, width, 3), np.uint8)
        for f in range(frames):
            video[f, top:top + size, 2 + step * f:2 + step * f + size] = rng.integers(60, 255, 3)
        iio.imwrite(directory / f"clip{i}.gif", video)
        (directory / f"clip{i}.txt").write_text(caption)
    return directory


def tiny_shard_run(teacher, out, shards, budget: float = 0.2, **config):
    """distill.run's result of a two-step-per-stage run on precomputed shards (no evaluation)."""
    from distill.run import RunConfig, run

    cfg = RunConfig(teacher=str(teacher), out=str(out), data={"kind": "shards", "path": str(shards)},
                    importance={"samples": 2, "num_t": 2, "batch_size": 4}, plan={"budget": budget},
                    stage2={"steps": 2, "batch_size": 2, "eval_batch": 2}, evaluate=None,
                    stage3={"steps": 2, "batch_size": 2, "fake_updates": 1}, **config)
    return run(cfg, progress=False)


def capture_latents(pipe) -> dict:
    """Makes `pipe`'s codec keep the latents it decodes: the dict's "latents" after a call."""
    decode, seen = pipe.codec.decode, {}

    def keep(z):
        seen["latents"] = z.clone()
        return decode(z)

    pipe.codec.decode = keep
    return seen
