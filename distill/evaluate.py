"""Evaluating a bundle on the shapes world, and the `evaluate` / `train-evaluator` commands.

    python -m distill evaluate BUNDLE --samples 60 [--seeds 0 1] [--json] [--write-provenance]
    python -m distill train-evaluator [--steps N] [--out DIR]

`evaluate_bundle` generates videos for the world's prompts and scores them with
`metrics.evaluate_videos` (prompt adherence, motion, Fréchet distance).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch

import flgengine
from flgengine.bundle import atomic_write_text, read_json_object

from .evaluator import DEFAULT_DIR, Evaluator, as_uint8, load_evaluator, save_evaluator, train_evaluator
from .metrics import evaluate_videos
from .worlds import shapes as world

__all__ = ["evaluate_bundle", "format_table", "set_threads", "add_evaluate_args", "run_evaluate",
           "add_train_evaluator_args", "run_train_evaluator"]

BATCH_SEED_STRIDE = 10_000  # evaluate_bundle: batch k of base seed s runs with seed s * stride + k


def _sampler_default(pipe, name: str):
    """`pipe.config.sampler.<name>`, or None for a pipeline-like object without one."""
    return getattr(getattr(getattr(pipe, "config", None), "sampler", None), name, None)


def evaluate_bundle(model, samples: int = 60, seeds: Sequence[int] = (0,), batch_size: int = 20,
                    steps: int | None = None, progress: bool = True, evaluator: Evaluator | None = None,
                    device=None, dtype=None, precision: str = "bf16", **generate_kwargs) -> dict:
    """Generates `samples` videos per base seed with a bundle and evaluates them all together.

    `model`: a bundle path, a shipped model's name, or a loaded `Pipeline` (any callable
    `pipe(prompts, seed=, progress=, steps=, **kw) -> uint8 (B, T, H, W, 3)`).
    Sample i (0 <= i < samples) of a base seed uses prompt `PROMPTS[i % 60]`; the samples
    of a seed are generated in consecutive batches of `batch_size`, batch k with seed
    `s * 10000 + k` (one call draws all its noise from its seed, so the videos also depend
    on `batch_size`, which the result records). `device` / `dtype` / `precision` are passed to
    `flgengine.load`; `generate_kwargs` go to every call (guidance, force, ...).
    """
    from tqdm.auto import tqdm

    if samples < 2 or batch_size < 1:
        raise ValueError(f"need samples >= 2 and batch_size >= 1, got {samples} and {batch_size}")
    batches = math.ceil(samples / batch_size)
    if batches > BATCH_SEED_STRIDE:
        raise ValueError(f"{batches} batches per seed is more than {BATCH_SEED_STRIDE}; raise batch_size")
    if isinstance(model, (str, Path)):
        pipe = flgengine.load(model, device=device, dtype=dtype, precision=precision)
    else:
        pipe = model
        precision = getattr(pipe, "precision", precision)
    prompts = [world.PROMPTS[i % len(world.PROMPTS)] for i in range(samples)]
    videos, all_prompts, firsts = [], [], []
    image = getattr(getattr(pipe, "config", None), "image", "none") != "none"  # image to video: frame 0 given
    bar = tqdm(total=samples * len(seeds), desc="generating", unit="video", disable=not progress)
    t0 = time.time()
    for s in seeds:
        for k in range(batches):
            chunk = prompts[k * batch_size:(k + 1) * batch_size]
            seed = s * BATCH_SEED_STRIDE + k
            if image:  # the first frames of world clips of these prompts (size and start drawn from the seed)
                first = world_first_frames(chunk, seed)
                firsts.append(first)
                generate_kwargs = {**generate_kwargs, "image": list(first)}
            videos.append(as_uint8(pipe(chunk, seed=seed, progress=False, steps=steps, **generate_kwargs)))
            all_prompts += chunk
            bar.update(len(chunk))
    seconds = time.time() - t0
    bar.close()
    generate_kwargs.pop("image", None)
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
        "precision": precision,
        **evaluate_videos(torch.cat(videos), all_prompts, evaluator,
                          first_frames=torch.cat(firsts) if firsts else None),
    }


def world_first_frames(prompts, seed: int) -> torch.Tensor:
    """Frame 0 of a world clip for each prompt (size and start drawn from `seed`), uint8 (N, H, W, 3):
    what an image-to-video model is given."""
    import numpy as np

    from .evaluator import parse_prompts

    rng = np.random.default_rng([seed, 7])
    clips = [world.sample_clip(rng, colour=c, shape=s, direction=d) for c, s, d in parse_prompts(prompts)]
    return torch.from_numpy(np.stack([world.render(c)[0] for c in clips]))


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
    if "first_frame" in result:  # image to video
        f = result["first_frame"]
        rows.append(("frame 0", f"PSNR {f['frame0_psnr']:.1f} dB vs the given image; appearance kept "
                                f"{f['appearance_kept']:.3f} (colour {f['colour_kept']:.3f}, shape {f['shape_kept']:.3f}, "
                                f"size {f['size_kept']:.3f})"))
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
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp8"],
                   help="the DiT's precision: bf16 (its --dtype) or fp8 (e4m3; emulated on the CPU) (default: bf16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--write-provenance", action="store_true",
                   help="store the result in the bundle's provenance.json under 'evaluation' "
                        "('evaluation_fp8' for --precision fp8)")


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
                             device=args.device, dtype=args.dtype, precision=args.precision, guidance=args.guidance,
                             force=args.force)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    if args.write_provenance:
        prov_file = path / "provenance.json"
        provenance = read_json_object(prov_file)
        provenance["evaluation" if args.precision == "bf16" else f"evaluation_{args.precision}"] = result
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
