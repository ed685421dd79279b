"""Stage III's adversarial term (DMD2's GAN): a realism head on the fake score's trunk.

The fake score network already reads noisy samples of the student's distribution; DMD2
(Yin et al., 2024) puts a small classifier on its features and trains it, with the trunk, to
tell noised real clips from noised student samples, while the student is pushed to be taken
for real. Unlike the DMD gradient, which only says where the student's distribution differs
from the teacher's, this term compares with the data itself, so a student can be sharper than
its teacher (edges, a shape's size) where the teacher blurs.

    x_t = (1 - t) x + t eps,  t ~ U(0, t_max)              (the same noise level for real and fake)
    h = the stream after block `layer` of the fake score    (B, S, D) tokens
    logit = RealismHead(h)                                  (B, S): one verdict per token (patch)
    L_fake-score += w_d * mean(softplus(-logit(real)) + softplus(logit(student)))
    L_student    += w_g * mean(softplus(-logit(student)))  (gradient to the student's sample only)

Per-token verdicts make it a patch discriminator: each token judges its own patch in context,
which is where blur and a shrinking shape show.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RealismHead", "default_layer", "head_layer", "trunk_features", "realism_logits", "discriminator_loss",
           "generator_loss", "frozen"]


class RealismHead(nn.Module):
    """Per-token real/fake logit from trunk tokens: LayerNorm -> Linear -> SiLU -> Linear(1).

    The last layer starts at zero: every verdict starts at logit 0 (probability 1/2), so the
    term begins without a push either way."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (B, S, D) -> (B, S)
        return self.fc2(F.silu(self.fc1(self.norm(h.float())))).squeeze(-1)


def default_layer(num_blocks: int) -> int:
    """The block whose output the head reads by default: the middle one (DMD2 reads a U-Net's
    bottleneck; a DiT's middle block is its deepest mix of patch detail and global context)."""
    return (num_blocks - 1) // 2


def head_layer(num_blocks: int, layer: int | None) -> int:
    """`layer` (None: `default_layer`), checked to be one of `num_blocks` blocks."""
    layer = default_layer(num_blocks) if layer is None else layer
    if not 0 <= layer < num_blocks:
        raise ValueError(f"gan_layer {layer} is not a block of the fake score (it has {num_blocks})")
    return layer


@contextlib.contextmanager
def trunk_features(net: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every forward of `net` (a DiT) appends the token stream after its block
    `layer`, (B, S, D) fp32, to the yielded list."""
    from flgengine.model.embed import per_token

    blocks = net.blocks
    layer = head_layer(len(blocks), layer)
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, output):  # a block returns (x, (y, gate)): the stream is x + gate * y
        x, (y, gate) = output
        seen.append(x.float() + y.float() * per_token(gate).float())

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def realism_logits(run: Callable, net: nn.Module, head: nn.Module, layer: int, x: torch.Tensor, t: torch.Tensor,
                   eps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The head's per-token logits (B, S) for clips x (B, C, F, H, W) noised to t (B, 1, 1, 1, 1)
    with eps: x_t = (1 - t) x + t eps through `run` (the fake score as the stages call it, its
    condition put in), reading the tokens after `net.blocks[layer]`."""
    x_t = (1 - t) * x + t * eps
    with trunk_features(net, layer) as seen:
        run(x_t, 1000 * t.flatten(), context)
    return head(seen[-1])


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """mean softplus(-real) + mean softplus(fake): the logistic loss of telling them apart."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """mean softplus(-fake): the non-saturating generator loss (the student's samples taken for real)."""
    return F.softplus(-logits_fake).mean()


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of `modules` not requiring gradients inside the block (a forward built there
    passes gradients to its inputs only), restored after."""
    params = [p for m in modules for p in m.parameters()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, before):
            p.requires_grad_(r)
