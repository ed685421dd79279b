"""Block-sparse attention through torch's FlexAttention (backend "flex"), beside our Triton
kernel: the same `BlockMask` handed to `torch.nn.attention.flex_attention` as its own block
mask (per query block, the listed key blocks), compiled once per process on CUDA. Eager on
the CPU (FlexAttention's reference path: it materialises the scores; for tests).
"""

from __future__ import annotations

import torch

_COMPILED: dict = {}  # the compiled flex_attention, per device type


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _COMPILED:
        _COMPILED["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["cuda"]


def flex_block_mask(block_mask, batch: int):
    """Our BlockMask as FlexAttention's (kv_num_blocks (B, H, nQ), kv_indices (B, H, nQ, nK))."""
    from torch.nn.attention.flex_attention import BlockMask as FlexMask

    hit = block_mask.cache.get(("flex", batch))  # built once per mask and batch size
    if hit is not None:
        return hit
    count = block_mask.kv_count.unsqueeze(0).expand(batch, -1, -1).contiguous()
    index = block_mask.kv_index.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
    tiles, bq, bk = block_mask.mask, block_mask.block_q, block_mask.block_k

    # the same mask per token (FlexAttention's definition of the pattern; its eager path and
    # any partial block evaluate it); the listed blocks are "full", so the compiled kernel skips it
    if block_mask.heads == 1:
        def mask_mod(b, h, q_idx, kv_idx):
            return tiles[0, q_idx // bq, kv_idx // bk]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return tiles[h, q_idx // bq, kv_idx // bk]

    fm = FlexMask.from_kv_blocks(torch.zeros_like(count), index, count, index, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                 seq_lengths=(block_mask.q_len, block_mask.kv_len))
    block_mask.cache[("flex", batch)] = fm
    return fm


def why_not(q, k, v, block_mask=None, precision=None) -> str | None:
    if precision is not None:
        return f"precision={precision!r}: the flex backend runs the inputs' dtype only"
    if block_mask is None:
        return "the flex backend serves block-sparse attention (block_mask=...) only"
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch without FlexAttention
        return f"torch.nn.attention.flex_attention is not importable ({e})"
    if q.device.type == "cuda" and (block_mask.block_q % 128 or block_mask.block_k % 128):
        return (f"FlexAttention's CUDA kernel needs mask blocks that are multiples of 128 "
                f"(this mask's are {block_mask.block_q} x {block_mask.block_k})")
    return block_mask.check(q, k)


def attention(q, k, v, block_mask=None, precision=None) -> torch.Tensor:
    """q: (B, Sq, H, D); k, v: (B, Skv, H, D) -> (B, Sq, H, D)."""
    fm = flex_block_mask(block_mask, q.shape[0])
    out = _flex_fn(q.device)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=fm)
    return out.transpose(1, 2).contiguous()
