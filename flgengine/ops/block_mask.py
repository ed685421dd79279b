"""Block-sparse attention masks: which (query block, key block) tiles attention computes.

A `BlockMask` is a boolean tile map `mask[h, i, j]` over query blocks of `block_q` tokens and
key blocks of `block_k` tokens (the last block of each may be partial). `h` is 1 (one pattern
for every head) or the head count. Attention with a block mask computes softmax over the keys
of the allowed tiles only: the kernel skips the others entirely (no loads, no math), so the
work is `density` of the dense work.

The kernel reads the map as per-row lists (`kv_index`, `kv_count`, `kv_full`), built once
here, the way FlexAttention's BlockMask stores it: for each query block, the allowed key
blocks in ascending order. A query row whose blocks are all masked gets zeros.
"""

from __future__ import annotations

import math

import torch


def _pow2(name: str, n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 16 or n & (n - 1):
        raise ValueError(f"{name}={n!r} must be a power of two >= 16")


class BlockMask:
    """mask: bool (Hm, nQ, nK) with nQ = ceil(q_len / block_q), nK = ceil(kv_len / block_k),
    Hm = 1 (shared by the heads) or H. Built once per (grid, pattern); cheap to reuse."""

    def __init__(self, mask: torch.Tensor, q_len: int, kv_len: int, block_q: int = 128, block_k: int = 128):
        _pow2("block_q", block_q)
        _pow2("block_k", block_k)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"block mask must be a bool tensor (heads, query blocks, key blocks), got {got}")
        if q_len < 1 or kv_len < 1:
            raise ValueError(f"q_len={q_len} and kv_len={kv_len} must be >= 1")
        n_q, n_k = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
        if tuple(mask.shape[1:]) != (n_q, n_k):
            raise ValueError(f"block mask shape {tuple(mask.shape)} does not tile q_len={q_len} x kv_len={kv_len} "
                             f"in {block_q} x {block_k} blocks: expected (heads, {n_q}, {n_k})")
        self.mask, self.q_len, self.kv_len, self.block_q, self.block_k = mask, q_len, kv_len, block_q, block_k
        m = mask.to(torch.int32)
        self.kv_count = m.sum(-1, dtype=torch.int32).contiguous()  # (Hm, nQ): allowed key blocks per query block
        # allowed blocks first, ascending (a stable sort of "not allowed"): (Hm, nQ, nK)
        self.kv_index = torch.sort((1 - m), dim=-1, stable=True).indices.to(torch.int32).contiguous()
        tail = kv_len % block_k != 0  # the last key block is partial: the kernel masks it, so count it apart
        self.kv_full = (self.kv_count - (mask[..., -1].to(torch.int32) if tail else 0)).contiguous()
        self.is_dense = bool(mask.all())  # every tile: attention runs the dense kernel
        self.cache: dict = {}  # forms other backends derive from it (FlexAttention's BlockMask), kept with it

    @property
    def heads(self) -> int:
        return self.mask.shape[0]

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def to(self, device) -> "BlockMask":
        return BlockMask(self.mask.to(device), self.q_len, self.kv_len, self.block_q, self.block_k)

    def select_heads(self, start: int, count: int) -> "BlockMask":
        """The mask of heads start .. start + count - 1 (a rank's heads under sequence parallel);
        a mask shared by the heads serves any. Cached with the mask."""
        if self.heads == 1:
            return self
        key = ("heads", start, count)
        if key not in self.cache:
            if not 0 <= start <= start + count <= self.heads:
                raise ValueError(f"heads {start}..{start + count - 1} are outside this mask's {self.heads}")
            self.cache[key] = BlockMask(self.mask[start:start + count], self.q_len, self.kv_len, self.block_q,
                                        self.block_k)
        return self.cache[key]

    def token_mask(self) -> torch.Tensor:
        """bool (Hm, q_len, kv_len): the tile map expanded to query-key pairs (the reference's mask)."""
        m = self.mask.repeat_interleave(self.block_q, 1).repeat_interleave(self.block_k, 2)
        return m[:, : self.q_len, : self.kv_len]

    def density(self) -> float:
        """Fraction of the query-key pairs computed (partial tail blocks counted by their real size)."""
        rows = torch.full((self.mask.shape[1],), self.block_q, dtype=torch.float64)
        rows[-1] = self.q_len - self.block_q * (self.mask.shape[1] - 1)
        cols = torch.full((self.mask.shape[2],), self.block_k, dtype=torch.float64)
        cols[-1] = self.kv_len - self.block_k * (self.mask.shape[2] - 1)
        pairs = torch.einsum("hij,i,j->", self.mask.double().cpu(), rows, cols).item()
        return pairs / (self.heads * self.q_len * self.kv_len)

    def check(self, q: torch.Tensor, k: torch.Tensor) -> str | None:
        """Why this mask cannot serve attention over q (B, Sq, H, D), k (B, Skv, H, D); None if it can."""
        if q.shape[1] != self.q_len or k.shape[1] != self.kv_len:
            return (f"block mask is for q_len={self.q_len}, kv_len={self.kv_len}; "
                    f"the inputs have Sq={q.shape[1]}, Skv={k.shape[1]}")
        if self.heads not in (1, q.shape[2]):
            return f"block mask has {self.heads} heads; the inputs have H={q.shape[2]} (use 1 or H)"
        if self.device != q.device:
            return f"block mask is on {self.device}, the inputs on {q.device}"
        return None

    def __repr__(self) -> str:
        return (f"BlockMask(heads={self.heads}, q_len={self.q_len}, kv_len={self.kv_len}, "
                f"block={self.block_q}x{self.block_k}, density={self.density():.3f})")


def random_block_mask(heads: int, q_len: int, kv_len: int, density: float, block_q: int = 128, block_k: int = 128,
                      seed: int = 0, device="cpu") -> BlockMask:
    """A mask with about `density` of each query block's key blocks allowed (at least one per
    row, the diagonal block kept), drawn with a fixed seed: for tests and benchmarks."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density!r} must be in (0, 1]")
    n_q, n_k = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    g = torch.Generator().manual_seed(seed)
    keep = max(1, round(density * n_k))
    scores = torch.rand(heads, n_q, n_k, generator=g)
    diag = (torch.arange(n_q)[:, None] * n_k // n_q) == torch.arange(n_k)[None, :]
    scores = scores + 2.0 * diag  # the diagonal block ranks first
    top = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(heads, n_q, n_k, dtype=torch.bool).scatter_(-1, top, True)
    return BlockMask(mask.to(device), q_len, kv_len, block_q, block_k)
