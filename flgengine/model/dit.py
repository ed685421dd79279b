"""The DiT: Wan2.1 transformer architecture, one class for teacher, student and runtime.

    x (B, C, F, H, W) --patch_embed--> tokens (B, S, D), S = F' * H' * W'
    t (B,) --sinusoid--> time_embed --> temb (B, D) [+ text_pool(mean text), optional] --SiLU, time_proj--> (B, 6, D)
    context (B, L, text_dim) --text_embed--> (B, L, D)
    [image_context (B, Li, image_dim) --image_embed--> (B, Li, D): Wan2.1-I2V, ModelConfig.image_dim]
    per block: adaLN(self-attn with q/k RMSNorm + 3D RoPE) -> cross-attn [+ image cross-attn] -> adaLN(FFN)
    head: adaLN with (shift, scale) from temb -> Linear -> unpatchify -> (B, C, F, H, W)
    [+ c_skip(t) * x, optional: ModelConfig.velocity_skip]
    [or the output is x0_hat and v = (x - x0_hat) / max(t, floor): ModelConfig.x0_prediction]

A pruned student is this class with fewer blocks (`config.block_ids`) and possibly
fewer heads / a narrower FFN per block. Modulation math runs in fp32. Ops that get
fused kernels go through `flgengine.ops` with the model's `backend`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import ops
from ..config import ModelConfig
from .embed import ImageEmbedding, TextProjection, TimeEmbedding, mean_text, per_token, rope_3d, timestep_embedding
from .precision import FP8_LINEARS, gelu_for, modulate_for, quantize_activation, residual_modulate_for
from .sparsity import SparsePattern


class Attention(nn.Module):
    """Multi-head attention with RMSNorm on q and k across all heads (Wan `rms_norm_across_heads`)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float, image_kv: bool = False):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.eps = num_heads, head_dim, eps
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.o = nn.Linear(inner, dim)
        self.norm_q = nn.RMSNorm(inner, eps=eps)
        self.norm_k = nn.RMSNorm(inner, eps=eps)
        if image_kv:  # Wan2.1-I2V cross-attention: the image tokens get their own K / V (and k norm)
            self.add_k = nn.Linear(dim, inner)
            self.add_v = nn.Linear(dim, inner)
            self.norm_added_k = nn.RMSNorm(inner, eps=eps)
        self.precision: str | None = None  # "fp8": attention in FP8 (model.precision.to_fp8)
        self.sequence_parallel = None  # self-attention over ranks' tokens (flgengine.parallel), or None

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, rope=None, block_mask=None,
                image: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, S, D); kv: (B, L, D) for cross-attention, else x. FP8 linears read an input
        # quantised once (x for q, k, v in self-attention; x for q and kv for k, v in cross)
        split = (self.num_heads, self.head_dim)
        xq = quantize_activation(x, self.q)
        kvq = xq if kv is None else quantize_activation(kv, self.k)
        if rope is not None:  # self-attention: q/k RMSNorm + RoPE in one op -> (B, S, H, Dh) each
            q, k = ops.qk_norm_rope(self.q(xq), self.k(xq), self.norm_q.weight, self.norm_k.weight, *rope,
                                    self.num_heads, self.eps)
        else:  # cross-attention: q (B, S, H, Dh), k (B, L, H, Dh), no RoPE
            q = ops.rms_norm(self.q(xq), self.norm_q.weight, self.eps).unflatten(-1, split)
            k = ops.rms_norm(self.k(kvq), self.norm_k.weight, self.eps).unflatten(-1, split)
        v = self.v(kvq).unflatten(-1, split)  # (B, L, H, Dh)
        if self.sequence_parallel is not None and kv is None:  # this rank's tokens: all-to-all over heads
            sp = self.sequence_parallel
            mask = None if block_mask is None else block_mask.select_heads(*sp.head_range(self.num_heads))
            out = sp.attention(q, k, v, lambda *qkv: ops.attention(*qkv) if mask is None and self.precision is None
                               else ops.attention(*qkv, block_mask=mask, precision=self.precision))
        elif block_mask is None and self.precision is None:
            out = ops.attention(q, k, v)  # (B, S, H, Dh)
        else:
            out = ops.attention(q, k, v, block_mask=block_mask, precision=self.precision)
        if image is not None:  # + attention of the same queries over the image tokens (B, Li, D)
            k_img = ops.rms_norm(self.add_k(image), self.norm_added_k.weight, self.eps).unflatten(-1, split)
            out = out + ops.attention(q, k_img, self.add_v(image).unflatten(-1, split))
        return self.o(out.flatten(2).to(x.dtype))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_for(self.fc2, self.fc1(x)))  # (an FP8 fc2 reads the GELU quantised in its pass)


