"""Triton kernels (backend "triton"): one module per op, each with its kernel, launcher and
`why_not`; this package wraps them as torch.library custom ops and registers them.

Triton is optional and imported lazily: importing this package (hence `flgengine`) never
imports triton. The ops are always registered; their `why_not` says why they cannot run
(triton not importable; tensors not on CUDA and TRITON_INTERPRET unset; inputs that require
grad; unsupported dtype / shape), so an explicit `backend="triton"` fails with that reason and
an automatic pick falls back. CPU tensors run in Triton's interpreter when TRITON_INTERPRET=1
(slow: tests only).

Each op is a `torch.library.custom_op` ("flgengine::<op>_triton") with a fake (meta)
implementation, so torch.compile / torch.export trace around the kernel launch.
"""

from __future__ import annotations

import torch

from . import _common

OPS = ("adaln_modulate", "gated_residual_adaln", "qk_norm_rope", "attention",
       "adaln_modulate_fp8", "gated_residual_adaln_fp8", "gelu_fp8")


def _module(op: str):
    """The op's kernel module (imports triton on first use). Import statements, not
    importlib: torch.compile traces through `why_not` and refuses importlib calls.
    An op's FP8-out variant (`<op>_fp8`) lives in the op's module."""
    if op in ("adaln_modulate", "adaln_modulate_fp8"):
        from . import adaln_modulate as module
    elif op in ("gated_residual_adaln", "gated_residual_adaln_fp8"):
        from . import gated_residual_adaln as module
    elif op == "gelu_fp8":
        from . import quantize as module
    elif op == "qk_norm_rope":
        from . import qk_norm_rope as module
    elif op == "attention":
        from . import attention as module
    else:
        raise ValueError(f"unknown Triton op {op!r}; known: {', '.join(OPS)}")
    return module


def _why_not(op: str):
    def why_not(*tensors) -> str | None:
        # device / import / grad first: CPU tensors without the interpreter never import triton
        reason = _common.runtime_reason(tensors)
        return reason if reason is not None else _module(op).why_not(*tensors)

    why_not.__name__ = f"{op}_why_not"
    return why_not


# ---- custom ops: eager calls launch the kernel, fake tensors get the output shapes ----------
# (named <op>_triton: the plain names are the kernel submodules once those are imported)

@torch.library.custom_op("flgengine::adaln_modulate_triton", mutates_args=())
def adaln_modulate_triton(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    return _module("adaln_modulate").adaln_modulate(x, scale, shift, eps)


@adaln_modulate_triton.register_fake
def _(x, scale, shift, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("flgengine::gated_residual_adaln_triton", mutates_args=())
def gated_residual_adaln_triton(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                                shift: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _module("gated_residual_adaln").gated_residual_adaln(x, y, gate, scale, shift, eps)


@gated_residual_adaln_triton.register_fake
def _(x, y, gate, scale, shift, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("flgengine::qk_norm_rope_triton", mutates_args=())
def qk_norm_rope_triton(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _module("qk_norm_rope").qk_norm_rope(q, k, q_weight, k_weight, cos, sin, num_heads, eps)


@qk_norm_rope_triton.register_fake
def _(q, k, q_weight, k_weight, cos, sin, num_heads, eps):
    B, S, N = q.shape
    shape = (B, S, num_heads, N // num_heads)
    return q.new_empty(shape), q.new_empty(shape)


@torch.library.custom_op("flgengine::attention_triton", mutates_args=())
def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _module("attention").attention(q, k, v)


@attention_triton.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


@torch.library.custom_op("flgengine::adaln_modulate_fp8_triton", mutates_args=())
def adaln_modulate_fp8_triton(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _module("adaln_modulate").adaln_modulate_fp8(x, scale, shift, eps)


def _fp8_tokens_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs' shapes of an FP8-out op: e4m3 like x, fp32 scales (..., 1)."""
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@adaln_modulate_fp8_triton.register_fake
def _(x, scale, shift, eps):
    return _fp8_tokens_fake(x)


@torch.library.custom_op("flgengine::gated_residual_adaln_fp8_triton", mutates_args=())
def gated_residual_adaln_fp8_triton(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                                    shift: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _module("gated_residual_adaln").gated_residual_adaln_fp8(x, y, gate, scale, shift, eps)


@gated_residual_adaln_fp8_triton.register_fake
def _(x, y, gate, scale, shift, eps):
    return (x.new_empty(x.shape), *_fp8_tokens_fake(x))


@torch.library.custom_op("flgengine::gelu_fp8_triton", mutates_args=())
def gelu_fp8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _module("gelu_fp8").gelu_fp8(x)


@gelu_fp8_triton.register_fake
def _(x):
    return _fp8_tokens_fake(x)


def attention_ext(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask=None, precision=None) -> torch.Tensor:
    """Block-sparse and / or FP8 attention (eager only: a BlockMask is no custom-op argument)."""
    return _module("attention").attention(q, k, v, block_mask=block_mask, precision=precision)


def _attention_ext_why_not(q, k, v, block_mask=None, precision=None) -> str | None:
    reason = _common.runtime_reason((q, k, v))
    return reason if reason is not None else _module("attention").why_not(q, k, v, block_mask, precision)


def register(registry) -> None:
    """Registers the ops as backend "triton" (their why_not decides per call). Attention
    serves explicit requests only: on an H100 it ran at 0.52-0.83x torch SDPA (bench/RESULTS.md
    2026-11-27), so the automatic pick keeps SDPA."""
    for op in OPS:
        registry.register(op, "triton", globals()[f"{op}_triton"], _why_not(op), auto=op != "attention")
    registry.register("attention_ext", "triton", attention_ext, _attention_ext_why_not)
