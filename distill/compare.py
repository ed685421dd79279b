"""`python -m distill compare`: the comparison table (FastLightGen's Table 2 on our world).

    python -m distill compare --teacher shapes-teacher \\
        --student "FastLightGen=runs/flg/bundle" --student "prune-then-DMD2=runs/p/bundle" \\
        --student "DMD2 full=runs/d/bundle" --samples 60 --seeds 0 1 2

Rows: the teacher at its own sampler (50 Euler steps + CFG), the teacher at 4 Euler steps
(+ CFG), then every student. Columns: NFE (DiT calls per video: steps, x2 with CFG), DiT
parameters, prompt adherence (all, colour, shape, direction), Fréchet distance (with the
real-vs-real floor), motion vs the true speed, measured seconds per video on this machine
and the speedup vs the teacher, all from one run with the same prompts and seeds.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from .evaluate import evaluate_bundle, set_threads, world_first_frames
from .evaluator import load_evaluator


GRID_PROMPTS = ("a red circle moving left", "a green square moving up", "a blue triangle moving right",
                "a yellow circle moving down", "a white square moving left")


def _runs(teacher: str, students: list[tuple[str, str]], teacher_few_steps: int,
          training_free: bool = False) -> list[tuple[str, object, dict]]:
    """(row name, pipeline, generate kwargs): the teacher at its own sampler and at few steps, then
    the students; with `training_free`, after each sparse-aware continuation (a student with an
    attention pattern whose provenance names its `init_student`) the student it started from,
    run with the same pattern and no training."""
    import flgengine

    t = flgengine.load(teacher, device="cpu", dtype="fp32")
    runs = [(f"teacher, {t.config.sampler.num_steps} steps + CFG", t, {}),
            (f"teacher, {teacher_few_steps} steps + CFG", t, {"steps": teacher_few_steps})]
    for name, path in students:
        pipe = flgengine.load(path, device="cpu", dtype="fp32")
        runs.append((name, pipe, {}))
        start = pipe.provenance.get("init_student", {}).get("path")
        if training_free and pipe.dit.config.attention is not None and start:
            dense = flgengine.load(start, device="cpu", dtype="fp32")
            dense.dit.set_attention(pipe.dit.config.attention.to_dict())
            runs.append((f"{name}: its start, the pattern without training", dense, {}))
    return runs


def video_grid(runs, prompts=GRID_PROMPTS, seed: int = 0, scale: int = 3) -> np.ndarray:
    """One video of every row's model (rows) on every prompt (columns), same seed and noise:
    (T, H, W, 3) uint8 with the model names on the left and the prompts on top."""
    from PIL import Image, ImageDraw, ImageFont

    def image_of(pipe) -> dict:  # image-to-video models get world first frames (the same for every row)
        if getattr(pipe.config, "image", "none") == "none":
            return {}
        return {"image": list(world_first_frames(list(prompts), seed))}

    videos = [np.asarray(pipe(list(prompts), seed=seed, progress=False, **kw, **image_of(pipe)))
              for _, pipe, kw in runs]  # (P, T, h, w, 3)
    P, T, h, w, _ = videos[0].shape
    cell, gap, left, top = (h * scale, w * scale), 4, 190, 40
    H, W = top + len(runs) * (cell[0] + gap), left + P * (cell[1] + gap)
    font = ImageFont.load_default(size=12)
    frame = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(frame)
    for j, prompt in enumerate(prompts):  # "a red circle" / "moving left"
        words = prompt.split()
        x = left + j * (cell[1] + gap) + cell[1] / 2
        draw.text((x, 6), " ".join(words[:3]), fill=(40, 40, 40), font=font, anchor="ma")
        draw.text((x, 21), " ".join(words[3:]), fill=(40, 40, 40), font=font, anchor="ma")
    for i, (name, _, _) in enumerate(runs):
        draw.text((8, top + i * (cell[0] + gap) + cell[0] / 2), name, fill=(40, 40, 40), font=font, anchor="lm")
    base = np.asarray(frame).copy()
    out = np.repeat(base[None], T, axis=0)  # (T, H, W, 3)
    for i, v in enumerate(videos):
        big = v.repeat(scale, axis=2).repeat(scale, axis=3)  # (P, T, h*s, w*s, 3), nearest neighbour
        for j in range(P):
            y, x = top + i * (cell[0] + gap), left + j * (cell[1] + gap)
            out[:, y:y + cell[0], x:x + cell[1]] = big[j]
    return out


def dit_calls(pipe, steps: int, guidance: float | None) -> int:
    """DiT evaluations per video: two per CFG step, one otherwise (a two-expert teacher's
    low-noise steps without CFG count one)."""
    sampler = pipe._sampler_for(steps, None, force=True)
    if not hasattr(sampler, "guidance_at"):  # few-step students
        return steps * (2 if (guidance or 0) > 1 else 1)
    return sum(2 if sampler.guidance_at(s * sampler.T) > 1 else 1 for s in sampler.sigmas[:-1].tolist())


def compare(teacher: str, students: list[tuple[str, str]], samples: int = 60, seeds=(0,), batch_size: int = 20,
            teacher_few_steps: int = 4, progress: bool = True, grid: str | None = None,
            training_free: bool = False) -> list[dict]:
    """The rows of the comparison table (see _runs); with `grid`, also writes a video (.gif /
    .mp4) of every model on GRID_PROMPTS (rows = models, same seed)."""
    evaluator = load_evaluator()
    rows = []
    runs = _runs(teacher, students, teacher_few_steps, training_free)
    for name, pipe, kw in runs:
        r = evaluate_bundle(pipe, samples=samples, seeds=seeds, batch_size=batch_size, progress=progress,
                            evaluator=evaluator, **kw)
        nfe = dit_calls(pipe, r["steps"], r["guidance"])
        rows.append({"name": name, "nfe": nfe, "params": pipe.dit.num_params(), "adherence": r["prompt_adherence"],
                     "fd": r["fd"], "fd_floor": r["fd_real_vs_real"], "motion": r["motion"]["ratio"],
                     "seconds_per_video": r["seconds_per_video"], "path": r["model"],
                     **({"first_frame": r["first_frame"]} if "first_frame" in r else {})})
    base = rows[0]["seconds_per_video"]
    for row in rows:
        row["speedup"] = base / row["seconds_per_video"]
    if grid:
        from flgengine.video import save_video

        save_video(video_grid(runs), grid, fps=4)
    return rows


def markdown(rows: list[dict]) -> str:
    image = all("first_frame" in r for r in rows)  # image-to-video models: frame 0 PSNR, appearance kept
    head = ("| model | NFE | DiT params | adherence | colour / shape / direction | FD (floor) | motion / true "
            + ("| frame 0 PSNR | appearance kept " if image else "")
            + "| s / video (CPU) | speedup |\n|---|---|---|---|---|---|---|" + ("---|---|" if image else "") + "---|---|")
    lines = [head]
    for r in rows:
        a = r["adherence"]
        f = (f"{r['first_frame']['frame0_psnr']:.1f} dB | {r['first_frame']['appearance_kept']:.3f} | "
             if image else "")
        lines.append(f"| {r['name']} | {r['nfe']} | {r['params'] / 1e6:.2f}M | {a['adherence']:.3f} | "
                     f"{a['colour']:.3f} / {a['shape']:.3f} / {a['direction']:.3f} | {r['fd']:.1f} ({r['fd_floor']:.1f}) | "
                     f"{r['motion']:.2f} | {f}{r['seconds_per_video']:.3f} | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="shapes-teacher", help="teacher bundle or shipped name (default shapes-teacher)")
    p.add_argument("--student", action="append", default=[], metavar="NAME=BUNDLE",
                   help="a student row (repeatable), e.g. FastLightGen=shapes-4step")
    p.add_argument("--samples", type=int, default=60, help="videos per seed, cycling the 60 prompts (default 60)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="base seeds (default 0)")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all); the speeds depend on it")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--grid", default=None, metavar="FILE",
                   help="also write a video (.gif or .mp4) of every model on five prompts, side by side")
    p.add_argument("--training-free", action="store_true",
                   help="after each sparse-aware student (a Stage III continuation with stage3.attention), a row "
                        "for the student it started from run with the same pattern and no training")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    set_threads(args.threads)
    students = []
    for s in args.student:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--student takes NAME=BUNDLE, got {s!r}")
        students.append((name, path))
    rows = compare(args.teacher, students, args.samples, args.seeds, args.batch_size, progress=not args.quiet,
                   grid=args.grid, training_free=args.training_free)
    print(markdown(rows))
    print(f"({torch.get_num_threads()} CPU threads, torch {torch.__version__})")
    if args.json:
        from pathlib import Path

        from flgengine.bundle import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
    return 0
