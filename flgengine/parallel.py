"""Several processes on one request, over torch.distributed (NCCL on GPUs, gloo on CPUs).

    torchrun --nproc_per_node 2 -m flgengine generate "a cat" --model BUNDLE --parallel sequence
    pipe = flgengine.load(BUNDLE, parallel="sequence")   # inside an initialised process group

`sequence` (Ulysses): the video tokens are split across the ranks (rank r holds S_r of S). Every
per-token step (patchify, modulation, cross-attention to the replicated text, FFN) runs on the
local tokens; self-attention swaps the split with one all-to-all before it, so each rank holds
every token of a group of heads, and one after it, back to tokens. The output is gathered, so
every rank holds the same velocity, the same latents and the same video. HunyuanVideo's joint
attention over [video, text] keeps the text whole on every rank: each rank attends its heads over
all video tokens and the text, then the video part goes back to tokens and the text's heads are
all-gathered, so the text stream stays whole (and the same) everywhere.

    tokens per rank   S_r = S // N, the first S % N ranks one more
    heads per rank    H_r = H // N, the first H % N ranks one more: an uneven head split (no
                      padding), so a head count that N does not divide works; the busiest rank
                      does ceil(H / N) / (H / N) of the even share of attention (4 heads on 3
                      ranks: 2 heads where 1.33 would be even, 1.5x)

`cfg`: the DiT's batch (a teacher's conditional and unconditional halves, as CFG runs them in
one call) is split across the ranks and gathered: 2 ranks each run one half.
"""

from __future__ import annotations

import torch

__all__ = ["PARALLEL_KINDS", "SequenceParallel", "BatchParallel", "split_sizes", "set_parallel"]

PARALLEL_KINDS = ("sequence", "cfg")


