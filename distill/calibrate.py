"""`python -m distill calibrate-attention`: per-head block-sparse patterns from a calibration pass.

Video DiTs' heads specialise (Sparse VideoGen, radial attention): some look along time at the
same place, some across space within a frame, a few everywhere. This pass measures it and picks
one window per head for `config.json`'s `attention` (kind "per_head"):

1. run the dense DiT on calibration inputs (prompts x noise levels) and record each block's
   self-attention probabilities P (B, H, S, S), put in tile-major token order;
2. for every head index h (the same window serves head h of every block) and every candidate
   window W, the **retained mass**: the mean over blocks, samples and queries of the softmax mass
   on the keys W's block mask allows; and W's density (fraction of query-key pairs computed);
3. every head starts at the cheapest candidate; the upgrade with the most retained mass per unit
   of added density is taken while the mean density stays within `budget`.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager

import torch

from flgengine import ops
from flgengine.config import AttentionConfig
from flgengine.model.sparsity import tile_major_order, window_block_mask


def candidate_windows(grid, tile) -> list[tuple[int, int, int]]:
    """Windows (odd tiles per axis) that cover one tile, along time only, across space only,
    locally in 3D, and the whole grid."""
    n = [math.ceil(g / t) for g, t in zip(grid, tile)]
    full = [2 * k - 1 for k in n]  # centred anywhere, covers every tile on the axis
    cands = {(1, 1, 1), (3, 1, 1), (5, 1, 1), (full[0], 1, 1), (1, 3, 3), (1, full[1], full[2]), (3, 3, 3),
             (3, full[1], full[2]), tuple(full)}
    return sorted(cands, key=lambda w: (math.prod(w), w))


@contextmanager
def _recording(store: list):
    """Records softmax(q k^T / sqrt(D)) of every self-attention call (Sq == Skv) in `store`."""
    real = ops.attention

    def attention(q, k, v, **kw):
        if q.shape[1] == k.shape[1]:
            s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
            store.append(s.softmax(-1))  # (B, H, S, S)
        return real(q, k, v, **kw)

    ops.attention = attention
    try:
        yield
    finally:
        ops.attention = real


@torch.no_grad()
def attention_maps(dit, text_encoder, prompts, grid_latent, timesteps=(900.0, 600.0, 300.0), seed: int = 0):
    """Self-attention probabilities of every block, (blocks * len(timesteps), B, H, S, S), row-major tokens."""
    if dit.sparse is not None or dit.block_mask is not None:
        raise ValueError("calibrate a dense model (its config.json has an attention pattern already)")
    g = torch.Generator().manual_seed(seed)
    ctx = text_encoder.encode(list(prompts))
    x = torch.randn(len(prompts), *grid_latent, generator=g)
    maps = []
    with _recording(maps):
        for t in timesteps:
            dit(x, torch.full((len(prompts),), float(t)), ctx)
    return torch.stack(maps)


def calibrate(maps: torch.Tensor, grid, tile, block: int, budget: float, candidates=None) -> dict:
    """Per-head windows under a mean density `budget` from attention maps (N, B, H, S, S) in
    row-major order. Returns {"attention": AttentionConfig, "heads": [{window, density, mass}],
    "density", "mass", "candidates": {window: {density, mass per head}}}."""
    H = maps.shape[2]
    candidates = candidates or candidate_windows(grid, tile)
    perm = tile_major_order(grid, tile)
    p = maps[..., perm, :][..., perm]  # tile-major rows and columns
    table = []
    for w in candidates:
        bm = window_block_mask(grid, tile, [w], block)
        allowed = bm.token_mask()[0]  # (S, S)
        mass = (p * allowed).sum(-1).mean(dim=(0, 1, 3))  # (H,)
        table.append((w, bm.density(), mass))
    choice = [min(range(len(table)), key=lambda i: table[i][1])] * H  # the cheapest for every head
    density = lambda: sum(table[c][1] for c in choice) / H  # noqa: E731
    while True:
        best, best_gain = None, 0.0
        for h in range(H):
            for i, (_, d, m) in enumerate(table):
                extra = d - table[choice[h]][1]
                gain = (m[h] - table[choice[h]][2][h]).item()
                if extra <= 0 or gain <= 0 or density() + extra / H > budget + 1e-12:
                    continue
                if gain / extra > best_gain:
                    best, best_gain = (h, i), gain / extra
        if best is None:
            break
        choice[best[0]] = best[1]
    heads = [{"window": list(table[c][0]), "density": table[c][1], "mass": table[c][2][h].item()}
             for h, c in enumerate(choice)]
    cfg = AttentionConfig(kind="per_head", tile=tuple(tile), block=block, head_windows=[h["window"] for h in heads])
    return {"attention": cfg, "heads": heads, "density": density(),
            "mass": sum(h["mass"] for h in heads) / H,
            "candidates": {str(list(w)): {"density": d, "mass": m.tolist()} for w, d, m in table}}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="a dense bundle (path or shipped name)")
    p.add_argument("--tile", type=int, nargs=3, default=[1, 4, 4], metavar=("F", "H", "W"),
                   help="tokens per tile (frames, rows, columns of the token grid; default 1 4 4)")
    p.add_argument("--block", type=int, default=16, help="tokens per mask block (a power of two >= 16; default 16)")
    p.add_argument("--budget", type=float, default=0.4, help="mean density of the heads (default 0.4)")
    p.add_argument("--prompts", type=int, default=12, help="calibration prompts, from the shapes world's (default 12)")
    p.add_argument("-o", "--output", default=None, help="write the bundle with the chosen pattern here")


def run(args) -> int:
    import json
    import shutil
    from pathlib import Path

    import flgengine
    from flgengine.bundle import bundle_directory, write_bundle_files

    from .worlds.shapes import PROMPTS

    if not 0 < args.budget <= 1:
        raise SystemExit(f"--budget must be in (0, 1], got {args.budget}")
    pipe = flgengine.load(args.bundle, device="cpu", dtype="fp32")
    if hasattr(pipe.dit, "low"):
        raise SystemExit(f"{args.bundle} has two experts; calibrate a single-DiT bundle (a student)")
    if not pipe.dit.sparse_patterns:
        raise SystemExit(f"{args.bundle}: block-sparse attention is built for the Wan family, not "
                         f"{pipe.dit.config.family} (its attention runs dense)")
    c, p = pipe.dit.config, pipe.config
    latent = pipe.codec.latent_shape(p.num_frames, p.height, p.width)
    grid = tuple(n // q for n, q in zip(latent[1:], c.patch_size))
    AttentionConfig(kind="tile_window", tile=tuple(args.tile), block=args.block)  # checks tile / block first
    prompts = [PROMPTS[(i * 7) % len(PROMPTS)] for i in range(args.prompts)]
    maps = attention_maps(pipe.dit, pipe.text_encoder, prompts, latent)
    result = calibrate(maps, grid, tuple(args.tile), args.block, args.budget)
    for h, head in enumerate(result["heads"]):
        print(f"head {h}: window {head['window']} density {head['density']:.3f} retained mass {head['mass']:.3f}")
    print(f"mean density {result['density']:.3f}, retained mass {result['mass']:.3f}")
    print(json.dumps({"attention": result["attention"].to_dict()}))
    if args.output:
        pipe.dit.set_attention(result["attention"])
        out = Path(args.output)
        with bundle_directory(out) as tmp:
            for d in Path(pipe.path).iterdir():  # the parts: text encoder, tokenizer, codec
                if d.is_dir():
                    shutil.copytree(d, tmp / d.name)
            write_bundle_files(tmp, pipe.dit, p, {**pipe.provenance, "attention_calibration": {
                "budget": args.budget, "density": result["density"], "mass": result["mass"], "prompts": len(prompts)}})
        print(f"bundle: {out}")
    return 0
