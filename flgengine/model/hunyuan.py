"""HunyuanVideo's transformer (diffusers `HunyuanVideoTransformer3DModel`; its config in
hunyuan_config.py), one class for teacher, student and runtime, with the DiT interface the
engine and the stages use.

    x (B, C, F, H, W) --patch_embed--> video tokens (B, S, D), S = F' * H' * W'
    t (B,) --sinusoid--> time_embed (+ guidance_embed(guidance)) + pooled_embed(pooled_text) = temb (B, D)
    context (B, L, text_dim), context_mask (B, L) --text_refiner--> text tokens (B, L', D), L' = real tokens
    blocks[:num_layers]   dual-stream: video and text keep their own weights (adaLN-zero, q/k/v,
                          FFN) and meet in one attention over [video, text]
    blocks[num_layers:]   single-stream: [video, text] as one stream, attention and MLP in parallel
    head: adaLN (scale, shift) from temb -> Linear -> unpatchify -> (B, C, F, H, W)

Every block maps (video, text) -> (video, text), so `blocks` is one list of both kinds: Stage I
skips any of them, a pruned student keeps `config.block_ids` (teacher indices over the two
kinds, dual first). RoPE (3D, `rope_axes` channels of a head per axis) rotates the video
tokens' q and k; q and k are RMSNorm'd per head.

The text mask. The reference masks padded text tokens as keys of every attention; the
tokens that are real come first, so attention over the real ones only is the same function
for the video tokens (the output). The forward therefore drops each sample's padding (samples
with different real lengths run one after another) and runs the fused attention unmasked.

Image to video (`config.image_condition`). "latent_concat" only widens the input (image latents
and a mask as channels). "token_replace" reads the image as the first latent frame: its tokens
take every block's modulation from temb at t = 0 (timestep 0 + pooled text; no guidance) instead
of temb, in the video stream of the dual-stream blocks and in the single-stream blocks (the text
tokens keep temb): the blocks then get per-token modulation, (B, S, D) instead of (B, D).

Packed text. Tools that move one text tensor around (training shards, the distillation
stages' CFG and condition dropout) pass `pack_text`'s (B, L + 1, text_dim): the Llama states
with the padding rows zeroed, then one row holding the pooled CLIP vector. Called without
`pooled_text`, the forward reads the mask (the non-zero rows) and the pooled vector off it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .embed import TimeEmbedding, per_token, rope_3d, timestep_embedding
from .hunyuan_config import HunyuanVideoConfig
from .precision import quantize_activation

__all__ = ["HunyuanVideoConfig", "HunyuanVideoDiT", "pack_text", "unpack_text"]

FREQ_DIM = 256  # sinusoid width of timesteps and guidance


# ---- pieces ------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim_in, hidden), nn.Linear(hidden, dim_out), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _modulation(linear: nn.Linear, temb: torch.Tensor, n: int, first=None) -> list[torch.Tensor]:
    """The n (B, D) modulation vectors of SiLU(temb) through `linear`; with `first` = (temb0 (B, D),
    is_first (1, S, 1) bool) ("token_replace") each becomes per token (B, S, D): temb0's where
    is_first, temb's elsewhere."""
    mods = linear(F.silu(temb)).unflatten(-1, (n, -1)).unbind(1)
    if first is None:
        return list(mods)
    temb0, is_first = first
    mods0 = linear(F.silu(temb0)).unflatten(-1, (n, -1)).unbind(1)
    return [torch.where(is_first, m0.unsqueeze(1), m.unsqueeze(1)) for m, m0 in zip(mods, mods0)]


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unflatten(-1, (n, -1))  # (B, S, H*Dh) -> (B, S, H, Dh)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, Sq, H, Dh) attention; `key_mask` (B, Skv) bool, False = a padded key no query sees
    (the "attention" text mask: standard PyTorch attention with a mask, which exporters take)."""
    if key_mask is None:
        return ops.attention(q, k, v)
    B, Sq, Skv = q.shape[0], q.shape[1], k.shape[1]
    mask = key_mask[:, None, None, :].expand(B, 1, Sq, Skv)  # every query's row spelled out (ONNX Runtime wants it)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class RefinerBlock(nn.Module):
    """The token refiner's block: pre-LayerNorm self-attention and SiLU MLP over the text,
    each residual gated per sample by temb."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dim, F.silu)
        self.gate = nn.Linear(dim, 2 * dim)  # SiLU(temb) -> (gate_attn, gate_mlp)

    def forward(self, c: torch.Tensor, temb: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        # c: (B, L, D) text tokens (real ones only, or all with key_mask (B, L)); temb: (B, D)
        gate_attn, gate_mlp = self.gate(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        h = self.norm1(c)
        a = _attention(_heads(self.q(h), self.num_heads), _heads(self.k(h), self.num_heads),
                       _heads(self.v(h), self.num_heads), key_mask)
        c = c + self.o(a.flatten(2).type_as(c)) * gate_attn
        return c + self.mlp(self.norm2(c)) * gate_mlp


class TextRefiner(nn.Module):
    """Text states (B, L, text_dim) -> (B, L, D): a projection, then refiner blocks conditioned
    on the timestep and on the mean of the text (its own temb)."""

    def __init__(self, text_dim: int, dim: int, num_heads: int, num_layers: int, mlp_ratio: float):
        super().__init__()
        self.time_embed = TimeEmbedding(FREQ_DIM, dim)
        self.pooled_embed = MLP(text_dim, dim, dim, F.silu)
        self.proj_in = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(RefinerBlock(dim, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, context: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # context: (B, L, text_dim), real tokens only (or all, with mask (B, L) bool); t: (B,)
        freq = timestep_embedding(t, FREQ_DIM).to(context.dtype)
        if mask is None:
            mean = context.mean(dim=1)
        else:  # the mean over the real tokens
            m = mask.to(context.dtype).unsqueeze(-1)
            mean = (context * m).sum(dim=1) / m.sum(dim=1)
        temb = self.time_embed(freq) + self.pooled_embed(mean)  # (B, D)
        c = self.proj_in(context)
        for block in self.blocks:
            c = block(c, temb, mask)
        return c


class JointAttention(nn.Module):
    """q, k, v of video tokens (and, in a dual-stream block, of text tokens with their own
    weights), per-head RMSNorm on q and k, RoPE on the video's, one attention over
    [video, text]."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float, text_weights: bool):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.sequence_parallel = None  # the video tokens split over ranks (flgengine.parallel), or None
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        if text_weights:
            self.add_q, self.add_k, self.add_v = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)

    def _qkv(self, x, q, k, v, norm_q, norm_k):
        H = self.num_heads
        x = quantize_activation(x, q)  # FP8 linears: x quantised once for the three
        return (ops.rms_norm(_heads(q(x), H), norm_q.weight, self.eps), ops.rms_norm(_heads(k(x), H), norm_k.weight, self.eps),
                _heads(v(x), H))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, S, D) video (this rank's S_r tokens under sequence parallel); c: (B, L, D) text
        # -> (B, S + L, H*Dh) attention output, [video, text]; key_mask: (B, S_all + L) bool or None
        S = x.shape[1]
        if hasattr(self, "add_q"):  # dual-stream: text through its own projections
            q, k, v = self._qkv(x, self.q, self.k, self.v, self.norm_q, self.norm_k)  # (B, S, H, Dh) each
            qc, kc, vc = self._qkv(c, self.add_q, self.add_k, self.add_v, self.norm_added_q, self.norm_added_k)
        else:  # single-stream: one set of projections over [video, text]
            q, k, v = self._qkv(torch.cat([x, c], 1), self.q, self.k, self.v, self.norm_q, self.norm_k)
            q, qc, k, kc, v, vc = q[:, :S], q[:, S:], k[:, :S], k[:, S:], v[:, :S], v[:, S:]
        q, k = ops.apply_rope(q, *rope), ops.apply_rope(k, *rope)  # RoPE on the video's q and k

        def attend(q, k, v, qc, kc, vc):  # [video, text] on the heads given
            out = _attention(torch.cat([q, qc], 1), torch.cat([k, kc], 1), torch.cat([v, vc], 1), key_mask)
            return out[:, :q.shape[1]], out[:, q.shape[1]:]

        if self.sequence_parallel is not None:
            video, text = self.sequence_parallel.joint_attention(q, k, v, qc, kc, vc, attend)
        else:
            video, text = attend(q, k, v, qc, kc, vc)
        return torch.cat([video, text], 1).flatten(2).type_as(x)  # (B, S + L, D)


class DualBlock(nn.Module):
    """Dual-stream block: adaLN-zero, joint attention and FFN, each with video and text weights."""

    kind = "dual"
    # what precision "fp8" quantises (model/precision.py): every linear; attention stays in the model's dtype
    fp8_linears = ("attn.q", "attn.k", "attn.v", "attn.add_q", "attn.add_k", "attn.add_v", "o", "add_o",
                   "ffn_x.fc1", "ffn_x.fc2", "ffn_c.fc1", "ffn_c.fc2")
    fp8_attention = None

    def __init__(self, dim: int, num_heads: int, head_dim: int, ffn_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.mod_x, self.mod_c = nn.Linear(dim, 6 * dim), nn.Linear(dim, 6 * dim)
        self.attn = JointAttention(dim, num_heads, head_dim, eps, text_weights=True)
        self.o, self.add_o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.ffn_x, self.ffn_c = MLP(dim, ffn_dim, dim, gelu_tanh), MLP(dim, ffn_dim, dim, gelu_tanh)

    def forward(self, x, c, temb, rope, key_mask=None, first=None):
        # x: (B, S, D) video, c: (B, L, D) text, temb: (B, D); key_mask: (B, S + L) bool or None;
        # first: ("token_replace") (temb0 (B, D), is_first (1, S, 1)): the video's modulation per token
        mx = _modulation(self.mod_x, temb, 6, first)  # shift, scale, gate (attn), shift, scale, gate (FFN)
        mc = _modulation(self.mod_c, temb, 6)  # the text's: temb alone
        S = x.shape[1]
        a = self.attn(ops.adaln_modulate(x, mx[1], mx[0], self.eps), ops.adaln_modulate(c, mc[1], mc[0], self.eps), rope,
                      key_mask)
        x, h = ops.gated_residual_adaln(x, self.o(a[:, :S]), mx[2], mx[4], mx[3], self.eps)
        c, hc = ops.gated_residual_adaln(c, self.add_o(a[:, S:]), mc[2], mc[4], mc[3], self.eps)
        return x + per_token(mx[5]) * self.ffn_x(h), c + per_token(mc[5]) * self.ffn_c(hc)


class SingleBlock(nn.Module):
    """Single-stream block over [video, text]: attention and a GELU MLP from one adaLN, their
    outputs concatenated through one projection, one gated residual."""

    kind = "single"
    fp8_linears = ("attn.q", "attn.k", "attn.v", "fc_mlp", "proj_out")  # (as DualBlock's)
    fp8_attention = None

    def __init__(self, dim: int, num_heads: int, head_dim: int, ffn_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.mod = nn.Linear(dim, 3 * dim)  # shift, scale, gate
        self.attn = JointAttention(dim, num_heads, head_dim, eps, text_weights=False)
        self.fc_mlp = nn.Linear(dim, ffn_dim)
        self.proj_out = nn.Linear(dim + ffn_dim, dim)

    def forward(self, x, c, temb, rope, key_mask=None, first=None):
        S = x.shape[1]
        if first is not None:  # "token_replace": [video, text] per token, the text tokens as the rest
            first = (first[0], torch.cat([first[1], first[1].new_zeros(1, c.shape[1], 1)], 1))
        shift, scale, gate = _modulation(self.mod, temb, 3, first)  # (B, D) each, or (B, S + L, D)
        xc = torch.cat([x, c], 1)  # (B, S + L, D)
        h = ops.adaln_modulate(xc, scale, shift, self.eps)
        a = self.attn(h[:, :S], h[:, S:], rope, key_mask)  # (B, S + L, D)
        y = self.proj_out(torch.cat([a, gelu_tanh(self.fc_mlp(h))], -1))
        xc = xc + per_token(gate) * y
        return xc[:, :S], xc[:, S:]


# ---- packed text -------------------------------------------------------------------------------

def pack_text(context: torch.Tensor, context_mask: torch.Tensor, pooled_text: torch.Tensor) -> torch.Tensor:
    """(B, L, D) states, (B, L) mask (real tokens first), (B, P) pooled, P <= D -> (B, L + 1, D):
    the states with padding rows zeroed, then [pooled, zeros]."""
    B, L, D = context.shape
    if pooled_text.shape[-1] > D:
        raise ValueError(f"pooled text of {pooled_text.shape[-1]} does not fit a row of {D}")
    rows = context * context_mask.to(context.dtype).unsqueeze(-1)  # padding rows exactly zero
    pooled = torch.nn.functional.pad(pooled_text.to(context.dtype), (0, D - pooled_text.shape[-1]))
    return torch.cat([rows, pooled.unsqueeze(1)], dim=1)


def unpack_text(packed: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pack_text's inverse: (context (B, L, D), context_mask (B, L), pooled_text (B, pooled_dim))."""
    context = packed[:, :-1]
    mask = context.abs().amax(dim=-1).gt(0).to(torch.int64)  # (B, L) 1 = a real token
    return context, mask, packed[:, -1, :pooled_dim]


# ---- the model ---------------------------------------------------------------------------------

class HunyuanVideoDiT(nn.Module):
    """forward(x, t, context, guidance=None, context_mask=None, pooled_text=None) -> velocity.

    `context`: the Llama states (B, L, text_dim) with `context_mask` (B, L) and `pooled_text`
    (B, pooled_dim), or pack_text's packed text alone; `guidance` (B,): the embedded guidance
    scale x 1000 of a guidance-distilled model."""

    def __init__(self, config: HunyuanVideoConfig):
        super().__init__()
        c = self.config = config
        D = c.dim
        self.backend: str | None = None  # preferred ops backend (ops.registry.prefer); None = automatic
        # how padded text is left out: "truncate" (each sample's real tokens only, fused attention;
        # samples of different lengths one after another) or "attention" (one batched pass with a
        # key mask in standard PyTorch attention: what engines are traced with)
        self.text_mask = "truncate"
        self.patch_embed = nn.Conv3d(c.in_channels, D, kernel_size=c.patch_size, stride=c.patch_size)
        self.time_embed = TimeEmbedding(FREQ_DIM, D)
        if c.guidance_embed:
            self.guidance_embed = TimeEmbedding(FREQ_DIM, D)
        self.pooled_embed = MLP(c.pooled_dim, D, D, F.silu)
        self.text_refiner = TextRefiner(c.text_dim, D, c.num_heads, c.num_refiner_layers, 4.0)  # 4x always, as the reference
        self.blocks = nn.ModuleList(
            (DualBlock if c.kind_of(i) == "dual" else SingleBlock)(D, c.num_heads, c.head_dim, c.ffn_dim, c.eps)
            for i in c.kept_blocks)
        self.head_mod = nn.Linear(D, 2 * D)  # SiLU(temb) -> (scale, shift)
        self.head = nn.Linear(D, c.out_channels * math.prod(c.patch_size))

    # -- inputs --------------------------------------------------------------------
    def _text(self, context, context_mask, pooled_text):
        """(context, context_mask, pooled_text), read off packed text when only context is given."""
        if pooled_text is None and context_mask is None and context.dim() == 3:
            return unpack_text(context, self.config.pooled_dim)
        return context, context_mask, pooled_text

    def check_inputs(self, x, t, context, guidance=None, context_mask=None, pooled_text=None) -> tuple[int, int, int]:
        """Validates shapes before any compute; returns the token grid (F', H', W')."""
        c = self.config
        context, context_mask, pooled_text = self._text(context, context_mask, pooled_text)
        if x.dim() != 5 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, F, H, W), got {tuple(x.shape)}")
        B = x.shape[0]
        for name, n, p in zip(("frames", "height", "width"), x.shape[2:], c.patch_size):
            if n % p:
                raise ValueError(f"latent {name} {n} is not divisible by the patch size {p} (patch_size={c.patch_size})")
        if t.dim() != 1 or t.shape[0] != B:
            raise ValueError(f"t must be ({B},), got {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[0] != B or context.shape[2] != c.text_dim:
            raise ValueError(f"context must be ({B}, L, {c.text_dim}), got {tuple(context.shape)}")
        if context_mask is not None:
            if tuple(context_mask.shape) != tuple(context.shape[:2]):
                raise ValueError(f"context_mask must be {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}")
        if context_mask is not None and not torch.compiler.is_exporting():  # a check of values: not traced
            real = context_mask.bool()
            if not real[:, 0].all() or (real[:, 1:] & ~real[:, :-1]).any():
                raise ValueError("context_mask must mark each prompt's real tokens first (1...1 0...0), "
                                 "at least one per prompt")
        if pooled_text is None or tuple(pooled_text.shape) != (B, c.pooled_dim):
            raise ValueError(f"pooled_text must be ({B}, {c.pooled_dim}) (CLIP's pooled prompt; or pass pack_text's "
                             f"packed context without context_mask and pooled_text), got "
                             f"{None if pooled_text is None else tuple(pooled_text.shape)}")
        if c.guidance_embed and (guidance is None or tuple(guidance.shape) != (B,)):
            raise ValueError(f"this model embeds the guidance scale: pass guidance of shape ({B},) (scale * 1000), "
                             f"got {None if guidance is None else tuple(guidance.shape)}")
        if not c.guidance_embed and guidance is not None:
            raise ValueError("this model takes no guidance input (config.guidance_embed is false)")
        return tuple(n // p for n, p in zip(x.shape[2:], c.patch_size))

    # -- forward -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, pooled_text: torch.Tensor | None = None) -> torch.Tensor:
        context, context_mask, pooled_text = self._text(context, context_mask, pooled_text)  # packed text?
        grid = self.check_inputs(x, t, context, guidance, context_mask, pooled_text)
        with ops.registry.prefer(self.backend):
            if self.text_mask == "attention":
                mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device) if context_mask is None \
                    else context_mask.bool()
                return self._forward(x, t, context, pooled_text, guidance, grid, mask)
            lengths = [context.shape[1]] * x.shape[0] if context_mask is None else context_mask.sum(1).tolist()
            if len(set(lengths)) == 1:  # one real text length: the batch at once
                return self._forward(x, t, context[:, :lengths[0]], pooled_text, guidance, grid)
            # the samples one by one, each with its own real text (see the module docstring)
            return torch.cat([self._forward(x[i:i + 1], t[i:i + 1], context[i:i + 1, :n], pooled_text[i:i + 1],
                                            None if guidance is None else guidance[i:i + 1], grid)
                              for i, n in enumerate(lengths)])

    def _forward(self, x, t, context, pooled_text, guidance, grid, mask=None):
        # x: (B, C, F, H, W); t: (B,) in 0..1000; context: (B, L, text_dim) real tokens only, or
        # all of them with mask (B, L) bool; pooled_text: (B, pooled_dim); guidance: (B,) or None
        c = self.config
        B = x.shape[0]
        rope = self.rope(grid, x.device)  # 2 x (S, Dh/2)
        # 1. conditioning vector: timestep (+ guidance) + pooled text -> temb (B, D)
        #    (the timestep and guidance MLPs in fp32, as `cast` keeps them; the sum in fp32, then the blocks' dtype)
        dtype = self.patch_embed.weight.dtype
        pooled = self.pooled_embed(pooled_text.to(dtype)).float()  # (B, D)
        temb = self.time_embed(timestep_embedding(t, FREQ_DIM).to(self.time_embed.fc1.weight.dtype)).float()
        if c.guidance_embed:
            g = timestep_embedding(guidance, FREQ_DIM).to(self.guidance_embed.fc1.weight.dtype)
            temb = temb + self.guidance_embed(g).float()
        temb = (temb + pooled).to(dtype)
        # 2. tokens: video (B, S, D), text (B, L, D); under sequence parallel this rank's S_r video
        #    tokens (flgengine.parallel), the text whole on every rank
        h = self.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2)
        sp = self.sequence_parallel
        if sp is not None:
            sp.begin(h.shape[1])
            h, rope = sp.local(h, 1), tuple(sp.local(r, 0) for r in rope)
        txt = self.text_refiner(context.to(dtype), t, mask)
        S_all = h.shape[1] if sp is None else sum(sp.sizes)
        first = None
        if c.image_condition == "token_replace":  # the image's tokens (first latent frame): temb at t = 0
            t0 = timestep_embedding(torch.zeros_like(t), FREQ_DIM).to(self.time_embed.fc1.weight.dtype)
            temb0 = (self.time_embed(t0).float() + pooled).to(dtype)  # (B, D)
            is_first = (torch.arange(S_all, device=x.device) < grid[1] * grid[2]).view(1, S_all, 1)
            first = (temb0, is_first if sp is None else sp.local(is_first, 1))
        # 3. blocks: dual-stream then single-stream, each (video, text) -> (video, text)
        key_mask = None if mask is None else torch.cat([mask.new_ones(B, S_all), mask], dim=1)  # (B, S + L)
        for block in self.blocks:
            h, txt = block(h, txt, temb, rope, key_mask, first)
        # 4. head: adaLN (scale, shift) -> Linear -> unpatchify (B, S, C*pt*p*p) -> (B, C, F, H, W)
        scale, shift = self.head_mod(F.silu(temb)).chunk(2, dim=-1)
        out = self.head(ops.adaln_modulate(h, scale, shift, c.eps))
        if sp is not None:
            out = sp.gather(out, 1)  # (B, S, C*pt*p*p) on every rank
        pt, ph, pw = c.patch_size
        out = out.reshape(B, *grid, c.out_channels, pt, ph, pw)
        out = out.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, F', pt, H', ph, W', pw)
        return out.reshape(B, c.out_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3D RoPE tables (cos, sin), (S, head_dim / 2) each, of a token grid (cached)."""
        c = self.config
        return rope_3d(c.head_dim, grid, c.rope_theta, c.rope_max_seq_len, device, c.rope_axes)

    @property
    def sequence_parallel(self):
        return self.__dict__.get("_sequence_parallel")

    def set_sequence_parallel(self, sp) -> None:
        """Runs the forward on this rank's share of the video tokens (flgengine.parallel), the
        text whole on every rank; None: all of them."""
        self.__dict__["_sequence_parallel"] = sp
        for block in self.blocks:
            block.attn.sequence_parallel = sp

    sparse = block_mask = None  # self-attention is dense
    sparse_patterns = False  # block-sparse patterns are not built for this family (Wan's DiT: True)

    def set_attention(self, attention) -> None:
        """Block-sparse patterns (Wan's `DiT.set_attention`) are not built for this family: its
        joint attention over [video, text] runs dense. A dense pattern (None, "dense") is accepted."""
        kind = attention.get("kind") if isinstance(attention, dict) else getattr(attention, "kind", attention)
        if kind not in (None, "dense"):
            raise ValueError(f"attention kind {kind!r}: block-sparse attention is built for the Wan family; "
                             "HunyuanVideo's joint attention runs dense")

    # the shortest packed text an engine takes: two tokens and the pooled row (torch.export treats
    # a text of one token, a dim of size 1, as a special case it will not trace)
    min_text_len = 3

    def engine_inputs(self, image_len: int | None = None) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """Inputs an engine of this DiT takes after (x, t, context): (name, per-sample shape,
        "engine" or "float32" dtype). The context is the packed text."""
        if image_len is not None:
            raise ValueError("a HunyuanVideo DiT reads no image tokens (image_len)")
        return (("guidance", (), "float32"),) if self.config.guidance_embed else ()

    # -- utilities -------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def cast(self, dtype: torch.dtype) -> "HunyuanVideoDiT":
        """Casts weights to `dtype`, keeping the timestep / guidance MLPs in fp32."""
        self.to(dtype)
        self.time_embed.float()
        if self.config.guidance_embed:
            self.guidance_embed.float()
        return self
