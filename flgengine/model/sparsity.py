"""Block-sparse self-attention patterns over the video token grid.

Tile-major token order. The token grid (F', H', W') is cut into tiles of `tile` = (tf, th, tw)
tokens (the last tile of an axis may be shorter). Tokens are ordered tile by tile (tiles in
frame, row, column order; inside a tile, frame, row, column), so a tile is a run of
consecutive tokens and a spatio-temporal neighbourhood of tiles is a set of key blocks. The
DiT permutes its tokens into this order after patchify (RoPE positions and per-token
timesteps follow them) and back before unpatchify: dense attention gives the same result in
either order (up to float reassociation).

Patterns (`AttentionConfig.kind`):
- "tile_window": every query block attends to the key blocks holding a tile within `window`
  tiles (per axis, centred: window 3 = the tile and one on each side) of a tile it holds;
- "per_head": the same with one window per head (`head_windows`), e.g. heads that look
  along time, heads that look across space, and global heads (a window as large as the grid).
The mask is at the granularity of `block` tokens (the kernel's tiles): a query block computes
all pairs with each allowed key block. It is built once per (grid, pattern, device) and cached.
"""

from __future__ import annotations

import math

import torch

from ..config import AttentionConfig
from ..ops.block_mask import BlockMask


def _tiles(grid, tile) -> tuple[int, int, int]:
    return tuple(math.ceil(n / t) for n, t in zip(grid, tile))


def tile_major_order(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """(S,) int64: row-major token indices listed in tile-major order (perm[i] = the row-major
    index of the i-th token in tile-major order)."""
    F, H, W = grid
    f, h, w = torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W), indexing="ij")
    tf, th, tw = tile
    nt = _tiles(grid, tile)
    tile_id = ((f // tf) * nt[1] + h // th) * nt[2] + w // tw  # (F, H, W)
    inner = ((f % tf) * th + h % th) * tw + w % tw
    key = (tile_id * (tf * th * tw) + inner).flatten()
    return torch.argsort(key, stable=True)


def _tile_coords(grid, tile, perm: torch.Tensor) -> torch.Tensor:
    """(S, 3) tile coordinates of the tokens in tile-major order."""
    F, H, W = grid
    idx = perm
    f, rem = idx // (H * W), idx % (H * W)
    h, w = rem // W, rem % W
    return torch.stack([f // tile[0], h // tile[1], w // tile[2]], dim=1)


def window_block_mask(grid, tile, windows: list[tuple[int, int, int]], block: int, device="cpu") -> BlockMask:
    """BlockMask (len(windows) heads, nB, nB) over the tile-major order: block j is allowed
    for block i when some tile of j is within the head's window of some tile of i."""
    S = math.prod(grid)
    perm = tile_major_order(grid, tile)
    coords = _tile_coords(grid, tile, perm)  # (S, 3)
    nt = _tiles(grid, tile)
    tile_flat = (coords[:, 0] * nt[1] + coords[:, 1]) * nt[2] + coords[:, 2]  # (S,)
    n_blocks, n_tiles = math.ceil(S / block), math.prod(nt)
    occ = torch.zeros(n_blocks, n_tiles)
    occ[torch.arange(S) // block, tile_flat] = 1.0  # block i holds tile t
    tc = torch.stack(torch.meshgrid(*(torch.arange(n) for n in nt), indexing="ij"), dim=-1).reshape(-1, 3)
    dist = (tc[:, None, :] - tc[None, :, :]).abs()  # (T, T, 3) tile distance per axis
    masks = []
    for win in windows:
        radius = torch.tensor([w // 2 for w in win])
        near = (dist <= radius).all(-1).float()  # (T, T)
        masks.append((occ @ near @ occ.t()) > 0)
    return BlockMask(torch.stack(masks).to(device), S, S, block, block)


class SparsePattern:
    """A config's pattern on any grid: tile-major permutation, its inverse and the block mask,
    cached per (grid, device)."""

    def __init__(self, cfg: AttentionConfig, num_heads: int):
        self.cfg, self.num_heads = cfg, num_heads
        self._cache: dict = {}

    def windows(self) -> list[tuple[int, int, int]]:
        c = self.cfg
        return [tuple(w) for w in c.head_windows] if c.kind == "per_head" else [tuple(c.window)]

    def check_grid(self, grid) -> None:
        tile = self.cfg.tile
        if any(t > n for t, n in zip(tile, grid)):
            raise ValueError(f"attention.tile={list(tile)} is larger than the token grid {list(grid)} "
                             f"(frames, rows, columns after patchify)")

    def for_grid(self, grid, device) -> tuple[torch.Tensor, torch.Tensor, BlockMask]:
        key = (tuple(grid), str(device))
        hit = self._cache.get(key)
        if hit is None:
            self.check_grid(grid)
            perm = tile_major_order(grid, self.cfg.tile)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel())
            bm = window_block_mask(grid, self.cfg.tile, self.windows(), self.cfg.block, device)
            hit = self._cache[key] = (perm.to(device), inv.to(device), bm)
        return hit

    def density(self, grid) -> float:
        """Fraction of the query-key pairs computed on this grid."""
        return self.for_grid(grid, "cpu")[2].density()
