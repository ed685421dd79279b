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

from .evaluate import evaluate_bundle, load_evaluator


def compare(teacher: str, students: list[tuple[str, str]], samples: int = 60, seeds=(0,), batch_size: int = 20,
            teacher_few_steps: int = 4, progress: bool = True) -> list[dict]:
    import flgengine

    evaluator = load_evaluator()
    rows = []
    t = flgengine.load(teacher, device="cpu", dtype="fp32")
    runs = [(f"teacher, {t.config.sampler.num_steps} steps + CFG", t, {}),
            (f"teacher, {teacher_few_steps} steps + CFG", t, {"steps": teacher_few_steps})]
    runs += [(name, flgengine.load(path, device="cpu", dtype="fp32"), {}) for name, path in students]
    for name, pipe, kw in runs:
        r = evaluate_bundle(pipe, samples=samples, seeds=seeds, batch_size=batch_size, progress=progress,
                            evaluator=evaluator, **kw)
        nfe = r["steps"] * (2 if (r["guidance"] or 0) > 1 else 1)
        rows.append({"name": name, "nfe": nfe, "params": pipe.dit.num_params(), "adherence": r["prompt_adherence"],
                     "fd": r["fd"], "fd_floor": r["fd_real_vs_real"], "motion": r["motion"]["ratio"],
                     "seconds_per_video": r["seconds_per_video"], "path": r["model"]})
    base = rows[0]["seconds_per_video"]
    for row in rows:
        row["speedup"] = base / row["seconds_per_video"]
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| model | NFE | DiT params | adherence | colour / shape / direction | FD (floor) | motion / true "
            "| s / video (CPU) | speedup |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        a = r["adherence"]
        lines.append(f"| {r['name']} | {r['nfe']} | {r['params'] / 1e6:.2f}M | {a['adherence']:.3f} | "
                     f"{a['colour']:.3f} / {a['shape']:.3f} / {a['direction']:.3f} | {r['fd']:.1f} ({r['fd_floor']:.1f}) | "
                     f"{r['motion']:.2f} | {r['seconds_per_video']:.3f} | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="shapes-teacher", help="teacher bundle or shipped name (default shapes-teacher)")
    p.add_argument("--student", action="append", default=[], metavar="NAME=BUNDLE",
                   help="a student row (repeatable), e.g. FastLightGen=shapes-4step")
    p.add_argument("--samples", type=int, default=60, help="videos per seed, cycling the 60 prompts (default 60)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="base seeds (default 0)")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    students = []
    for s in args.student:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--student takes NAME=BUNDLE, got {s!r}")
        students.append((name, path))
    rows = compare(args.teacher, students, args.samples, args.seeds, args.batch_size, progress=not args.quiet)
    print(markdown(rows))
    if args.json:
        from pathlib import Path

        from flgengine.checkpoint import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
    return 0
