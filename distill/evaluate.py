"""Quality metrics of the shapes world: prompt adherence, motion and a Fréchet distance.

    python -m distill train-evaluator [--steps N] [--out DIR]        # ships distill/assets/shapes-evaluator
    python -m distill evaluate BUNDLE --samples 60 [--seeds 0 1] [--json] [--write-provenance]

- `Evaluator`: a small CNN that classifies the colour, shape and direction of a clip. All
  frames and their differences are stacked as channels of one 2D image, so direction is
  a local pattern (leading edge brighter, trailing edge darker). Its penultimate layer is
  the feature space of the Fréchet distance (FVD-style, on a network trained for the world).
- `prompt_adherence`: how often the evaluator reads back what the prompt asked for.
- `motion`: centroid speed of the bright pixels, against the world's true speed.
- `frechet_distance`: between the evaluator features of two video sets; `evaluate_videos`
  also reports the floor, two independent real sets of the same size and prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import flgengine
from flgengine.bundle import (BundleError, atomic_save_safetensors, atomic_write_text, check_state_dict,
                              load_safetensors, read_json_object)
from flgengine.codec import uint8_to_video
from flgengine.config import ConfigError, JsonConfig

from .trainer import cosine_lr
from .worlds import shapes as world

__all__ = [
    "DEFAULT_DIR",
    "EvaluatorConfig",
    "Evaluator",
    "train_evaluator",
    "save_evaluator",
    "load_evaluator",
    "real_videos",
    "classify",
    "features",
    "prompt_adherence",
    "gaussian_stats",
    "frechet_distance_gaussians",
    "frechet_distance",
    "centroids",
    "motion",
    "evaluate_videos",
    "evaluate_bundle",
    "format_table",
    "add_evaluate_args",
    "run_evaluate",
    "add_train_evaluator_args",
    "run_train_evaluator",
]

DEFAULT_DIR = Path(__file__).parent / "assets" / "shapes-evaluator"
EVALUATOR_FILES = ("config.json", "model.safetensors", "report.json")
ATTRIBUTES = ("colour", "shape", "direction")
TRAIN_SEED = 1000  # world stream of the training batches
HELDOUT_SEED = 2000  # world stream of the held-out accuracy clips
BATCH_SEED_STRIDE = 10_000  # evaluate_bundle: batch k of base seed s runs with seed s * stride + k


# ---- the evaluator ---------------------------------------------------------------------

@dataclass
class EvaluatorConfig(JsonConfig):
    """`config.json` of an evaluator: the clips it reads, its widths and its label names."""

    num_frames: int = world.NUM_FRAMES
    size: int = world.SIZE
    channels: tuple[int, ...] = (32, 64, 64, 64)  # conv stages; 2x max-pool between stages
    feature_dim: int = 64
    colours: tuple[str, ...] = field(default_factory=lambda: tuple(world.COLOURS))
    shapes: tuple[str, ...] = world.SHAPES
    directions: tuple[str, ...] = field(default_factory=lambda: tuple(world.DIRECTIONS))

    def __post_init__(self) -> None:
        for name in ("channels", "colours", "shapes", "directions"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("num_frames", "size", "feature_dim"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not self.channels or not all(isinstance(c, int) and c > 0 for c in self.channels):
            raise ConfigError(f"channels must be a non-empty list of positive integers, got {list(self.channels)}")

    def labels(self, attribute: str) -> tuple[str, ...]:
        """Class names of one attribute ("colour", "shape" or "direction"), in logit order."""
        return {"colour": self.colours, "shape": self.shapes, "direction": self.directions}[attribute]


class Evaluator(nn.Module):
    """Classifies colour, shape and direction of shapes-world clips.

    Input: uint8 videos `(B, T, H, W, 3)` or float videos `(B, 3, T, H, W)` in [-1, 1].
    The T frames and T - 1 frame differences become the 3 (2T - 1) channels of a 2D CNN.
    """

    def __init__(self, config: EvaluatorConfig | None = None):
        super().__init__()
        self.config = c = config or EvaluatorConfig()
        layers: list[nn.Module] = []
        width = 3 * (2 * c.num_frames - 1)
        for i, out in enumerate(c.channels):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU()]
            width = out
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(width, c.feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(c.feature_dim, len(c.labels(a))) for a in ATTRIBUTES})
        self.report: dict = {}  # report.json of a loaded evaluator

    def _video(self, videos: torch.Tensor) -> torch.Tensor:
        """Either input form -> float `(B, 3, T, H, W)` in [-1, 1], shape-checked."""
        c = self.config
        if videos.dtype == torch.uint8:
            if videos.ndim != 5 or videos.shape[-1] != 3:
                raise ValueError(f"uint8 videos must be (B, T, H, W, 3), got {tuple(videos.shape)}")
            videos = uint8_to_video(videos)
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"float videos must be (B, 3, T, H, W), got {tuple(videos.shape)}")
        if tuple(videos.shape[2:]) != (c.num_frames, c.size, c.size):
            raise ValueError(f"the evaluator reads {c.num_frames} frames of {c.size}x{c.size}, got "
                             f"{videos.shape[2]} frames of {videos.shape[3]}x{videos.shape[4]}")
        return videos.float()

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim): the penultimate layer, the space of the Fréchet distance."""
        video = self._video(videos)  # (B, 3, T, H, W)
        diffs = video[:, :, 1:] - video[:, :, :-1]  # (B, 3, T - 1, H, W)
        x = torch.cat([video, diffs], dim=2).flatten(1, 2)  # (B, 3 (2T - 1), H, W)
        return self.trunk(x)

    def forward(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute: {"colour": (B, 5), "shape": (B, 3), "direction": (B, 4)}."""
        f = self.features(videos)
        return {a: head(f) for a, head in self.heads.items()}


def _as_uint8(videos) -> torch.Tensor:
    """numpy or torch uint8 `(N, T, H, W, 3)` -> torch uint8, checked."""
    v = torch.from_numpy(np.ascontiguousarray(videos)) if isinstance(videos, np.ndarray) else videos
    if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8 or v.ndim != 5 or v.shape[-1] != 3:
        what = f"{v.dtype} {tuple(v.shape)}" if hasattr(v, "shape") else type(v).__name__
        raise ValueError(f"expected uint8 videos (N, T, H, W, 3), got {what}")
    return v.cpu()


@torch.no_grad()
def _read(evaluator: Evaluator, videos, batch_size: int = 256) -> tuple[np.ndarray, dict[str, list[str]]]:
    """One pass over uint8 videos (N, T, H, W, 3): features (N, feature_dim) float64 and
    the label read for each attribute."""
    v = _as_uint8(videos)
    device = next(evaluator.parameters()).device
    feats = torch.cat([evaluator.eval().features(v[i:i + batch_size].to(device)).cpu()
                       for i in range(0, len(v), batch_size)])
    labels = {a: [evaluator.config.labels(a)[i] for i in head(feats).argmax(-1).tolist()]
              for a, head in evaluator.heads.items()}
    return feats.double().numpy(), labels


def features(evaluator: Evaluator, videos) -> np.ndarray:
    """(N, feature_dim) float64 evaluator features of uint8 videos (N, T, H, W, 3)."""
    return _read(evaluator, videos)[0]


def classify(evaluator: Evaluator, videos) -> dict[str, list[str]]:
    """The evaluator's reading of each video: {"colour": [...], "shape": [...], "direction": [...]}."""
    return _read(evaluator, videos)[1]


# ---- training ---------------------------------------------------------------------------

def _augment(video: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light per-clip corruption of float videos (B, 3, T, H, W): colour gain within
    +-10%, a random amount of 5x5 binomial blur, gaussian noise of std up to 0.1."""
    B, C, T, H, W = video.shape

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    gain = 1 + 0.2 * (u(B, C, 1, 1, 1) - 0.5)
    video = (video + 1) * gain - 1
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16  # binomial, std 1 px
    flat = F.pad(video.reshape(B * C * T, 1, H, W), (2, 2, 2, 2), mode="replicate")
    blurred = F.conv2d(flat, (kernel[:, None] * kernel[None, :])[None, None]).reshape(B, C, T, H, W)
    video = torch.lerp(video, blurred, u(B, 1, 1, 1, 1))
    video = video + 0.1 * u(B, 1, 1, 1, 1) * torch.randn(video.shape, generator=gen)
    return video.clamp(-1, 1)


def _labels(clips: Sequence[world.Clip], config: EvaluatorConfig) -> dict[str, torch.Tensor]:
    return {a: torch.tensor([config.labels(a).index(getattr(c, a)) for c in clips]) for a in ATTRIBUTES}


def train_evaluator(steps: int = 700, batch_size: int = 64, seed: int = TRAIN_SEED, lr: float = 3e-3,
                    heldout: int = 2000, heldout_seed: int = HELDOUT_SEED, config: EvaluatorConfig | None = None,
                    progress: bool = True) -> tuple[Evaluator, dict]:
    """Trains an evaluator on fresh batches of world stream `seed` (batch i = step i),
    then measures its accuracy on `heldout` clips of stream `heldout_seed`.

    Returns (evaluator in eval mode, report); the report holds the held-out accuracies
    (`adherence` = all three attributes right), the recipe, seeds and seconds.
    """
    from tqdm.auto import tqdm

    if seed == heldout_seed:
        raise ValueError("the held-out clips must come from another seed than the training batches")
    torch.manual_seed(seed)
    model = Evaluator(config).train()
    c = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    bar = tqdm(range(steps), desc="evaluator", unit="step", disable=not progress)
    for step in bar:
        videos, _, clips = world.batch(seed, step, batch_size, c.size, c.num_frames)
        x = _augment(uint8_to_video(torch.from_numpy(videos)), gen)  # (B, 3, T, H, W)
        logits, labels = model(x), _labels(clips, c)
        loss = sum(F.cross_entropy(logits[a], labels[a]) for a in ATTRIBUTES)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup=min(50, steps // 10 + 1), floor=0.02)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    train_seconds = time.time() - t0
    model.eval()
    videos, prompts, _ = world.batch(heldout_seed, 0, heldout, c.size, c.num_frames)
    report = {
        "heldout_accuracy": prompt_adherence(model, videos, prompts),
        "heldout_clips": heldout,
        "heldout_seed": heldout_seed,
        "train_seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "augmentation": "colour gain +-10%, 5x5 binomial blur of random strength, gaussian noise std <= 0.1 (in [-1, 1])",
        "train_seconds": round(train_seconds, 1),
        "final_loss": round(loss.item(), 5),
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
    }
    return model, report


# ---- save / load ------------------------------------------------------------------------

def save_evaluator(model: Evaluator, report: dict, dir: str | Path = DEFAULT_DIR) -> Path:
    """Writes `model.safetensors`, `config.json` and `report.json` to `dir`, each atomically."""
    dir = Path(dir)
    atomic_save_safetensors(dir / "model.safetensors", model.state_dict(), metadata={"format": "pt"})
    model.config.to_json(dir / "config.json")
    atomic_write_text(dir / "report.json", json.dumps(report, indent=2) + "\n")
    return dir


def load_evaluator(dir: str | Path | None = None) -> Evaluator:
    """Loads and validates an evaluator directory (default: the shipped one), in eval mode.

    Errors (`BundleError`) name the file and the key: a missing file, a malformed config,
    missing / unexpected tensors, wrong shapes, labels that differ from the world's.
    """
    dir = Path(dir) if dir is not None else DEFAULT_DIR
    if not dir.is_dir():
        raise BundleError(f"{dir}: evaluator directory does not exist (train one: python -m distill train-evaluator)")
    for name in EVALUATOR_FILES:
        if not (dir / name).is_file():
            raise BundleError(f"{dir}/{name}: missing (an evaluator holds {', '.join(EVALUATOR_FILES)})")
    try:
        config = EvaluatorConfig.from_json(dir / "config.json")
    except ConfigError as e:
        raise BundleError(str(e)) from None
    expected = EvaluatorConfig()
    for a in ATTRIBUTES:
        if config.labels(a) != expected.labels(a):
            raise BundleError(f"{dir}/config.json: {a} labels {list(config.labels(a))} differ from the world's "
                              f"{list(expected.labels(a))}; retrain it (python -m distill train-evaluator)")
    report = read_json_object(dir / "report.json")
    where = f"{dir}/model.safetensors"
    state = load_safetensors(dir / "model.safetensors", where)
    model = Evaluator(config)
    check_state_dict(state, {k: v.shape for k, v in model.state_dict().items()}, where, "config.json")
    model.load_state_dict(state)
    model.report = report
    return model.eval().requires_grad_(False)


# ---- metrics ------------------------------------------------------------------------------

def _parse_all(prompts: Sequence[str]) -> list[tuple[str, str, str]]:
    parsed = [world.parse_prompt(p) for p in prompts]
    bad = [p for p, q in zip(prompts, parsed) if q is None]
    if bad:
        raise ValueError(f"prompt {bad[0]!r} does not name one colour, shape and direction of the shapes world")
    return parsed


def real_videos(prompts: Sequence[str], seed: int, size: int = world.SIZE,
                num_frames: int = world.NUM_FRAMES) -> np.ndarray:
    """World clips for `prompts` (random size and start, drawn from `seed`): uint8 (N, T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    clips = [world.sample_clip(rng, size, num_frames, colour=c, shape=s, direction=d) for c, s, d in _parse_all(prompts)]
    return np.stack([world.render(c, size, num_frames) for c in clips])


def _adherence(read: dict[str, list[str]], prompts: Sequence[str]) -> dict[str, float]:
    wanted = _parse_all(prompts)
    if len(wanted) != len(read["colour"]):
        raise ValueError(f"{len(read['colour'])} videos but {len(wanted)} prompts")
    hits = np.array([[read[a][i] == w[j] for j, a in enumerate(ATTRIBUTES)] for i, w in enumerate(wanted)])  # (N, 3)
    return {"adherence": float(hits.all(1).mean()), **{a: float(hits[:, j].mean()) for j, a in enumerate(ATTRIBUTES)}}


def prompt_adherence(evaluator: Evaluator, videos, prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of videos whose colour, shape and direction all read as the prompt says
    (`adherence`), and of each attribute alone (`colour`, `shape`, `direction`)."""
    return _adherence(classify(evaluator, videos), prompts)


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
    v = _as_uint8(videos).numpy()
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
    v = _as_uint8(videos)
    centres = centroids(v, threshold)  # (N, T, 2)
    s = _speeds(centres)
    true = world.true_speed(v.shape[3])
    return {"mean_speed": float(s.mean()), "true_speed": true, "ratio": float(s.mean() / true),
            "static_fraction": float((s < static * true).mean()),
            "blank_frames": float(np.isnan(centres[..., 0]).mean())}


def evaluate_videos(videos, prompts: Sequence[str], evaluator: Evaluator | None = None,
                    real_seed: int = 12345) -> dict:
    """All metrics of a video set (uint8 (N, T, H, W, 3)) generated for `prompts`.

    The Fréchet distance `fd` compares the videos' evaluator features with those of N
    real world clips for the same prompts (drawn from `real_seed`); `fd_real_vs_real` is
    its floor at this N: that real set against another (`real_seed + 1`).
    """
    evaluator = evaluator or load_evaluator()
    v = _as_uint8(videos)
    c = evaluator.config
    real_a, real_b = (real_videos(prompts, real_seed + k, c.size, c.num_frames) for k in (0, 1))
    feats, read = _read(evaluator, v)
    fa, fb = features(evaluator, real_a), features(evaluator, real_b)
    return {
        "videos": len(v),
        "prompt_adherence": _adherence(read, prompts),
        "motion": motion(v),
        "fd": frechet_distance(feats, fa),
        "fd_real_vs_real": frechet_distance(fb, fa),
    }


def _sampler_default(pipe, name: str):
    """`pipe.config.sampler.<name>`, or None for a pipeline-like object without one."""
    return getattr(getattr(getattr(pipe, "config", None), "sampler", None), name, None)


def evaluate_bundle(model, samples: int = 60, seeds: Sequence[int] = (0,), batch_size: int = 20,
                    steps: int | None = None, progress: bool = True, evaluator: Evaluator | None = None,
                    device=None, dtype=None, **generate_kwargs) -> dict:
    """Generates `samples` videos per base seed with a bundle and evaluates them all together.

    `model`: a bundle path, a shipped model's name, or a loaded `Pipeline` (any callable
    `pipe(prompts, seed=, progress=, steps=, **kw) -> uint8 (B, T, H, W, 3)`).
    Sample i (0 <= i < samples) of a base seed uses prompt `PROMPTS[i % 60]`; the samples
    of a seed are generated in consecutive batches of `batch_size`, batch k with seed
    `s * 10000 + k` (one call draws all its noise from its seed, so the videos also depend
    on `batch_size`, which the result records). `device` / `dtype` are passed to
    `flgengine.load`; `generate_kwargs` go to every call (guidance, force, ...).
    """
    from tqdm.auto import tqdm

    if samples < 2 or batch_size < 1:
        raise ValueError(f"need samples >= 2 and batch_size >= 1, got {samples} and {batch_size}")
    batches = math.ceil(samples / batch_size)
    if batches > BATCH_SEED_STRIDE:
        raise ValueError(f"{batches} batches per seed is more than {BATCH_SEED_STRIDE}; raise batch_size")
    pipe = flgengine.load(model, device=device, dtype=dtype) if isinstance(model, (str, Path)) else model
    prompts = [world.PROMPTS[i % len(world.PROMPTS)] for i in range(samples)]
    videos, all_prompts = [], []
    bar = tqdm(total=samples * len(seeds), desc="generating", unit="video", disable=not progress)
    t0 = time.time()
    for s in seeds:
        for k in range(batches):
            chunk = prompts[k * batch_size:(k + 1) * batch_size]
            videos.append(_as_uint8(pipe(chunk, seed=s * BATCH_SEED_STRIDE + k, progress=False, steps=steps,
                                         **generate_kwargs)))
            all_prompts += chunk
            bar.update(len(chunk))
    seconds = time.time() - t0
    bar.close()
    guidance = generate_kwargs.get("guidance")
    boundary = getattr(getattr(pipe, "config", None), "low_noise_boundary", None)
    experts = {} if boundary is None else {  # a two-expert model's split and the CFG scale below it
        "low_noise_boundary": boundary,
        "low_noise_guidance": _sampler_default(pipe, "low_noise_guidance") if guidance is None else guidance}
    return {
        "model": str(getattr(pipe, "path", None) or type(pipe).__name__),
        "samples": samples,
        "seeds": list(seeds),
        "batch_size": batch_size,
        "steps": steps if steps is not None else _sampler_default(pipe, "num_steps"),
        "guidance": guidance if guidance is not None else _sampler_default(pipe, "guidance"),
        **experts,
        "seconds_per_video": seconds / len(all_prompts),
        "device": str(getattr(pipe, "device", "")), "dtype": str(getattr(pipe, "dtype", "")).replace("torch.", ""),
        **evaluate_videos(torch.cat(videos), all_prompts, evaluator),
    }


# ---- command line ---------------------------------------------------------------------------

def format_table(result: dict) -> str:
    """A readable summary of `evaluate_bundle`'s result."""
    a, m = result["prompt_adherence"], result["motion"]
    rows = [
        ("model", result["model"]),
        ("videos", f"{result['videos']} ({result['samples']} x seeds {result['seeds']}, batch {result['batch_size']})"),
        ("sampling", f"{result['steps']} steps, guidance {result['guidance']}, "
                     f"{result['seconds_per_video']:.3f} s/video on {result.get('device', '?')} {result.get('dtype', '')}"),
        ("adherence", f"{a['adherence']:.3f}  (colour {a['colour']:.3f}, shape {a['shape']:.3f}, "
                      f"direction {a['direction']:.3f})"),
        ("motion", f"{m['ratio']:.3f} x true speed ({m['mean_speed']:.3f} / {m['true_speed']:.3f} px/frame), "
                   f"static {m['static_fraction']:.1%}, blank frames {m['blank_frames']:.1%}"),
        ("FD", f"{result['fd']:.3f}  (real vs real floor {result['fd_real_vs_real']:.3f})"),
    ]
    return "\n".join(f"{k:<10} {v}" for k, v in rows)


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory or shipped model name")
    p.add_argument("--samples", type=int, default=60, help="videos per seed, cycling the 60 prompts (default 60)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="base seeds (default 0)")
    p.add_argument("--batch-size", type=int, default=20, help="videos per generation call (default 20)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the bundle's)")
    p.add_argument("--force", action="store_true", help="let a distilled student run other steps / CFG")
    p.add_argument("--evaluator", default=None, help="evaluator directory (default: the shipped one)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--write-provenance", action="store_true",
                   help="store the result in the bundle's provenance.json under 'evaluation'")


def set_threads(threads: int | None) -> None:
    """`--threads`: torch's CPU thread count (checked before any work)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def run_evaluate(args) -> int:
    from flgengine.pipeline import resolve_model

    set_threads(args.threads)
    path = resolve_model(args.bundle)
    result = evaluate_bundle(path, samples=args.samples, seeds=args.seeds, batch_size=args.batch_size,
                             steps=args.steps, progress=not args.quiet, evaluator=load_evaluator(args.evaluator),
                             device=args.device, dtype=args.dtype, guidance=args.guidance, force=args.force)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    if args.write_provenance:
        prov_file = path / "provenance.json"
        provenance = read_json_object(prov_file)
        provenance["evaluation"] = result
        atomic_write_text(prov_file, json.dumps(provenance, indent=2) + "\n")
    return 0


def add_train_evaluator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=700, help="training steps (default 700)")
    p.add_argument("--batch-size", type=int, default=64, help="clips per step (default 64)")
    p.add_argument("--out", default=str(DEFAULT_DIR), help=f"where to write it (default {DEFAULT_DIR})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--quiet", action="store_true")


def run_train_evaluator(args) -> int:
    set_threads(args.threads)
    model, report = train_evaluator(steps=args.steps, batch_size=args.batch_size, progress=not args.quiet)
    save_evaluator(model, report, args.out)
    print(json.dumps(report, indent=2))
    return 0
