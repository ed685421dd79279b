"""The shapes world: one filled shape on black, moving in a straight line at constant speed.

Spec (issue "The shapes world"):
- shapes circle / square / triangle; colours red, green, blue, yellow, white (RGB below);
  directions left / right / up / down; prompt `a {colour} {shape} moving {direction}`
  (60 prompts). Size and start position are random, not named by the prompt.
- the shape spans a quarter to two fifths of the frame side and moves one thirtieth
  of the side per frame; it stays wholly inside the frame on every frame.
- frames are rendered with 4x4 supersampling (anti-aliased edges, sub-pixel motion).

`stream(seed)` yields `(video uint8 (T, H, W, 3), prompt)` forever, deterministic per
seed; `batch(seed, index, n)` gives the index-th batch of a seeded stream directly,
so a training run can resume mid-stream from a step counter alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 40),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy)

NUM_FRAMES = 9
SIZE = 32
SPEED_FRACTION = 1 / 30  # of the frame side, per frame
SIZE_RANGE = (0.25, 0.40)  # shape extent, fraction of the frame side
SUPERSAMPLE = 4


def prompt_of(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


PROMPTS: tuple[str, ...] = tuple(prompt_of(c, s, d) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS))
VOCAB: tuple[str, ...] = tuple(dict.fromkeys(w for p in PROMPTS for w in p.split()))


def parse_prompt(prompt: str) -> tuple[str, str, str] | None:
    """(colour, shape, direction) named by a prompt of the world's grammar, else None."""
    words = prompt.lower().split()
    c = [w for w in words if w in COLOURS]
    s = [w for w in words if w in SHAPES]
    d = [w for w in words if w in DIRECTIONS]
    return (c[0], s[0], d[0]) if len(c) == len(s) == len(d) == 1 else None


@dataclass(frozen=True)
class Clip:
    """The latent facts of one clip: what the prompt names plus size and path."""

    colour: str
    shape: str
    direction: str
    extent: float  # shape width = height, pixels
    x0: float  # centre at frame 0, pixels
    y0: float
    speed: float  # pixels per frame

    @property
    def prompt(self) -> str:
        return prompt_of(self.colour, self.shape, self.direction)

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        return self.x0 + dx * self.speed * frame, self.y0 + dy * self.speed * frame


def true_speed(size: int = SIZE) -> float:
    """Pixels per frame every clip moves at."""
    return size * SPEED_FRACTION


def sample_clip(rng: np.random.Generator, size: int = SIZE, num_frames: int = NUM_FRAMES,
                colour: str | None = None, shape: str | None = None, direction: str | None = None) -> Clip:
    """Draws a clip: attributes uniformly (unless given), size and start uniformly among
    those that keep the shape inside the frame for all `num_frames` frames."""
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    direction = direction or list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    extent = rng.uniform(*SIZE_RANGE) * size
    speed = true_speed(size)
    travel = speed * (num_frames - 1)
    half = extent / 2
    dx, dy = DIRECTIONS[direction]

    def start(d: int) -> float:  # centre range along one axis: inside at the first and last frame
        lo, hi = half, size - half
        if d > 0:
            hi -= travel
        elif d < 0:
            lo += travel
        return rng.uniform(lo, hi)

    return Clip(colour, shape, direction, extent, start(dx), start(dy), speed)


def _coverage(clip: Clip, frame: int, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (size, size) float32 in [0, 1]."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE  # sub-pixel centres, pixels
    y, x = coords[:, None], coords[None, :]
    cx, cy = clip.centre(frame)
    h = clip.extent / 2
    if clip.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif clip.shape == "square":
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    else:  # triangle, apex up: width grows from 0 at the top to the full extent at the base
        top = cy - h
        inside = (y >= top) & (y <= cy + h) & (np.abs(x - cx) <= (y - top) / 2)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def render(clip: Clip, size: int = SIZE, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """(T, H, W, 3) uint8 video of `clip`."""
    colour = np.array(COLOURS[clip.colour], dtype=np.float32)
    frames = [_coverage(clip, f, size)[..., None] * colour for f in range(num_frames)]
    return np.rint(np.stack(frames)).astype(np.uint8)


def check_frames(num_frames: int) -> None:
    if not isinstance(num_frames, int) or num_frames < 5 or (num_frames - 1) % 4:
        raise ValueError(f"the shapes world renders 4k+1 frames with k >= 1 (5, 9, 17, ...), got {num_frames!r}")


def stream(seed: int, size: int = SIZE, num_frames: int = NUM_FRAMES) -> Iterator[tuple[np.ndarray, str]]:
    """Yields (video uint8 (T, H, W, 3), prompt) forever; the same seed gives the same clips."""
    check_frames(num_frames)
    rng = np.random.default_rng(seed)
    while True:
        clip = sample_clip(rng, size, num_frames)
        yield render(clip, size, num_frames), clip.prompt


def batch(seed: int, index: int, n: int, size: int = SIZE, num_frames: int = NUM_FRAMES) -> tuple[np.ndarray, list[str], list[Clip]]:
    """The `index`-th batch of `n` clips of stream `seed`: (videos (n, T, H, W, 3) uint8,
    prompts, clips). Random access: batch i does not depend on batches before it."""
    check_frames(num_frames)
    rng = np.random.default_rng([seed, index])
    clips = [sample_clip(rng, size, num_frames) for _ in range(n)]
    return np.stack([render(c, size, num_frames) for c in clips]), [c.prompt for c in clips], clips