class Block(nn.Module):
    """One Wan transformer block; `num_heads` and `ffn_dim` may be pruned below the teacher's."""

    fp8_linears = FP8_LINEARS  # what precision "fp8" quantises (model/precision.py), and its FP8 attention
    fp8_attention = "self_attn"

    def __init__(self, dim: int, num_heads: int, head_dim: int, ffn_dim: int, cross_attn_norm: bool, eps: float,
                 image_kv: bool = False):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(6, dim) / dim**0.5)  # + temb -> 6 x (B, D)
        self.self_attn = Attention(dim, num_heads, head_dim, eps)
        self.norm_cross = nn.LayerNorm(dim, eps=eps) if cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, num_heads, head_dim, eps, image_kv=image_kv)
        self.ffn = FeedForward(dim, ffn_dim)

    def forward(self, x, context, t_mod, rope, pending=None, block_mask=None, image=None):
        """x: (B, S, D); context: (B, L, D); t_mod: (B, 6, D) or (B, S, 6, D) fp32;
        image: the embedded image tokens (B, Li, D) of an image-conditioned model, or None;
        pending: the previous block's FFN residual (y, gate) not yet in x, or None;
        block_mask: self-attention's tiles (block-sparse attention), or None (dense).

        Returns (x, pending): the stream and this block's own FFN residual, left for the
        next consumer (the next block or the head) to add in the same pass as its adaLN.
        The stream is x + gate * y in either form: one pass over it less per block."""
        mod = self.modulation.float() + t_mod
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.unbind(dim=-2)  # each (B, D) or (B, S, D)
        B, D = x.shape[0], x.shape[-1]
        # 1. self-attention on the modulated stream (the previous block's x += gate * y fused in)
        #    (each h is made as the linears reading it take it: e4m3 + per-token scales for FP8 ones)
        if pending is None:
            h = modulate_for(self.self_attn.q, x, scale_sa, shift_sa, self.eps)
        else:
            x, h = residual_modulate_for(self.self_attn.q, x, *pending, scale_sa, shift_sa, self.eps)
        y = self.self_attn(h, rope=rope, block_mask=block_mask)
        # 2. x += gate_sa * y (fp32), fused with the cross-attention's LayerNorm: an affine
        #    LayerNorm is adaLN with scale = weight - 1 and shift = bias, the same for every sample
        if isinstance(self.norm_cross, nn.LayerNorm):
            w, b = self.norm_cross.weight.float(), self.norm_cross.bias.float()
            x, h = residual_modulate_for(self.cross_attn.q, x, y, gate_sa, (w - 1).expand(B, D), b.expand(B, D),
                                         self.eps)
        else:
            x = h = (x.float() + y.float() * per_token(gate_sa)).type_as(x)
        # 3. cross-attention to the text (+ to the image tokens); x += y (gate 1), fused with the FFN's adaLN
        y = self.cross_attn(h, kv=context, image=image)
        one = torch.ones(1, D, dtype=torch.float32, device=x.device).expand(B, D)
        x, h = residual_modulate_for(self.ffn.fc1, x, y, one, scale_ff, shift_ff, self.eps)
        # 4. feed-forward; its gated residual x += gate_ff * y is pending
        return x, (self.ffn(h), gate_ff)


