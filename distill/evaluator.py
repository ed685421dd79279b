"""The shapes-world evaluator: a small CNN that reads the colour, shape and direction of a clip.

    python -m distill train-evaluator [--steps N] [--out DIR]        # ships distill/assets/shapes-evaluator

All frames and their differences are stacked as channels of one 2D image, so direction is
a local pattern (leading edge brighter, trailing edge darker). Its penultimate layer is the
feature space of the Fréchet distance (`metrics.py`). `prompt_adherence` is how often it
reads back what the prompt asked for.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flgengine.bundle import (BundleError, atomic_save_safetensors, atomic_write_text, check_state_dict,
                              load_safetensors, read_json_object)
from flgengine.codec import uint8_to_video
from flgengine.config import ConfigError, JsonConfig

from .trainer import cosine_lr
from .worlds import shapes as world

__all__ = [
    "DEFAULT_DIR",
    "ATTRIBUTES",
    "EvaluatorConfig",
    "Evaluator",
    "as_uint8",
    "read_videos",
    "features",
    "classify",
    "adherence",
    "prompt_adherence",
    "train_evaluator",
    "save_evaluator",
    "load_evaluator",
]

DEFAULT_DIR = Path(__file__).parent / "assets" / "shapes-evaluator"
EVALUATOR_FILES = ("config.json", "model.safetensors", "report.json")
ATTRIBUTES = ("colour", "shape", "direction")
TRAIN_SEED = 1000  # world stream of the training batches
HELDOUT_SEED = 2000  # world stream of the held-out accuracy clips


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


def as_uint8(videos) -> torch.Tensor:
    """numpy or torch uint8 `(N, T, H, W, 3)` -> torch uint8, checked."""
    v = torch.from_numpy(np.ascontiguousarray(videos)) if isinstance(videos, np.ndarray) else videos
    if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8 or v.ndim != 5 or v.shape[-1] != 3:
        what = f"{v.dtype} {tuple(v.shape)}" if hasattr(v, "shape") else type(v).__name__
        raise ValueError(f"expected uint8 videos (N, T, H, W, 3), got {what}")
    return v.cpu()


@torch.no_grad()
def read_videos(evaluator: Evaluator, videos, batch_size: int = 256) -> tuple[np.ndarray, dict[str, list[str]]]:
    """One pass over uint8 videos (N, T, H, W, 3): features (N, feature_dim) float64 and
    the label read for each attribute."""
    v = as_uint8(videos)
    device = next(evaluator.parameters()).device
    feats = torch.cat([evaluator.eval().features(v[i:i + batch_size].to(device)).cpu()
                       for i in range(0, len(v), batch_size)])
    labels = {a: [evaluator.config.labels(a)[i] for i in head(feats).argmax(-1).tolist()]
              for a, head in evaluator.heads.items()}
    return feats.double().numpy(), labels


def features(evaluator: Evaluator, videos) -> np.ndarray:
    """(N, feature_dim) float64 evaluator features of uint8 videos (N, T, H, W, 3)."""
    return read_videos(evaluator, videos)[0]


def classify(evaluator: Evaluator, videos) -> dict[str, list[str]]:
    """The evaluator's reading of each video: {"colour": [...], "shape": [...], "direction": [...]}."""
    return read_videos(evaluator, videos)[1]


def parse_prompts(prompts: Sequence[str]) -> list[tuple[str, str, str]]:
    """(colour, shape, direction) of each prompt; ValueError for one outside the world's grammar."""
    parsed = [world.parse_prompt(p) for p in prompts]
    bad = [p for p, q in zip(prompts, parsed) if q is None]
    if bad:
        raise ValueError(f"prompt {bad[0]!r} does not name one colour, shape and direction of the shapes world")
    return parsed


def adherence(read: dict[str, list[str]], prompts: Sequence[str]) -> dict[str, float]:
    """`prompt_adherence` of labels already read (`classify`)."""
    wanted = parse_prompts(prompts)
    if len(wanted) != len(read["colour"]):
        raise ValueError(f"{len(read['colour'])} videos but {len(wanted)} prompts")
    hits = np.array([[read[a][i] == w[j] for j, a in enumerate(ATTRIBUTES)] for i, w in enumerate(wanted)])  # (N, 3)
    return {"adherence": float(hits.all(1).mean()), **{a: float(hits[:, j].mean()) for j, a in enumerate(ATTRIBUTES)}}


def prompt_adherence(evaluator: Evaluator, videos, prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of videos whose colour, shape and direction all read as the prompt says
    (`adherence`), and of each attribute alone (`colour`, `shape`, `direction`)."""
    return adherence(classify(evaluator, videos), prompts)


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
