"""Does a shapes-world model listen to each word of its prompt? A cheap check to run
before (and during) a long teacher run:

    python -m distill probe BUNDLE

For real clips x0 at noise level t, the flow loss || v(x_t, t, c) - (eps - x0) ||^2 with
the true prompt, the empty prompt, and the prompt with one attribute (colour, shape,
direction) swapped for another. A model that uses an attribute has a higher loss with it
swapped; a gap of ~0 at high t means that word does not reach the prediction at all.

Beside it, what the data allows: at t -> 1 the best prediction is the prompt's mean clip, so
a perfect model's gap with a word swapped is the squared distance between the two prompts'
mean clips (per element), estimated without bias from two independent halves of clips per
prompt. A model far below that at high t is not using the word.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from flgengine.codec import uint8_to_video

from .worlds import shapes

ATTRIBUTES = {"colour": tuple(shapes.COLOURS), "shape": shapes.SHAPES, "direction": tuple(shapes.DIRECTIONS)}


@torch.no_grad()
def prompt_sensitivity(pipe, n: int = 48, ts=(0.95, 0.85, 0.7, 0.5), seed: int = 123) -> list[dict]:
    """[{"t", "true", "uncond", "colour", "shape", "direction"}] mean flow losses per t."""
    rng = np.random.default_rng(seed)
    clips = [shapes.sample_clip(rng) for _ in range(n)]
    x0 = pipe.codec.encode(uint8_to_video(torch.from_numpy(np.stack([shapes.render(c) for c in clips])))).float()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))

    def swapped(attr: str) -> list[str]:
        out = []
        for c in clips:
            facts = {"colour": c.colour, "shape": c.shape, "direction": c.direction}
            others = [v for v in ATTRIBUTES[attr] if v != facts[attr]]
            facts[attr] = others[rng.integers(len(others))]
            out.append(shapes.prompt_of(**facts))
        return out

    prompts = {"true": [c.prompt for c in clips], "uncond": [""] * n, **{a: swapped(a) for a in ATTRIBUTES}}
    context = {k: pipe.text_encoder.encode(p, dtype=torch.float32) for k, p in prompts.items()}
    rows = []
    for t in ts:
        x_t = (1 - t) * x0 + t * eps
        T = torch.full((n,), 1000.0 * t)
        rows.append({"t": t, **{k: torch.mean((pipe.dit(x_t, T, c) - (eps - x0)) ** 2).item()
                                for k, c in context.items()}})
    return rows


def ideal_gaps(codec, per_prompt: int = 96, seed: int = 321) -> dict[str, float]:
    """{attribute: E ||m(c) - m(c')||^2 per element} over prompts c and c' = c with that attribute
    changed, m = mean encoded clip of a prompt (the t -> 1 gap of a perfect model)."""
    from .metrics import real_videos

    half = per_prompt // 2
    facts = [(c, s, d) for c in shapes.COLOURS for s in shapes.SHAPES for d in shapes.DIRECTIONS]
    means = {}  # facts -> (mean of half A, mean of half B), each (C, T, H, W)
    for k, f in enumerate(facts):
        clips = real_videos([shapes.prompt_of(*f)] * (2 * half), seed=seed * 1000 + k)
        x = codec.encode(uint8_to_video(torch.from_numpy(clips))).float()
        means[f] = (x[:half].mean(0), x[half:].mean(0))
    out = {}
    for i, attr in enumerate(ATTRIBUTES):
        gaps = []
        for f in facts:
            for v in ATTRIBUTES[attr]:
                if v == f[i]:
                    continue
                g = f[:i] + (v,) + f[i + 1:]
                # (mA(f) - mA(g)) . (mB(f) - mB(g)): unbiased for ||m(f) - m(g)||^2
                gaps.append(torch.mean((means[f][0] - means[g][0]) * (means[f][1] - means[g][1])).item())
        out[attr] = float(np.mean(gaps))
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="a shapes-world bundle (or shipped name)")
    p.add_argument("--samples", type=int, default=48, help="clips (default 48)")
    p.add_argument("--ideal-clips", type=int, default=96,
                   help="clips per prompt for the data's ideal gaps (default 96; 0: skip that row)")


def run(args) -> int:
    import flgengine

    pipe = flgengine.load(args.bundle, device="cpu", dtype="fp32")
    rows = prompt_sensitivity(pipe, n=args.samples)
    print("t      true      uncond    +colour   +shape    +direction   (loss; +X: gap with X swapped)")
    for r in rows:
        print(f"{r['t']:<6} {r['true']:.5f}   {r['uncond']:.5f}   " + "   ".join(
            f"{r[a] - r['true']:+.5f}" for a in ATTRIBUTES))
    if args.ideal_clips >= 2:
        ideal = ideal_gaps(pipe.codec, args.ideal_clips)
        print("ideal                        " + "   ".join(f"+{ideal[a]:.5f}" for a in ATTRIBUTES)
              + "   (what the data allows at t -> 1: a perfect model's gap)")
    return 0
