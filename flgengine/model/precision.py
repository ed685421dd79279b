"""Precision of a DiT: "bf16" (the weights' own dtype) or "fp8" (e4m3 weights and activations).

FP8 replaces the transformer blocks' linears with `FP8Linear` and runs self-attention in FP8.
Which linears, and which attention, each block class says (`fp8_linears`, `fp8_attention`):
Wan's blocks every linear of self- and cross-attention and the FFN, and self-attention in FP8;
HunyuanVideo's dual- and single-stream blocks every linear, attention in the model's dtype.
- weights: e4m3 with one fp32 scale per output channel, stored once (no bf16 copy kept);
- activations: dynamic per-token scales, quantised once per input and shared by the linears
  that read it (self-attention's q, k, v); the adaLN / LayerNorm passes that feed the block's
  linears and the FFN's GELU emit the e4m3 activation and its scales themselves
  (`ops.adaln_modulate_fp8`, `ops.gated_residual_adaln_fp8`, `ops.gelu_fp8`): no separate
  quantisation pass, and no bf16 copy of the activation written and read back;
- GEMMs: `torch._scaled_mm` (cuBLASLt FP8 tensor cores, fast accumulation, bias fused,
  bf16 out) on GPUs of compute capability >= 8.9 where the widths are multiples of 16;
  elsewhere (the CPU, a pruned width that is not) the same numerics emulated: the e4m3
  values and scales dequantised and multiplied in fp32;
- self-attention: `ops.attention(..., precision="fp8")` (flgengine/ops/fp8.py).

Kept in their own precision (`HIGH_PRECISION`): the patch embedding, the timestep MLP and its
projection, the text projection, modulation tables, norms and the output head: small layers
whose errors every token would share.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..ops import fp8 as F8

PRECISIONS = ("bf16", "fp8")
# the block linears FP8 replaces in a Wan block (names inside it; `Block.fp8_linears`)
FP8_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
               "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.fc1", "ffn.fc2")
HIGH_PRECISION = ("patch_embed", "time_embed", "time_proj", "text_embed", "text_pool", "blocks.*.modulation",
                  "blocks.*.norm_*", "blocks.*.*_attn.norm_q", "blocks.*.*_attn.norm_k", "head")


def fp8_unavailable(device) -> str | None:
    """Why this device cannot run FP8 tensor-core products (None: it can). The CPU emulates."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return (f"precision='fp8' needs a GPU of compute capability >= 8.9 (Ada, Hopper or newer); "
                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
    return None


