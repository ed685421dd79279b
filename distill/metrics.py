"""Quality metrics of the shapes world: motion and a Fréchet distance, with the evaluator's
prompt adherence (`evaluator.py`), over a set of videos.

- `motion`: centroid speed of the bright pixels, against the world's true speed.
- `frechet_distance`: between the evaluator features of two video sets (FVD-style, on a
  network trained for the world); `evaluate_videos` also reports the floor, two independent
  real sets of the same size and prompts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .evaluator import Evaluator, adherence, as_uint8, features, load_evaluator, parse_prompts, read_videos
from .worlds import shapes as world

__all__ = ["real_videos", "gaussian_stats", "frechet_distance_gaussians", "frechet_distance", "centroids", "motion",
           "first_frame_metrics", "evaluate_videos"]


def real_videos(prompts: Sequence[str], seed: int, size: int = world.SIZE,
                num_frames: int = world.NUM_FRAMES) -> np.ndarray:
    """World clips for `prompts` (random size and start, drawn from `seed`): uint8 (N, T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    clips = [world.sample_clip(rng, size, num_frames, colour=c, shape=s, direction=d) for c, s, d in parse_prompts(prompts)]
    return np.stack([world.render(c, size, num_frames) for c in clips])


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (F,), covariance (F, F)) of features (N, F), float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"features must be (N, F) with N >= 2, got {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues,
    rounding noise, are clipped to 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_gaussians(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), float64."""
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    r1 = _sqrtm_psd(s1)
    cross = np.trace(_sqrtm_psd(r1 @ s2 @ r1))
    return float(max(0.0, np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N, F) and (M, F)."""
    return frechet_distance_gaussians(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def centroids(videos, threshold: float = 0.25) -> np.ndarray:
    """(N, T, 2) shape centre (x, y) per frame, in the world's pixel coordinates.

    Brightness is a pixel's largest channel in [0, 1]; each pixel weighs by how far its
    brightness exceeds `threshold` (dim noise weighs nothing). NaN on frames with no
    pixel above the threshold.
    """
    v = as_uint8(videos).numpy()
    weight = np.clip(v.max(-1).astype(np.float64) / 255 - threshold, 0, None)  # (N, T, H, W)
    H, W = weight.shape[-2:]
    mass = weight.sum((-2, -1))  # (N, T)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (weight.sum(-2) * (np.arange(W) + 0.5)).sum(-1) / mass
        y = (weight.sum(-1) * (np.arange(H) + 0.5)).sum(-1) / mass
    return np.stack([x, y], -1)


def _speeds(centres: np.ndarray) -> np.ndarray:
    """(N,) mean per-frame displacement of centres (N, T, 2), pixels per frame, over
    consecutive frames that both show the shape (0 for fewer than two such frames)."""
    step = np.linalg.norm(np.diff(centres, axis=1), axis=-1)  # (N, T - 1), NaN next to a blank frame
    valid = ~np.isnan(step)
    return np.where(valid.any(1), np.nansum(step, 1) / np.maximum(valid.sum(1), 1), 0.0)


def motion(videos, threshold: float = 0.25, static: float = 0.25) -> dict[str, float]:
    """Centroid speed (`centroids`, per video the mean per-frame displacement), averaged
    over the videos, against the world's: `mean_speed`, `true_speed` (px/frame), `ratio`,
    `static_fraction` (videos slower than `static` x true speed) and `blank_frames`
    (fraction of frames with nothing above the threshold)."""
    v = as_uint8(videos)
    centres = centroids(v, threshold)  # (N, T, 2)
    s = _speeds(centres)
    true = world.true_speed(v.shape[3])
    return {"mean_speed": float(s.mean()), "true_speed": true, "ratio": float(s.mean() / true),
            "static_fraction": float((s < static * true).mean()),
            "blank_frames": float(np.isnan(centres[..., 0]).mean())}


def first_frame_metrics(videos, first_frames, read: dict[str, list[str]], prompts: Sequence[str],
                        threshold: float = 0.5, size_tolerance: float = 0.3) -> dict[str, float]:
    """Image-to-video: how well videos (N, T, H, W, 3) keep their given first frames (N, H, W, 3).

    `frame0_psnr`: mean PSNR (dB, peak 255; identical frames count 100) of frame 0 against the
    given one. `appearance_kept`: fraction of videos whose colour and shape read (the evaluator's
    labels `read`) as the image's (the prompt names them) and whose shape keeps its size: every
    frame's area (pixels brighter than `threshold`, half the world's full brightness: the shape's
    half-maximum edge, so a dim haze around it does not count as shape; haze shows in FD) within
    `size_tolerance` of the given frame's. `colour_kept`, `shape_kept`, `size_kept` alone."""
    v = as_uint8(videos).numpy().astype(np.float64)
    first = as_uint8(np.asarray(first_frames)[:, None]).numpy().astype(np.float64)[:, 0]  # (N, H, W, 3)
    mse = ((v[:, 0] - first) ** 2).mean((1, 2, 3))
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 100.0)
    area = (v.max(-1) / 255 > threshold).sum((-2, -1))  # (N, T)
    given = np.maximum((first.max(-1) / 255 > threshold).sum((-2, -1)), 1)  # (N,)
    size_kept = (np.abs(area / given[:, None] - 1) <= size_tolerance).all(1)
    wanted = parse_prompts(prompts)
    colour = np.array([read["colour"][i] == w[0] for i, w in enumerate(wanted)])
    shape = np.array([read["shape"][i] == w[1] for i, w in enumerate(wanted)])
    return {"frame0_psnr": float(psnr.mean()), "appearance_kept": float((colour & shape & size_kept).mean()),
            "colour_kept": float(colour.mean()), "shape_kept": float(shape.mean()), "size_kept": float(size_kept.mean())}


def evaluate_videos(videos, prompts: Sequence[str], evaluator: Evaluator | None = None,
                    real_seed: int = 12345, first_frames=None) -> dict:
    """All metrics of a video set (uint8 (N, T, H, W, 3)) generated for `prompts`.

    The Fréchet distance `fd` compares the videos' evaluator features with those of N
    real world clips for the same prompts (drawn from `real_seed`); `fd_real_vs_real` is
    its floor at this N: that real set against another (`real_seed + 1`). `first_frames`
    (N, H, W, 3): the images an image-to-video model was given (`first_frame_metrics`).
    """
    evaluator = evaluator or load_evaluator()
    v = as_uint8(videos)
    c = evaluator.config
    real_a, real_b = (real_videos(prompts, real_seed + k, c.size, c.num_frames) for k in (0, 1))
    feats, read = read_videos(evaluator, v)
    fa, fb = features(evaluator, real_a), features(evaluator, real_b)
    image = {} if first_frames is None else {"first_frame": first_frame_metrics(v, first_frames, read, prompts)}
    return {
        "videos": len(v),
        "prompt_adherence": adherence(read, prompts),
        "motion": motion(v),
        "fd": frechet_distance(feats, fa),
        "fd_real_vs_real": frechet_distance(fb, fa),
        **image,
    }