def split_sizes(n: int, world: int) -> list[int]:
    """n items over `world` ranks: n // world each, the first n % world ranks one more."""
    return [n // world + (r < n % world) for r in range(world)]


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("parallel inference needs an initialised process group (torch.distributed."
                         "init_process_group, as torchrun and the CLI's --parallel set up); none is")
    return dist


class SequenceParallel:
    """The token split of one forward, and the all-to-alls around self-attention."""

    def __init__(self, group=None):
        self.dist = _dist()
        self.group = group
        self.world = self.dist.get_world_size(group)
        self.rank = self.dist.get_rank(group)
        self.sizes: list[int] = []  # tokens per rank of the current forward

    def begin(self, num_tokens: int) -> None:
        if num_tokens < self.world:
            raise ValueError(f"sequence parallel over {self.world} ranks needs at least {self.world} tokens, this "
                             f"forward has {num_tokens}: use fewer processes or a larger video")
        self.sizes = split_sizes(num_tokens, self.world)

    def local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens of a tensor whose `dim` runs over all S tokens."""
        start = sum(self.sizes[: self.rank])
        return x.narrow(dim, start, self.sizes[self.rank])

    def gather(self, x: torch.Tensor, dim: int = 1, sizes: list[int] | None = None) -> torch.Tensor:
        """Every rank's part, in order, on every rank: (.., n_r, ..) -> (.., sum n, ..) along `dim`
        (`sizes`: each rank's n; default the token split)."""
        sizes = self.sizes if sizes is None else sizes
        x = x.movedim(dim, 0).contiguous()
        buf = x.new_zeros((max(sizes), *x.shape[1:]))  # gloo's all_gather wants equal sizes: pad, gather, cut
        buf[: x.shape[0]] = x
        out = [torch.empty_like(buf) for _ in range(self.world)]
        self.dist.all_gather(out, buf, group=self.group)
        return torch.cat([o[:n] for o, n in zip(out, sizes)]).movedim(0, dim)

    def _all_to_all(self, chunks: list[torch.Tensor], recv_shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Sends chunks[j] to rank j; returns what each rank sent here, shaped `recv_shapes[j]`."""
        send = torch.cat([c.reshape(-1) for c in chunks])
        recv_sizes = [int(torch.Size(s).numel()) for s in recv_shapes]
        recv = send.new_empty(sum(recv_sizes))
        self.dist.all_to_all_single(recv, send, recv_sizes, [c.numel() for c in chunks], group=self.group)
        return [r.view(s) for r, s in zip(recv.split(recv_sizes), recv_shapes)]

    def _heads(self, H: int) -> tuple[list[int], list[int]]:
        heads = split_sizes(H, self.world)
        return heads, [sum(heads[:j]) for j in range(self.world)]

    def head_range(self, H: int) -> tuple[int, int]:
        """(first head, number of heads) this rank attends over, of H."""
        heads, starts = self._heads(H)
        return starts[self.rank], heads[self.rank]

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S_r, H, Dh) this rank's tokens, every head -> (B, S, H_r, Dh) every token, this rank's heads."""
        B, _, H, Dh = x.shape
        heads, starts = self._heads(H)
        chunks = [x[:, :, s:s + h].permute(2, 0, 1, 3).contiguous() for s, h in zip(starts, heads)]
        got = self._all_to_all(chunks, [(heads[self.rank], B, n, Dh) for n in self.sizes])  # from rank j: its tokens
        return torch.cat(got, dim=2).permute(1, 2, 0, 3)  # (H_r, B, S, Dh) -> (B, S, H_r, Dh)

    def _to_tokens(self, out: torch.Tensor, H: int) -> torch.Tensor:
        """_to_heads' inverse: (B, S, H_r, Dh) -> (B, S_r, H, Dh)."""
        B, _, _, Dh = out.shape
        heads, _ = self._heads(H)
        token_starts = [sum(self.sizes[:j]) for j in range(self.world)]
        chunks = [out[:, s:s + n].permute(2, 0, 1, 3).contiguous() for s, n in zip(token_starts, self.sizes)]
        got = self._all_to_all(chunks, [(h, B, self.sizes[self.rank], Dh) for h in heads])  # from rank j: its heads
        return torch.cat(got, dim=0).permute(1, 2, 0, 3)  # (H, B, S_r, Dh) -> (B, S_r, H, Dh)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend) -> torch.Tensor:
        """`attend` (full-sequence attention of (B, S, h, Dh) q, k, v) on this rank's heads:
        q, k, v (B, S_r, H, Dh) local tokens -> (B, S_r, H, Dh)."""
        out = attend(self._to_heads(q), self._to_heads(k), self._to_heads(v))  # (B, S, H_r, Dh)
        return self._to_tokens(out, q.shape[2])

    def joint_attention(self, q, k, v, qc, kc, vc, attend) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over [video, text] with the video's tokens split and the text whole on every
        rank (HunyuanVideo): q, k, v (B, S_r, H, Dh), qc, kc, vc (B, L, H, Dh); `attend(q, k, v,
        qc, kc, vc)` on one group of heads -> (video, text) outputs. Returns (B, S_r, H, Dh) and
        (B, L, H, Dh): the text's heads all-gathered, so every rank keeps the whole text stream."""
        H = q.shape[2]
        heads, _ = self._heads(H)
        start, count = self.head_range(H)
        mine = slice(start, start + count)
        video, text = attend(self._to_heads(q), self._to_heads(k), self._to_heads(v), qc[:, :, mine], kc[:, :, mine],
                             vc[:, :, mine])
        return self._to_tokens(video, H), self.gather(text, 2, heads)


class BatchParallel(torch.nn.Module):
    """A DiT whose batch is split across the ranks (CFG-parallel): each rank runs its share of
    the samples, the velocities are gathered, every rank returns the whole batch."""

    def __init__(self, dit, group=None):
        super().__init__()
        self.dit = dit
        self.dist = _dist()
        self.group = group
        self.world, self.rank = self.dist.get_world_size(group), self.dist.get_rank(group)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["dit"], name)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **inputs) -> torch.Tensor:
        B = x.shape[0]
        sizes = split_sizes(B, self.world)
        start, n = sum(sizes[: self.rank]), sizes[self.rank]

        def mine(v):
            return v if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != B else v[start:start + n]

        if n:
            out = self.dit(mine(x), mine(t), mine(context), **{k: mine(v) for k, v in inputs.items()})
        else:  # more ranks than samples: this one only joins the gather
            out = x.new_zeros((0, self.dit.config.out_channels, *x.shape[2:]))
        buf = out.new_zeros((max(sizes), *out.shape[1:]))
        buf[:n] = out
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        self.dist.all_gather(parts, buf, group=self.group)
        return torch.cat([p[:m] for p, m in zip(parts, sizes)])


def set_parallel(dit, kind: str | None, group=None):
    """The DiT (or a TwoExpertDiT) set up for `kind` ("sequence", "cfg" or None); returns the
    module to call (a BatchParallel wrapper for "cfg")."""
    if kind is None:
        return dit
    if kind not in PARALLEL_KINDS:
        raise ValueError(f"parallel={kind!r} is not one of {', '.join(PARALLEL_KINDS)}")
    if kind == "cfg":
        return BatchParallel(dit, group)
    experts = getattr(dit, "experts", None) or (dit,)
    sp = SequenceParallel(group)
    for expert in experts:
        if not hasattr(expert, "set_sequence_parallel"):
            raise ValueError(f"parallel='sequence' is not supported for {type(expert).__name__} yet")
        expert.set_sequence_parallel(sp)
    return dit