class QuantizedTokens:
    """An activation quantised once for several linears: x8 (M, K) e4m3, scale (M, 1) fp32,
    and the leading shape / dtype of the tensor it came from."""

    def __init__(self, x: torch.Tensor):
        self.lead, self.dtype, self.device = x.shape[:-1], x.dtype, x.device
        flat = x.reshape(-1, x.shape[-1])
        if x.device.type == "cuda":
            from ..ops.triton.quantize import quantize_tokens
            self.x8, self.scale = quantize_tokens(flat if flat.stride(-1) == 1 else flat.contiguous())
        else:
            self.x8, self.scale = F8.quantize_tokens(flat)

    @classmethod
    def of(cls, x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> "QuantizedTokens":
        """An activation a fused op quantised: x8 (..., K) e4m3, scale (..., 1) fp32; `dtype`:
        the precision the linears reading it compute their output in."""
        q = cls.__new__(cls)
        q.lead, q.dtype, q.device = x8.shape[:-1], dtype, x8.device
        q.x8, q.scale = x8.reshape(-1, x8.shape[-1]), scale.reshape(-1, 1)
        return q


class FP8Linear(nn.Module):
    """y = x W^T + b with W in e4m3 (per-output-channel scales) and x quantised per token."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=F8.E4M3, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=out_dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "FP8Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.device, lin.weight.dtype)
        m.weight, m.weight_scale = F8.quantize_weight(lin.weight.detach())
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m

    def _apply(self, fn, recurse=True):
        # dtype casts of the module (.to(dtype), DiT.cast) leave the e4m3 weight and its fp32
        # scales as they are; device moves apply to them
        weight, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        self.weight, self.weight_scale = weight.to(self.weight.device), scale.to(self.weight_scale.device)
        return self

    def _tensor_cores(self, device: torch.device) -> bool:
        return (device.type == "cuda" and self.in_features % 16 == 0 and self.out_features % 16 == 0
                and fp8_unavailable(device) is None)

    def forward(self, x: torch.Tensor | QuantizedTokens) -> torch.Tensor:
        xq = x if isinstance(x, QuantizedTokens) else QuantizedTokens(x)
        dtype = xq.dtype if xq.dtype in (torch.bfloat16, torch.float16) else torch.float32
        if self._tensor_cores(xq.device) and dtype != torch.float32:
            bias = None if self.bias is None else self.bias.to(dtype)
            y = torch._scaled_mm(xq.x8, self.weight.t(), scale_a=xq.scale, scale_b=self.weight_scale.t(), bias=bias,
                                 out_dtype=dtype, use_fast_accum=True)
        else:  # emulated: the same e4m3 values and scales, fp32 products
            w = self.weight.float() * self.weight_scale
            y = (xq.x8.float() * xq.scale) @ w.t()
            if self.bias is not None:
                y = y + self.bias.float()
        return y.to(xq.dtype).reshape(*xq.lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3"


SCALE_SUFFIX = "_scale"  # an FP8 weight "X.weight" has its per-output-channel scales in "X.weight_scale"


def fp8_weight_keys(model: nn.Module) -> frozenset[str]:
    """The state-dict keys of the weights FP8 quantises in `model` (any family; built on the
    meta device will do): each block's `fp8_linears`."""
    return frozenset(f"blocks.{i}.{name}.weight" for i, block in enumerate(model.blocks) for name in block.fp8_linears)


def quantize_state(state: dict[str, torch.Tensor], keys: frozenset[str]) -> dict[str, torch.Tensor]:
    """A DiT state dict with the weights `keys` (fp8_weight_keys) in e4m3 + fp32 scales (the
    state dict of a `to_fp8` model); weights already in e4m3 stay."""
    out = {}
    for k, v in state.items():
        if k in keys and v.dtype != F8.E4M3:
            out[k], out[k + SCALE_SUFFIX] = F8.quantize_weight(v)
        else:
            out[k] = v
    return out


def dequantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 weights of an FP8 state dict (quantize_state's inverse up to rounding)."""
    out = {}
    for k, v in state.items():
        if k.endswith("weight" + SCALE_SUFFIX):
            continue
        out[k] = v.float() * state[k + SCALE_SUFFIX] if v.dtype == F8.E4M3 else v
    return out


def check_fp8_state(state: dict[str, torch.Tensor], where: str, keys: frozenset[str]) -> str | None:
    """Why an FP8 state dict is malformed (None: it is not): every e4m3 tensor is one of the
    weights FP8 quantises (`keys`, fp8_weight_keys) with finite values and fp32 scales (rows, 1),
    finite and > 0; no scales without their weight."""
    for k, v in state.items():
        if v.dtype == F8.E4M3:
            if k not in keys:
                return f"{where}: tensor {k!r} is stored in float8_e4m3fn, which only the block linears' weights may be"
            s = state.get(k + SCALE_SUFFIX)
            if s is None:
                return f"{where}: FP8 weight {k!r} has no scales {k + SCALE_SUFFIX!r}"
            if s.dtype != torch.float32 or tuple(s.shape) != (v.shape[0], 1):
                return (f"{where}: FP8 scales {k + SCALE_SUFFIX!r} must be float32 of shape ({v.shape[0]}, 1), "
                        f"got {s.dtype} {tuple(s.shape)}")
            if not (torch.isfinite(s).all() and (s > 0).all()):
                return f"{where}: FP8 scales {k + SCALE_SUFFIX!r} hold non-finite or non-positive values"
            if not torch.isfinite(v.float()).all():
                return f"{where}: FP8 weight {k!r} holds NaN values"
        elif k.endswith("weight" + SCALE_SUFFIX):
            w = state.get(k[:-len(SCALE_SUFFIX)])
            if w is None or w.dtype != F8.E4M3:
                return f"{where}: scales {k!r} belong to no float8_e4m3fn weight"
    return None


def quantize_activation(x, linear: nn.Module):
    """x quantised once when `linear` is FP8 (for linears sharing the input), else x itself
    (an x already quantised, `QuantizedTokens`, too)."""
    return QuantizedTokens(x) if isinstance(linear, FP8Linear) and isinstance(x, torch.Tensor) else x


# ---- the fused producers of the FP8 linears' inputs ---------------------------------------------
# Each computes what the block's linear `linear` reads: for an FP8Linear the e4m3 activation and
# its per-token scales straight from the op's fp32 value (one pass, no bf16 copy), else the
# plain op's output.

def modulate_for(linear: nn.Module, x: torch.Tensor, scale, shift, eps: float):
    """ops.adaln_modulate(x, scale, shift) as `linear` reads it."""
    if isinstance(linear, FP8Linear):
        return QuantizedTokens.of(*ops.adaln_modulate_fp8(x, scale, shift, eps), x.dtype)
    return ops.adaln_modulate(x, scale, shift, eps)


def residual_modulate_for(linear: nn.Module, x: torch.Tensor, y: torch.Tensor, gate, scale, shift, eps: float):
    """ops.gated_residual_adaln(x, y, gate, scale, shift) -> (x_new, h), h as `linear` reads it."""
    if isinstance(linear, FP8Linear):
        x_new, h8, h_scale = ops.gated_residual_adaln_fp8(x, y, gate, scale, shift, eps)
        return x_new, QuantizedTokens.of(h8, h_scale, x.dtype)
    return ops.gated_residual_adaln(x, y, gate, scale, shift, eps)


def gelu_for(linear: nn.Module, h: torch.Tensor):
    """tanh GELU of the FFN's hidden layer h as its second linear `linear` reads it."""
    if isinstance(linear, FP8Linear):
        return QuantizedTokens.of(*ops.gelu_fp8(h), h.dtype)
    return nn.functional.gelu(h, approximate="tanh")


def _block_linears(model: nn.Module):
    """(block, parent module, attribute, linear) of every block linear FP8 replaces (each block's
    `fp8_linears`)."""
    for block in model.blocks:
        for name in block.fp8_linears:
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name)  # ("": the block itself)
            yield block, parent, attr, getattr(parent, attr)


def _fp8_attention(block: nn.Module, on: bool) -> None:
    """FP8 attention in `block` on / off, where its class runs one (`fp8_attention`: the
    attention submodule's name, or None)."""
    if block.fp8_attention is not None:
        block.get_submodule(block.fp8_attention).precision = "fp8" if on else None


def to_fp8(model: nn.Module) -> nn.Module:
    """Replaces the block linears (each block's `fp8_linears`) of a DiT by FP8Linear and turns
    on FP8 attention where the block has it, in place. Idempotent."""
    for block, parent, attr, lin in _block_linears(model):
        if isinstance(lin, nn.Linear):
            setattr(parent, attr, FP8Linear.from_linear(lin))
    for block in model.blocks:
        _fp8_attention(block, True)
    model.precision = "fp8"
    return model


class FakeFP8Linear(nn.Linear):
    """A Linear that computes FP8Linear's emulated numerics from its own float weight, for
    training a network for FP8 (quantisation-aware): y = (x8 * s_x) (w8 * s_w)^T + b with x8, w8
    the e4m3 roundings of x per token and of the weight per output channel. The roundings pass
    gradients straight through (a dtype cast's backward), so the float weight learns; its state
    dict is a Linear's, and `to_fp8` of the trained network computes the same function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w8, ws = F8.quantize_weight(self.weight)
        flat = x.reshape(-1, x.shape[-1])
        x8, xs = F8.quantize_tokens(flat)
        y = (x8.float() * xs) @ (w8.float() * ws).t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def fake_fp8(model: nn.Module, on: bool = True) -> nn.Module:
    """Quantisation-aware training mode, in place: the block linears (`fp8_linears`) compute
    through FakeFP8Linear (the same Parameters) and self-attention runs its FP8 numerics
    (the reference path, which passes gradients); `on=False` puts plain Linears back."""
    for block, parent, attr, lin in _block_linears(model):
        if isinstance(lin, FP8Linear):
            raise ValueError("fake_fp8 trains float weights: this model's linears are already FP8")
        new = (FakeFP8Linear if on else nn.Linear)(lin.in_features, lin.out_features, lin.bias is not None,
                                                  device="meta")
        new.weight, new.bias = lin.weight, lin.bias
        setattr(parent, attr, new)
    for block in model.blocks:
        _fp8_attention(block, on)
    return model


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """"bf16": the model as it is (its own dtype); "fp8": `to_fp8` (not reversible in place)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp8":
        return to_fp8(model)
    if getattr(model, "precision", "bf16") == "fp8":
        raise ValueError("this model's linears are already FP8; load it again for precision='bf16'")
    return model
