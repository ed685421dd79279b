"""Tile choice of the attention kernel: block sizes, warps, stages, and the head dim's channel tiles."""

from __future__ import annotations

import torch

from . import _common


def split_head_dim(head_dim: int, min_tile: int = 16) -> tuple[int, int]:
    """(BLOCK_DA, BLOCK_DB): the head dim's one power-of-two tile (BLOCK_DB = 0), or two
    power-of-two tiles when they cover it with fewer channels: 72 -> 64 + 16 (80 channels
    of work instead of 128), 40 -> 32 + 16, 96 -> 64 + 32, 160 -> 128 + 32; 112 stays 128
    (64 + 64 saves nothing). Both tiles are >= min_tile: 16, the bf16 dot's minimum depth;
    32 for FP8, whose tensor-core products are 32 deep (72 -> 64 + 32)."""
    whole = max(min_tile, _common.next_pow2(head_dim))
    if head_dim == whole or head_dim <= min_tile:
        return whole, 0
    da = whole // 2
    db = max(min_tile, _common.next_pow2(head_dim - da))
    return (da, db) if da + db < whole else (whole, 0)


def config(head_dim: int, dtype: torch.dtype, interpret: bool, split: bool = True, fp8: bool = False) -> dict:
    """Tile sizes and launch options. GPU numbers aim at an H100 (228 KB shared memory per SM):
    BLOCK_M 128 x BLOCK_N 64 for fp16/bf16 up to D=128 (sm_90 build, offline: 185-246
    registers, no spills, 64-128 KB shared), 64 x 32 with 8 warps for D=256 (182 registers).
    FP8: 128 x 128 tiles up to D=128 (a K/V tile of e4m3 is half a bf16 one).
    fp32 (3xTF32 dots) gets small tiles and still spills some (~1 KB stack): it is the
    verification path, not the fast one. The interpreter gets small tiles so CPU tests cover
    several K/V blocks plus a tail. `split`: the head dim on two tiles where that computes
    fewer channels (`split_head_dim`); off: one next-power-of-two tile."""
    min_tile = 32 if fp8 else 16
    da, db = split_head_dim(head_dim, min_tile) if split else (max(min_tile, _common.next_pow2(head_dim)), 0)
    width = da + db
    if interpret:
        bm, bn, warps, stages = 32, 16, 4, 1
    elif fp8:
        bm, bn, warps, stages = (128, 128, 8, 3) if width <= 128 else (64, 64, 8, 2)
    elif dtype == torch.float32:
        bm, bn, warps, stages = (64, 32, 4, 2) if width <= 128 else (32, 16, 4, 2)
    elif width <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    elif width <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 8, 2
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DA=da, BLOCK_DB=db, num_warps=warps, num_stages=stages)