class Head(nn.Module):
    """Output: adaLN with (shift, scale) = modulation + temb, then a Linear to patch pixels."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj = nn.Linear(dim, out_features)

    def forward(self, x, temb, pending=None):
        # x: (B, S, D); temb: (B, D) or (B, S, D); pending: the last block's (y, gate) or None
        mod = self.modulation.float() + temb.float().unsqueeze(-2)  # (B, 2, D) or (B, S, 2, D)
        shift, scale = mod.unbind(dim=-2)
        if pending is None:
            return self.proj(ops.adaln_modulate(x, scale, shift, self.eps))
        return self.proj(ops.gated_residual_adaln(x, *pending, scale, shift, self.eps)[1])


def velocity_skip(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """c_skip(t) of ModelConfig.velocity_skip for timesteps t (0..1000): the least-squares
    linear prediction of v = eps - x0 from x_t = (1 - s) x0 + s eps, s = t / 1000, for data
    of std sigma_data. (B,) fp32."""
    s, sd2 = t.float() / 1000.0, sigma_data**2
    return (s - (1 - s) * sd2) / ((1 - s) ** 2 * sd2 + s**2)


class DiT(nn.Module):
    """Wan2.1-architecture video DiT. forward(x, t, context[, image_context]) -> velocity, shaped like x."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        D = c.dim
        self.backend: str | None = None  # preferred ops backend (ops.registry.prefer); None = automatic
        self.precision = "bf16"  # or "fp8": model.precision.set_precision
        # self-attention's pattern from config.attention (tile-major tokens + block mask), or None
        self.sparse: SparsePattern | None = None
        self.set_attention(c.attention)
        # a block mask over row-major tokens, for experiments: a BlockMask or a function of the
        # token grid (F', H', W') returning one; used when config.attention is dense
        self.block_mask = None
        self.patch_embed = nn.Conv3d(c.in_channels, D, kernel_size=c.patch_size, stride=c.patch_size)
        if c.pos_embed and c.pos_grid:  # one vector per (frame, row, column), not in Wan: see ModelConfig
            self.pos_table = nn.Parameter(torch.randn(*c.pos_grid, D) * 0.02)
        elif c.pos_embed:  # absolute positions frame + row + column, not in Wan
            self.pos_frame, self.pos_row, self.pos_col = (
                nn.Parameter(torch.randn(c.rope_max_seq_len, D) * 0.02) for _ in range(3))
        self.time_embed = TimeEmbedding(c.freq_dim, D)
        self.time_proj = nn.Linear(D, 6 * D)
        self.text_embed = TextProjection(c.text_dim, D)
        if c.image_dim:  # Wan2.1-I2V: CLIP image tokens -> (B, Li, D), read by every cross-attention
            self.image_embed = ImageEmbedding(c.image_dim, D)
        if c.pooled_text:  # pooled prompt -> temb, not in Wan: see ModelConfig
            self.text_pool = TextProjection(c.text_dim, D)
        self.blocks = nn.ModuleList(
            Block(D, c.heads_of(i), c.head_dim, c.ffn_of(i), c.cross_attn_norm, c.eps, image_kv=c.image_dim is not None)
            for i in range(len(c.kept_blocks))
        )
        self.head = Head(D, c.out_channels * math.prod(c.patch_size), c.eps)

    sparse_patterns = True  # block-sparse self-attention patterns (`set_attention`) are built for this family

    def set_attention(self, attention) -> None:
        """Sets self-attention's pattern (an AttentionConfig, its dict, or None = dense) and
        records it in `config.attention`: a dense student run sparse without training, say."""
        from ..config import AttentionConfig, dataclass_from_dict

        if isinstance(attention, dict):
            attention = dataclass_from_dict(AttentionConfig, attention, "attention")
        if attention is not None and not isinstance(attention, AttentionConfig):
            raise ValueError(f"attention must be an AttentionConfig, a dict or None, got {type(attention).__name__}")
        if attention is not None and attention.kind == "per_head" and len(attention.head_windows) != self.config.num_heads:
            raise ValueError(f"attention.head_windows lists {len(attention.head_windows)} windows for "
                             f"{self.config.num_heads} heads")
        self.config.attention = attention
        self.sparse = None if attention is None or attention.kind == "dense" else SparsePattern(attention, self.config.num_heads)

    # -- inputs --------------------------------------------------------------------
    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                     image_context: torch.Tensor | None = None) -> tuple[int, int, int]:
        """Validates shapes before any compute; returns the token grid (F', H', W')."""
        c = self.config
        if x.dim() != 5 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, F, H, W), got {tuple(x.shape)}")
        B, _, F, H, W = x.shape
        for name, n, p in zip(("frames", "height", "width"), (F, H, W), c.patch_size):
            if n % p:
                raise ValueError(f"latent {name} {n} is not divisible by the patch size {p} (patch_size={c.patch_size})")
        grid = (F // c.patch_size[0], H // c.patch_size[1], W // c.patch_size[2])
        S = math.prod(grid)
        if c.pos_grid and any(n > m for n, m in zip(grid, c.pos_grid)):
            raise ValueError(f"token grid {grid} is larger than this model's position table pos_grid={c.pos_grid}; "
                             f"it was trained for at most {c.pos_grid[0] * c.patch_size[0]} frames x "
                             f"{c.pos_grid[1] * c.patch_size[1]} x {c.pos_grid[2] * c.patch_size[2]} (latent)")
        if t.dim() == 0:
            raise ValueError("t must be (B,) or (B, S), got a scalar; use t.expand(B)")
        if t.shape[0] != B or t.dim() > 2 or (t.dim() == 2 and t.shape[1] != S):
            raise ValueError(f"t must be ({B},) or ({B}, {S}) (one per token), got {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[0] != B or context.shape[2] != c.text_dim:
            raise ValueError(f"context must be ({B}, L, {c.text_dim}), got {tuple(context.shape)}")
        if c.image_dim is None and image_context is not None:
            raise ValueError("this model takes no image tokens (config.image_dim is null); pass image_context=None")
        if c.image_dim is not None:
            if image_context is None:
                raise ValueError(f"this model reads CLIP image tokens: pass image_context of shape ({B}, Li, {c.image_dim})")
            if image_context.dim() != 3 or image_context.shape[0] != B or image_context.shape[2] != c.image_dim:
                raise ValueError(f"image_context must be ({B}, Li, {c.image_dim}), got {tuple(image_context.shape)}")
        return grid

    # -- forward -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                image_context: torch.Tensor | None = None) -> torch.Tensor:
        with ops.registry.prefer(self.backend):
            return self._forward(x, t, context, image_context)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 image_context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, F, H, W); t: (B,) or (B, S) in timestep units; context: (B, L, text_dim);
        # image_context: (B, Li, image_dim) CLIP image tokens of a Wan2.1-I2V model, else None
        c = self.config
        grid = self.check_inputs(x, t, context, image_context)
        B, S = x.shape[0], math.prod(grid)
        rope = self.rope(grid, x.device)  # 2 x (S, Dh/2)

        # self-attention's pattern: tokens in tile-major order (perm), back at the end (inv)
        perm = inv = None
        block_mask = self.block_mask(grid) if callable(self.block_mask) else self.block_mask
        if self.sparse is not None:
            perm, inv, block_mask = self.sparse.for_grid(grid, x.device)
            rope = tuple(r[perm] for r in rope)  # positions follow the tokens

        sp = self.sequence_parallel  # several ranks, each with its own S_r of the S tokens (flgengine.parallel)
        if sp is not None:  # (tokens split after the tile-major order: each rank's share is a run of tiles)
            sp.begin(S)
            rope = tuple(sp.local(r, 0) for r in rope)

        # 1. patchify: (B, C, F, H, W) -> (B, S, D)
        h = self.patch_embed(x).flatten(2).transpose(1, 2).contiguous()
        if c.pos_embed:  # + pos_table[f, i, j], or pos_frame[f] + pos_row[i] + pos_col[j], for token (f, i, j)
            f, hh, w = grid
            if c.pos_grid:
                pos = self.pos_table[:f, :hh, :w]
            else:
                pos = self.pos_frame[:f, None, None] + self.pos_row[None, :hh, None] + self.pos_col[None, None, :w]
            h = h + pos.reshape(S, c.dim).to(h.dtype)
        if perm is not None:
            h = h[:, perm]
        if sp is not None:
            h = sp.local(h, 1)  # (B, S_r, D)

        # 2. timestep: temb (B, D) [or (B, S, D)], t_mod (B, 6, D) [or (B, S, 6, D)] fp32
        freq = timestep_embedding(t.flatten(), c.freq_dim).to(self.time_embed.fc1.weight.dtype)
        temb = self.time_embed(freq).type_as(context)  # (B*, D)
        if t.dim() == 2:
            temb = temb.unflatten(0, (B, S))
            if perm is not None:
                temb = temb[:, perm]
        if c.pooled_text:  # + MLP(mean of the prompt's real text states)
            pooled = self.text_pool(mean_text(context).to(self.text_pool.fc1.weight.dtype)).type_as(temb)  # (B, D)
            temb = temb + (pooled if t.dim() == 1 else pooled.unsqueeze(1))
        if sp is not None and temb.dim() == 3:
            temb = sp.local(temb, 1)  # per-token: this rank's tokens
        t_mod = self.time_proj(nn.functional.silu(temb)).unflatten(-1, (6, c.dim)).float()

        # 3. text: (B, L, text_dim) -> (B, L, D); image tokens: (B, Li, image_dim) -> (B, Li, D)
        ctx = self.text_embed(context)
        img = self.image_embed(image_context).type_as(ctx) if image_context is not None else None

        # 4. blocks; each block's FFN residual is added by the next one, fused with its adaLN
        pending = None
        for block in self.blocks:
            h, pending = block(h, ctx, t_mod, rope, pending, block_mask=block_mask, image=img)

        # 5. head (the last FFN residual fused with its adaLN) and unpatchify:
        #    (B, S, C*pt*ph*pw) -> (B, C, F, H, W)
        out = self.head(h, temb, pending)
        if sp is not None:
            out = sp.gather(out, 1)  # (B, S, C*pt*ph*pw) on every rank
        if inv is not None:
            out = out[:, inv]  # back to row-major tokens
        pt, ph, pw = c.patch_size
        out = out.reshape(B, *grid, pt, ph, pw, c.out_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F', pt, H', ph, W', pw)
        out = out.reshape(B, c.out_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)
        x_t = x[:, :c.out_channels]  # the noisy sample (an image "concat" DiT reads conditioning channels after it)
        if c.velocity_skip:  # + c_skip(t) x: the network predicts only what the input does not carry
            out = out + self._per_position(velocity_skip(t, c.velocity_skip), grid).to(out.dtype) * x_t
        if c.x0_prediction:  # out is x0_hat: the velocity it implies, v = (x_t - x0_hat) / t
            sigma = self._per_position((t.float() / 1000.0).clamp(min=c.x0_prediction), grid)
            out = ((x_t.float() - out.float()) / sigma).to(out.dtype)
        return out

    def _per_position(self, v: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """A per-sample (B,) or per-token (B, S) quantity as (B, 1, F, H, W)-broadcastable: one
        value per sample, or each token's value over the latent positions of its patch."""
        if v.dim() == 1:
            return v.view(-1, 1, 1, 1, 1)
        pt, ph, pw = self.config.patch_size
        v = v.view(v.shape[0], 1, *grid)  # (B, 1, F', H', W') in row-major token order
        return v.repeat_interleave(pt, 2).repeat_interleave(ph, 3).repeat_interleave(pw, 4)

    def rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3D RoPE tables (cos, sin), (S, head_dim / 2) each, of a token grid (cached)."""
        c = self.config
        return rope_3d(c.head_dim, grid, c.rope_theta, c.rope_max_seq_len, device)

    @property
    def sequence_parallel(self):
        return self.__dict__.get("_sequence_parallel")

    def set_sequence_parallel(self, sp) -> None:
        """Runs the forward on this rank's share of the tokens (`flgengine.parallel.SequenceParallel`),
        or on all of them (None)."""
        self.__dict__["_sequence_parallel"] = sp
        for block in self.blocks:
            block.self_attn.sequence_parallel = sp

    def engine_inputs(self, image_len: int | None = None) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """Inputs an engine of this DiT takes after (x, t, context): (name, per-sample shape,
        "engine" or "float32" dtype): a Wan2.1-I2V DiT's `image_len` CLIP image tokens."""
        c = self.config
        if c.image_dim is None:
            return ()
        if not (isinstance(image_len, int) and image_len > 0):
            raise ValueError(f"this DiT reads CLIP image tokens (image_dim {c.image_dim}): give their count "
                             f"(--image-len; Wan2.1-I2V's CLIP gives 257), got {image_len!r}")
        return (("image_context", (image_len, c.image_dim), "engine"),)

    # -- utilities -------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def cast(self, dtype: torch.dtype) -> "DiT":
        """Casts weights to `dtype`, keeping the timestep MLP, modulation tables and the
        cross-attention norm in fp32 (as Wan does)."""
        self.to(dtype)
        self.time_embed.float()
        if self.config.pooled_text:
            self.text_pool.float()
        for block in self.blocks:
            block.modulation.data = block.modulation.data.float()
            block.norm_cross.float()
        self.head.modulation.data = self.head.modulation.data.float()
        return self
