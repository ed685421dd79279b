"""The `_C` ops (backends "cpu" and "cuda") as torch custom ops.

`_C` does not link libtorch. Each op crosses the boundary as keyword arguments: tensors as
views `(data_ptr, dtype code, device code, sizes, strides)`, scalars as numbers, and on
CUDA the current stream. The names are those of the op's params struct in
`csrc/include/flg/<op>.h`; `_C` converts and checks every view once, then the op's
launcher checks shapes, dtypes and layouts. A name missing, extra or misspelt is an error,
so arguments cannot be swapped silently.

An op here is one spec: `why_not(backend, *inputs)` (why the backend cannot serve the
inputs: the registry asks before dispatch) and a function decorated with `@native_op`
that prepares the inputs, allocates the outputs and calls `launch`. The decorator makes
it a `torch.library.custom_op` with a fake implementation, so torch.compile and
torch.export trace around it, and `register` enters it for "cpu" and "cuda".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

try:  # the extension is optional at import time: the reference backend always works
    from flgengine import _C
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the install
    _C = None
    _IMPORT_ERROR = f"flgengine._C is not built ({e}); reinstall with `make build` or `pip install -e .`"

# dtype and device codes shared with csrc/include/flg/common.h (DType) and flg/tensor.h (Device)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DEVICE_CODES = {"cpu": 0, "cuda": 1}

# Limits of the CUDA kernels (mirrored from csrc/include/flg/<op>.h and cuda_common.cuh).
CUDA_GATED_MAX_DIM = 32768      # gated_residual_adaln keeps the x_new row in shared memory
CUDA_ATTENTION_MAX_HEAD_DIM = 256
_MAX_ROWS = 2**31 - 1           # one CUDA block per row (grid x)


def build_info() -> dict:
    """What the native build holds (cuda, cuda_archs, backends, ops); empty backends if unbuilt."""
    if _C is None:
        return {"cuda": False, "cuda_archs": "", "cuda_devices": 0, "ops": [], "backends": [], "error": _IMPORT_ERROR}
    return dict(_C.build_info())


# ---- the boundary ------------------------------------------------------------------------

def view(t: torch.Tensor) -> tuple:
    """The tensor view `_C` takes: (data_ptr, dtype code, device code, sizes, element strides)."""
    return t.data_ptr(), DTYPE_CODES[t.dtype], DEVICE_CODES[t.device.type], tuple(t.shape), t.stride()


def launch(op: str, **args) -> None:
    """Runs `_C.<op>_cpu` or `_C.<op>_cuda` (on the device's current stream); tensor arguments go as views."""
    device = next(a.device for a in args.values() if isinstance(a, torch.Tensor))
    views = {name: view(a) if isinstance(a, torch.Tensor) else a for name, a in args.items()}
    if device.type == "cuda":
        with torch.cuda.device(device):
            getattr(_C, f"{op}_cuda")(torch.cuda.current_stream(device).cuda_stream, **views)
    else:
        getattr(_C, f"{op}_cpu")(**views)


@dataclass(frozen=True)
class NativeOp:
    name: str
    run: Callable                       # the torch custom op
    why_not: Callable[..., str | None]  # why_not(backend, *inputs) -> reason or None
    auto: bool = True                   # False: explicit requests only (see registry.register)


OPS: dict[str, NativeOp] = {}


def native_op(name: str, *, why_not: Callable[..., str | None], fake: Callable, auto: bool = True):
    """Declares the `_C` op `name`: the decorated function becomes the custom op
    `flgengine::<name>_native` with `fake` as its fake implementation, served by "cpu" and "cuda"."""
    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"flgengine::{name}_native", mutates_args=())(fn)
        op.register_fake(fake)
        OPS[name] = NativeOp(name, eager_or_traced(fn, op), why_not, auto)
        return op
    return wrap


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_or_traced(fn: Callable, op: Callable) -> Callable:
    """Runs `fn` itself on plain tensors in eager mode, the custom op `op` otherwise (torch.compile,
    torch.export, FX tracing: anything that must see the op). The custom op's eager dispatch
    imports torch._dynamo on its first call (a second of a small model's cold start); the result
    is the same."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    def run(*args):
        if (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
                or any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN for a in args)):
            return op(*args)
        return fn(*args)

    run.__name__ = getattr(fn, "__name__", "run")
    return run


def register(registry) -> None:
    """Registers every `_C` op as backends "cpu" and "cuda"."""
    def for_backend(why_not, backend):
        return lambda *inputs: why_not(backend, *inputs)

    for op in OPS.values():
        for backend in ("cpu", "cuda"):
            registry.register(op.name, backend, op.run, for_backend(op.why_not, backend), auto=op.auto)


# ---- shared input checks and preparation ---------------------------------------------------

def _why_not_device(backend: str, device: torch.device) -> str | None:
    if _C is None:
        return _IMPORT_ERROR
    if backend == "cpu":
        return None if device.type == "cpu" else f"tensors are on {device}, the cpu backend needs CPU tensors"
    if not build_info()["cuda"]:
        return "flgengine._C was built without CUDA (no CUDA compiler at build time)"
    if device.type != "cuda":
        return f"tensors are on {device}, the cuda backend needs CUDA tensors"
    return None


def _why_not_common(backend: str, tensors: dict[str, torch.Tensor], dtype_of: torch.Tensor) -> str | None:
    """Device, grad and dtype reasons shared by the ops; `tensors` maps names to inputs."""
    first = next(iter(tensors.values()))
    reason = _why_not_device(backend, first.device)
    if reason:
        return reason
    for name, t in tensors.items():
        if t.device != first.device:
            return f"{name} is on {t.device} but {next(iter(tensors))} is on {first.device}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        return "inputs require grad and the fused op has no backward (use the ref backend to train)"
    if dtype_of.dtype not in DTYPE_CODES:
        return f"dtype {dtype_of.dtype} not supported (float32, float16, bfloat16)"
    return None


def _why_not_modulation(name: str, m: torch.Tensor, x: torch.Tensor) -> str | None:
    B, S, D = x.shape
    if tuple(m.shape) not in ((B, D), (B, S, D)):
        return f"{name} must be (B, D)=({B}, {D}) or (B, S, D)=({B}, {S}, {D}), got {tuple(m.shape)}"
    if m.dtype not in (torch.float32, x.dtype):
        return f"{name} dtype {m.dtype} must be float32 or x's dtype {x.dtype}"
    return None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last dim (other strides are passed to the kernel as they are)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _per_token(m: torch.Tensor, S: int) -> torch.Tensor:
    """A (B, D) modulation as the (B, S, D) view the kernels read (stride 0 over S); rows contiguous."""
    m = _rows(m)
    return m.unsqueeze(1).expand(-1, S, -1) if m.dim() == 2 else m


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


# ---- adaln_modulate --------------------------------------------------------------------------

def _adaln_modulate_why_not(backend: str, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> str | None:
    reason = _why_not_device(backend, x.device)
    if reason:
        return reason
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        return "inputs require grad and the fused op has no backward (use the ref backend to train)"
    if x.dim() != 3:
        return f"x must be (B, S, D), got shape {tuple(x.shape)}"
    if x.dtype not in DTYPE_CODES:
        return f"x dtype {x.dtype} not supported (float32, float16, bfloat16)"
    for name, m in (("scale", scale), ("shift", shift)):
        reason = _why_not_modulation(name, m, x)
        if reason:
            return reason
        if m.device != x.device:
            return f"{name} is on {m.device} but x is on {x.device}"
    if scale.shape != shift.shape or scale.dtype != shift.dtype:
        return "scale and shift must have the same shape and dtype"
    return None


@native_op("adaln_modulate", why_not=_adaln_modulate_why_not, fake=lambda x, scale, shift, eps=1e-6: _empty(x.shape, x))
def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    S = x.shape[1]
    launch("adaln_modulate", out=out, x=x, scale=_per_token(scale, S), shift=_per_token(shift, S), eps=eps)
    return out


# ---- gated_residual_adaln --------------------------------------------------------------------

def _gated_residual_adaln_why_not(backend: str, x, y, gate, scale, shift) -> str | None:
    reason = _why_not_common(backend, {"x": x, "y": y, "gate": gate, "scale": scale, "shift": shift}, x)
    if reason:
        return reason
    if x.dim() != 3:
        return f"x must be (B, S, D), got shape {tuple(x.shape)}"
    B, S, D = x.shape
    if D == 0:
        return "x has D = 0"
    if y.shape != x.shape or y.dtype != x.dtype:
        return f"y must match x: shape {tuple(x.shape)} dtype {x.dtype}, got {tuple(y.shape)} {y.dtype}"
    for name, m in (("gate", gate), ("scale", scale), ("shift", shift)):
        reason = _why_not_modulation(name, m, x)
        if reason:
            return reason
    if backend == "cuda":
        if D > CUDA_GATED_MAX_DIM:
            return f"D={D} exceeds the cuda kernel's {CUDA_GATED_MAX_DIM} (the row is kept in shared memory)"
        if B * S > _MAX_ROWS:
            return f"B*S={B * S} rows exceed the cuda grid's {_MAX_ROWS}"
    return None


@native_op("gated_residual_adaln", why_not=_gated_residual_adaln_why_not,
           fake=lambda x, y, gate, scale, shift, eps=1e-6: (_empty(x.shape, x), _empty(x.shape, x)))
def gated_residual_adaln(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                         shift: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _rows(x), _rows(y)
    mods = (gate, scale, shift)
    if len({m.dtype for m in mods}) > 1:  # one modulation dtype in the kernel: upcasting is exact
        mods = tuple(m.float() for m in mods)
    x_out, h_out = _empty(x.shape, x), _empty(x.shape, x)
    if x_out.numel() == 0:  # nothing to compute (and empty tensors may have null data pointers)
        return x_out, h_out
    gate, scale, shift = (_per_token(m, x.shape[1]) for m in mods)
    launch("gated_residual_adaln", x_out=x_out, h_out=h_out, x=x, y=y, gate=gate, scale=scale, shift=shift, eps=eps)
    return x_out, h_out


# ---- qk_norm_rope ----------------------------------------------------------------------------

def _qk_norm_rope_why_not(backend: str, q, k, q_weight, k_weight, cos, sin) -> str | None:
    tensors = {"q": q, "k": k, "q_weight": q_weight, "k_weight": k_weight, "cos": cos, "sin": sin}
    reason = _why_not_common(backend, tensors, q)
    if reason:
        return reason
    if q.dim() != 3:
        return f"q must be (B, S, H*Dh), got shape {tuple(q.shape)}"
    B, S, N = q.shape
    if k.shape != q.shape or k.dtype != q.dtype:
        return f"k must match q: shape {tuple(q.shape)} dtype {q.dtype}, got {tuple(k.shape)} {k.dtype}"
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if tuple(w.shape) != (N,):
            return f"{name} must be (H*Dh,)=({N},), got {tuple(w.shape)}"
        if w.dtype not in DTYPE_CODES:
            return f"{name} dtype {w.dtype} not supported (float32, float16, bfloat16)"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[0] != S or t.shape[1] < 1:
            return f"{name} must be (S, Dh/2) with S={S}, got {tuple(t.shape)}"
        if t.dtype not in DTYPE_CODES:
            return f"{name} dtype {t.dtype} not supported (float32; float16/bfloat16 are upcast)"
    if cos.shape != sin.shape:
        return f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ"
    head_dim = 2 * cos.shape[1]
    if N % head_dim != 0:
        return f"H*Dh={N} is not a multiple of the head dim 2*cos.shape[1]={head_dim}"
    if backend == "cuda" and B * S > _MAX_ROWS:
        return f"B*S={B * S} rows exceed the cuda grid's {_MAX_ROWS}"
    return None


def _qk_norm_rope_fake(q, k, q_weight, k_weight, cos, sin, num_heads, eps=1e-6):
    B, S, N = q.shape
    shape = (B, S, num_heads, N // num_heads)
    return _empty(shape, q), _empty(shape, q)


@native_op("qk_norm_rope", why_not=_qk_norm_rope_why_not, fake=_qk_norm_rope_fake)
def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, N = q.shape
    if num_heads <= 0 or N % num_heads != 0 or (N // num_heads) != 2 * cos.shape[-1]:
        raise ValueError(f"qk_norm_rope: num_heads={num_heads} does not split H*Dh={N} into heads of "
                         f"Dh = 2 * cos.shape[-1] = {2 * cos.shape[-1]}")
    q_out, k_out = _qk_norm_rope_fake(q, k, q_weight, k_weight, cos, sin, num_heads)
    if q_out.numel() == 0:
        return q_out, k_out
    # weights and rotation tables go in as fp32 (exact for fp16/bf16 inputs; small tensors)
    launch("qk_norm_rope", q_out=q_out, k_out=k_out, q=_rows(q), k=_rows(k), q_weight=q_weight.float().contiguous(),
           k_weight=k_weight.float().contiguous(), cos=_rows(cos.float()), sin=_rows(sin.float()), eps=eps)
    return q_out, k_out


# ---- attention -------------------------------------------------------------------------------

def _attention_why_not(backend: str, q, k, v) -> str | None:
    reason = _why_not_common(backend, {"q": q, "k": k, "v": v}, q)
    if reason:
        return reason
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be (B, S, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    B, Sq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        return (f"k and v must be (B, Skv, H, D) with B={B}, H={H}, D={D}, "
                f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] == 0:
        return "k and v have no keys (Skv = 0)"
    if D == 0:
        return "head dim D = 0"
    if backend == "cuda":
        if D % 8 != 0 or D > CUDA_ATTENTION_MAX_HEAD_DIM:
            return f"head dim {D} must be a multiple of 8 and at most {CUDA_ATTENTION_MAX_HEAD_DIM} on cuda"
        if B > 65535 or H > 65535:
            return f"batch {B} and heads {H} must each be at most 65535 on cuda (grid y / z)"
    return None


# explicit requests only (auto=False): measured slower than torch SDPA (the C++ one ~2x on CPU;
# the CUDA one 0.21-0.27x SDPA's speed on an H100, bench/RESULTS.md 2026-11-27)
@native_op("attention", why_not=_attention_why_not, fake=lambda q, k, v: _empty(q.shape, q), auto=False)
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = _empty(q.shape, q)
    if out.numel() == 0:
        return out
    launch("attention", out=out, q=_rows(q), k=_rows(k), v=_rows(v), scale=q.shape[-1] ** -0.5)
    return out
