"""Stage I of FastLightGen: how much each DiT block matters.

For every block b the model runs with b bypassed (its output = its input) on calibration
clips at several noise levels t, and the Tweedie estimate of the clean clip is compared
with the clip itself:

    x_t = (1 - t) x0 + t eps,   x0_hat = x_t - t * v(x_t, 1000 t, c)     (flow matching, v = eps - x0)
    I_b = E ||x0 - x0_hat(skip b)||^2 - E ||x0 - x0_hat(full)||^2

E is the mean over clips, t values and elements. One noise tensor eps (one draw per clip,
from a seeded generator) serves every block and every t, so the differences between
blocks are not noise. Small I_b = redundant block; expect a U shape over depth.

    x0, context = calibration_set(pipe, n=32, seed=1234)
    result = block_importance(pipe.dit, x0, context, sigma_grid(12))
    save_importance(result, "importance.json", "importance.png")
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from flgengine.bundle import atomic_replace, atomic_write_text
from flgengine.codec import uint8_to_video
from flgengine.model import DiT, main_expert

from .data import conditioned
from .worlds import shapes

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "sigma_grid",
    "draw_noise",
    "skip_blocks",
    "block_importance",
    "calibration_set",
    "save_importance",
    "load_importance",
    "render_importance",
]

NUM_TRAIN_TIMESTEPS = 1000  # the model is called at timestep 1000 * t (distill/teacher.py)


def sigma_grid(n: int = 12) -> list[float]:
    """`n` evenly spaced noise levels strictly inside (0, 1): the midpoints (i + 0.5) / n."""
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"sigma_grid needs n >= 1, got {n!r}")
    return [(i + 0.5) / n for i in range(n)]


def draw_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The calibration noise eps: one standard normal draw of `shape` (fp32, CPU) from a
    generator seeded with `seed`. `block_importance` uses exactly this tensor."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def skip_blocks(model: DiT, positions: Iterable[int]):
    """Runs `model` with the blocks at `positions` (indices into `model.blocks`) bypassed.

    The weights are not touched: the blocks of the DiT that pruning acts on (`main_expert`:
    a two-expert model's high-noise one) are swapped for a ModuleList without those blocks
    and restored on exit, also when the body raises.
    """
    net = main_expert(model)
    skip = set(positions)
    n = len(net.blocks)
    bad = sorted(p for p in skip if not (isinstance(p, int) and 0 <= p < n))
    if bad:
        raise ValueError(f"skip_blocks: block positions must be in [0, {n}), got {bad}")
    original = net.blocks
    net.blocks = nn.ModuleList(block for i, block in enumerate(original) if i not in skip)
    try:
        yield model
    finally:
        net.blocks = original


def _check_calibration(model: DiT, x0: torch.Tensor, context: torch.Tensor, ts: Sequence[float], batch_size: int) -> None:
    c = model.config
    if x0.dim() != 5 or x0.shape[1] != c.out_channels:  # (an image "concat" DiT reads more channels)
        raise ValueError(f"x0 must be (N, {c.out_channels}, F, H, W), got {tuple(x0.shape)}")
    if context.dim() != 3 or context.shape[0] != x0.shape[0] or context.shape[2] != c.text_dim:
        raise ValueError(f"context must be ({x0.shape[0]}, L, {c.text_dim}), got {tuple(context.shape)}")
    if not ts or not all(0.0 < float(t) < 1.0 for t in ts):
        raise ValueError(f"ts must be a non-empty list of noise levels in (0, 1), got {list(ts)}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


@torch.no_grad()
def block_importance(model: DiT, x0: torch.Tensor, context: torch.Tensor, ts: Sequence[float], seed: int = 0,
                     batch_size: int = 16, progress: bool = True, cond: torch.Tensor | None = None) -> dict:
    """Importance of every block of `model` (Stage I).

    x0: (N, C, F, H, W) clean latents; context: (N, L, text_dim) their prompt embeddings;
    ts: noise levels in (0, 1); cond: the image condition of the N clips for an image-to-video
    model (distill.data.condition_of), else None. The N * len(ts) noisy inputs run `batch_size` at a time,
    once with all blocks and once per bypassed block, on the noise `draw_noise(x0.shape, seed)`.

    Returns a json-ready dict:
        importance   {teacher block index: I_b}, keyed by `model.config.kept_blocks[b]`
        full_error   E ||x0 - x0_hat(full)||^2
        per_t        [{"t", "full_error", "importance": {teacher index: I_b at that t}}], one per t
        settings     ts, seed, batch_size, num_samples, sample_shape, kept_blocks, ...
    The overall values are the means of the per-t ones (every t sees the same N clips).
    """
    from tqdm.auto import tqdm

    _check_calibration(model, x0, context, ts, batch_size)
    param = model.patch_embed.weight
    device, dtype = param.device, param.dtype
    N, B, T = x0.shape[0], len(model.blocks), len(ts)

    # 1. one noise draw for every block and every t; x0 and eps stay fp32
    x0 = x0.to(device=device, dtype=torch.float32)  # (N, C, F, H, W)
    eps = draw_noise(x0.shape, seed).to(device)  # (N, C, F, H, W)
    context = context.to(device=device, dtype=dtype)  # (N, L, text_dim)
    sigmas = torch.tensor([float(t) for t in ts], device=device)  # (T,)

    # 2. squared error summed over clips: row 0 the full model, row 1 + b block b bypassed
    sq_err = torch.zeros(B + 1, T, dtype=torch.float64, device=device)
    items = N * T  # item j is clip j % N at noise level ts[j // N]
    chunks = [(start, min(start + batch_size, items)) for start in range(0, items, batch_size)]
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(chunks) * (B + 1), desc="block importance", unit="pass", disable=not progress)
    try:
        for start, end in chunks:
            j = torch.arange(start, end, device=device)
            n, k = j % N, j // N  # clip and noise level of each item, (b,)
            t = sigmas[k].view(-1, 1, 1, 1, 1)  # (b, 1, 1, 1, 1)
            x_t = (1 - t) * x0[n] + t * eps[n]  # (b, C, F, H, W)
            for row, skip in enumerate([()] + [(b,) for b in range(B)]):
                with skip_blocks(model, skip):
                    run = conditioned(model, None if cond is None else cond.map(lambda z: z[n].to(device)))
                    v = run(x_t.to(dtype), sigmas[k] * NUM_TRAIN_TIMESTEPS, context[n]).float()
                x0_hat = x_t - t * v  # Tweedie for flow matching
                err = (x0[n] - x0_hat).pow(2).flatten(1).mean(1)  # (b,)
                sq_err[row].index_add_(0, k, err.double())
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)

    # 3. means over clips (per t), then over t; importance = error increase over the full model
    per_t_err = (sq_err / N).cpu()  # (B + 1, T)
    mean_err = per_t_err.mean(dim=1)  # (B + 1,)
    teacher_ids = model.config.kept_blocks
    per_t = [{"t": float(ts[i]), "full_error": per_t_err[0, i].item(),
              "importance": {tb: (per_t_err[1 + b, i] - per_t_err[0, i]).item() for b, tb in enumerate(teacher_ids)}}
             for i in range(T)]
    return {
        "importance": {tb: (mean_err[1 + b] - mean_err[0]).item() for b, tb in enumerate(teacher_ids)},
        "full_error": mean_err[0].item(),
        "per_t": per_t,
        "settings": {
            "ts": [float(t) for t in ts],
            "seed": seed,
            "batch_size": batch_size,
            "num_samples": N,
            "sample_shape": list(x0.shape[1:]),
            "kept_blocks": teacher_ids,
            "num_layers": model.config.num_blocks,
            "protected": list(model.config.protected_blocks),
            "timestep_scale": NUM_TRAIN_TIMESTEPS,
            "dtype": str(dtype).removeprefix("torch."),
            "noise": "one eps per clip (draw_noise(x0.shape, seed)), shared by every block and every t",
        },
    }


def calibration_set(pipe_or_text_encoder, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` real shapes-world clips and their prompt embeddings, for `block_importance`.

    `pipe_or_text_encoder`: a loaded Pipeline (its `.text_encoder` is used) or a text
    encoder with `.encode(prompts)`. The clips are `shapes.batch(seed, 0, n)`; the shapes
    teacher's latents are its frames (pixel codec), so x0 = the frames in [-1, 1]. The
    teacher trains on `shapes.batch(0, step, ...)`: a seed other than 0 gives unseen clips.

    Returns x0 (n, 3, T, H, W) float32 in [-1, 1] and context (n, L, text_dim).
    """
    encoder = getattr(pipe_or_text_encoder, "text_encoder", pipe_or_text_encoder)
    if encoder is None or not hasattr(encoder, "encode"):
        raise ValueError("calibration_set needs a pipeline with a text encoder, or a text encoder")
    videos, prompts, _ = shapes.batch(seed, 0, n)  # (n, T, H, W, 3) uint8
    x0 = uint8_to_video(torch.from_numpy(videos))  # (n, 3, T, H, W)
    return x0, encoder.encode(prompts)


# ---- saving ------------------------------------------------------------------------------

def save_importance(result: dict, path_json: str | Path, path_png: str | Path | None = None) -> None:
    """Writes `result` of `block_importance` as json and, optionally, its bar chart as PNG
    (both atomically). Json object keys are strings; `load_importance` turns them back."""
    atomic_write_text(Path(path_json), json.dumps(result, indent=2) + "\n")
    if path_png is not None:
        save_importance_png(result, path_png)


def save_importance_png(result: dict, path: str | Path, drop: list[int] | None = None) -> None:
    """The bar chart of `render_importance` as a PNG (atomically)."""
    import imageio.v3 as iio

    png = iio.imwrite("<bytes>", render_importance(result, drop), extension=".png")
    atomic_replace(Path(path), lambda tmp: Path(tmp).write_bytes(png))


def load_importance(path: str | Path) -> dict:
    """Reads a `save_importance` json; block indices come back as int keys."""
    result = json.loads(Path(path).read_text())
    result["importance"] = {int(b): v for b, v in result["importance"].items()}
    for row in result["per_t"]:
        row["importance"] = {int(b): v for b, v in row["importance"].items()}
    return result


_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 640, 380, 70, 20, 64, 58  # canvas and plot margins (px)
_WHITE, _INK, _GRID = (255, 255, 255), (40, 40, 40), (225, 225, 225)
_BLUE, _ORANGE, _GREY = (66, 114, 196), (230, 120, 40), (190, 190, 190)  # kept; first/last; dropped


def render_importance(result: dict, drop: list[int] | None = None) -> np.ndarray:
    """Bar chart of importance over depth, (H, W, 3) uint8.

    One bar per block in depth order (x: the teacher's block index); the first and last
    blocks (never pruned) are orange, the others blue, and with `drop` (a plan's dropped
    blocks) those are grey. Bars grow up from the zero line (down for negative values);
    the y axis has gridlines at round values.
    """
    from PIL import Image, ImageDraw, ImageFont

    blocks = sorted(result["importance"], key=int)
    ends = tuple(result["settings"].get("protected", (0, result["settings"]["num_layers"] - 1)))
    dropped = set(drop or [])
    values = np.array([result["importance"][b] for b in blocks], dtype=np.float64)
    top, bottom = max(values.max(), 0.0), min(values.min(), 0.0)
    span = (top - bottom) or 1.0
    img = Image.new("RGB", (_W, _H), _WHITE)
    draw = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    x0, x1, y_top, y_bot = _LEFT, _W - _RIGHT, _TOP, _H - _BOTTOM

    def y_of(v: float) -> float:
        return y_top + (top - v) / span * (y_bot - y_top)

    # 1. title, gridlines with round tick values, axis labels
    title = "Block importance: added error of the x0 estimate when the block is skipped"
    draw.text((_W / 2, 8), title, fill=_INK, font=font, anchor="ma")
    step = 10 ** np.floor(np.log10(span / 4))
    step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= 6)
    for tick in np.arange(np.ceil(bottom / step) * step, top + step / 2, step):
        y = y_of(tick)
        draw.line([(x0, y), (x1, y)], fill=_GRID)
        draw.text((x0 - 6, y), f"{tick:.3g}", fill=_INK, font=small, anchor="rm")
    draw.line([(x0, y_of(0.0)), (x1, y_of(0.0))], fill=_INK)
    draw.text((x0 + (x1 - x0) / 2, _H - 22), "block (depth)", fill=_INK, font=small, anchor="mm")

    # 2. one bar and one index label per block
    slot = (x1 - x0) / len(blocks)
    for i, (block, value) in enumerate(zip(blocks, values)):
        left, right = x0 + i * slot + 0.15 * slot, x0 + (i + 1) * slot - 0.15 * slot
        colour = _ORANGE if int(block) in ends else _GREY if int(block) in dropped else _BLUE
        draw.rectangle([left, min(y_of(value), y_of(0.0)), right, max(y_of(value), y_of(0.0))], fill=colour)
        draw.text(((left + right) / 2, y_bot + 6), str(block), fill=_INK, font=small, anchor="ma")

    # 3. legend
    legend = [(_BLUE, "kept"), (_ORANGE, "first / last (never pruned)")] + ([(_GREY, "dropped by the plan")] if drop else [])
    x = x0
    for colour, text in legend:
        draw.rectangle([x, 32, x + 10, 42], fill=colour)
        draw.text((x + 14, 37), text, fill=_INK, font=small, anchor="lm")
        x += 28 + draw.textlength(text, font=small)
    return np.asarray(img)
