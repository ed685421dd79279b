"""Python wrappers of the `_C` ops (backends "cpu" and "cuda").

`_C` does not link libtorch: we pass `data_ptr()`s, sizes, element strides, a dtype
code and the current CUDA stream. Each op is registered with `torch.library.custom_op`
and `register_fake`, so torch.compile and torch.export trace around it.
"""

from __future__ import annotations

import torch

try:  # the extension is optional at import time: the reference backend always works
    from flgengine import _C
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the install
    _C = None
    _IMPORT_ERROR = f"flgengine._C is not built ({e}); reinstall with `make build` or `pip install -e .`"

# dtype codes shared with csrc/include/flg/common.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def build_info() -> dict:
    """What the native build holds (cuda, cuda_archs, backends, ops); empty backends if unbuilt."""
    if _C is None:
        return {"cuda": False, "cuda_archs": "", "cuda_devices": 0, "ops": [], "backends": [], "error": _IMPORT_ERROR}
    return dict(_C.build_info())


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


# ---- adaln_modulate ------------------------------------------------------------------

def adaln_why_not(backend: str):
    def why_not(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> str | None:
        reason = _why_not_device(backend, x.device)
        if reason:
            return reason
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
            return "inputs require grad and the fused op has no backward (use the ref backend to train)"
        if x.dim() != 3:
            return f"x must be (B, S, D), got shape {tuple(x.shape)}"
        if x.dtype not in DTYPE_CODES:
            return f"x dtype {x.dtype} not supported (float32, float16, bfloat16)"
        B, S, D = x.shape
        for name, m in (("scale", scale), ("shift", shift)):
            if tuple(m.shape) not in ((B, D), (B, S, D)):
                return f"{name} must be (B, D)=({B}, {D}) or (B, S, D)=({B}, {S}, {D}), got {tuple(m.shape)}"
            if m.dtype not in (torch.float32, x.dtype):
                return f"{name} dtype {m.dtype} must be float32 or x's dtype {x.dtype}"
            if m.device != x.device:
                return f"{name} is on {m.device} but x is on {x.device}"
        if scale.shape != shift.shape or scale.dtype != shift.dtype:
            return "scale and shift must have the same shape and dtype"
        return None

    return why_not


def _mod_strides(m: torch.Tensor) -> tuple[int, int]:
    return (m.stride(0), 0) if m.dim() == 2 else (m.stride(0), m.stride(1))


@torch.library.custom_op("flgengine::adaln_modulate_native", mutates_args=())
def _adaln_modulate_native(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    if scale.stride(-1) != 1 or shift.stride(-1) != 1 or _mod_strides(scale) != _mod_strides(shift):
        scale, shift = scale.contiguous(), shift.contiguous()
    out = torch.empty_like(x)
    B, S, D = x.shape
    sb, ss = _mod_strides(scale)
    args = (out.data_ptr(), x.data_ptr(), scale.data_ptr(), shift.data_ptr(), B, S, D, sb, ss, float(eps),
            DTYPE_CODES[x.dtype], DTYPE_CODES[scale.dtype])
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            _C.adaln_modulate_cuda(*args, torch.cuda.current_stream(x.device).cuda_stream)
    else:
        _C.adaln_modulate_cpu(*args)
    return out


@_adaln_modulate_native.register_fake
def _(x, scale, shift, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return _adaln_modulate_native(x, scale, shift, eps)


# Limits of the CUDA kernels (mirrored from csrc/cuda/ops.h).
CUDA_GATED_MAX_DIM = 32768      # gated_residual_adaln keeps the x_new row in shared memory
CUDA_ATTENTION_MAX_HEAD_DIM = 256
_MAX_ROWS = 2**31 - 1           # one CUDA block per row (grid x)


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


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last dim (other strides are passed to the kernel as they are)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _bs_strides(t: torch.Tensor) -> tuple[int, int]:
    """(b, s) element strides of a (B, S, D) tensor or of a (B, D) one broadcast over S."""
    return (t.stride(0), 0) if t.dim() == 2 else (t.stride(0), t.stride(1))


def _launch(op: str, device: torch.device, *args) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            getattr(_C, f"{op}_cuda")(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        getattr(_C, f"{op}_cpu")(*args)


# ---- gated_residual_adaln --------------------------------------------------------------

def gated_residual_adaln_why_not(backend: str):
    def why_not(x, y, gate, scale, shift) -> str | None:
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
            if tuple(m.shape) not in ((B, D), (B, S, D)):
                return f"{name} must be (B, D)=({B}, {D}) or (B, S, D)=({B}, {S}, {D}), got {tuple(m.shape)}"
            if m.dtype not in (torch.float32, x.dtype):
                return f"{name} dtype {m.dtype} must be float32 or x's dtype {x.dtype}"
        if backend == "cuda":
            if D > CUDA_GATED_MAX_DIM:
                return f"D={D} exceeds the cuda kernel's {CUDA_GATED_MAX_DIM} (the row is kept in shared memory)"
            if B * S > _MAX_ROWS:
                return f"B*S={B * S} rows exceed the cuda grid's {_MAX_ROWS}"
        return None

    return why_not


@torch.library.custom_op("flgengine::gated_residual_adaln_native", mutates_args=())
def _gated_residual_adaln_native(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                                 shift: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _rows(x), _rows(y)
    mods = [_rows(m) for m in (gate, scale, shift)]
    if len({m.dtype for m in mods}) > 1:  # one modulation dtype in the kernel: upcasting is exact
        mods = [m.float() for m in mods]
    gate, scale, shift = mods
    x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    B, S, D = x.shape
    if x_out.numel() == 0:  # nothing to compute (and empty tensors may have null data pointers)
        return x_out, h_out
    _launch("gated_residual_adaln", x.device, x_out.data_ptr(), h_out.data_ptr(), x.data_ptr(), y.data_ptr(),
            gate.data_ptr(), scale.data_ptr(), shift.data_ptr(), B, S, D, *_bs_strides(x), *_bs_strides(y),
            *_bs_strides(gate), *_bs_strides(scale), *_bs_strides(shift), float(eps), DTYPE_CODES[x.dtype],
            DTYPE_CODES[gate.dtype])
    return x_out, h_out


@_gated_residual_adaln_native.register_fake
def _(x, y, gate, scale, shift, eps):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device))


def gated_residual_adaln(x, y, gate, scale, shift, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    return _gated_residual_adaln_native(x, y, gate, scale, shift, eps)


# ---- qk_norm_rope ----------------------------------------------------------------------

def qk_norm_rope_why_not(backend: str):
    def why_not(q, k, q_weight, k_weight, cos, sin) -> str | None:
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

    return why_not


@torch.library.custom_op("flgengine::qk_norm_rope_native", mutates_args=())
def _qk_norm_rope_native(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, N = q.shape
    if num_heads <= 0 or N % num_heads != 0 or (N // num_heads) != 2 * cos.shape[-1]:
        raise ValueError(f"qk_norm_rope: num_heads={num_heads} does not split H*Dh={N} into heads of "
                         f"Dh = 2 * cos.shape[-1] = {2 * cos.shape[-1]}")
    q, k = _rows(q), _rows(k)
    # weights and rotation tables go in as fp32 (exact for fp16/bf16 inputs; small tensors)
    q_weight, k_weight = q_weight.float().contiguous(), k_weight.float().contiguous()
    cos, sin = _rows(cos.float()), _rows(sin.float())
    head_dim = N // num_heads
    q_out = torch.empty((B, S, num_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, S, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if q_out.numel() == 0:
        return q_out, k_out
    _launch("qk_norm_rope", q.device, q_out.data_ptr(), k_out.data_ptr(), q.data_ptr(), k.data_ptr(),
            q_weight.data_ptr(), k_weight.data_ptr(), cos.data_ptr(), sin.data_ptr(), B, S, num_heads, head_dim,
            *_bs_strides(q), *_bs_strides(k), cos.stride(0), sin.stride(0), float(eps), DTYPE_CODES[q.dtype])
    return q_out, k_out


@_qk_norm_rope_native.register_fake
def _(q, k, q_weight, k_weight, cos, sin, num_heads, eps):
    B, S, N = q.shape
    shape = (B, S, num_heads, N // num_heads)
    return (torch.empty(shape, dtype=q.dtype, device=q.device), torch.empty(shape, dtype=q.dtype, device=q.device))


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, num_heads: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    return _qk_norm_rope_native(q, k, q_weight, k_weight, cos, sin, num_heads, eps)


# ---- attention -------------------------------------------------------------------------

def attention_why_not(backend: str):
    def why_not(q, k, v) -> str | None:
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

    return why_not


def _bsh_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


@torch.library.custom_op("flgengine::attention_native", mutates_args=())
def _attention_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, Sq, H, D = q.shape
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    _launch("attention", q.device, out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), B, Sq, k.shape[1], H, D,
            *_bsh_strides(q), *_bsh_strides(k), *_bsh_strides(v), D ** -0.5, DTYPE_CODES[q.dtype])
    return out


@_attention_native.register_fake
def _(q, k, v):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attention_native(q, k, v)


def register(registry) -> None:
    """Registers the _C ops as backends "cpu" and "cuda"."""
    for backend in ("cpu", "cuda"):
        registry.register("adaln_modulate", backend, adaln_modulate, adaln_why_not(backend))
        registry.register("gated_residual_adaln", backend, gated_residual_adaln, gated_residual_adaln_why_not(backend))
        registry.register("qk_norm_rope", backend, qk_norm_rope, qk_norm_rope_why_not(backend))
        # explicit requests only: measured slower than torch SDPA (the C++ one ~2x on CPU; the CUDA
        # one 0.21-0.27x SDPA's speed on an H100, bench/RESULTS.md 2026-11-27)
        registry.register("attention", backend, attention, attention_why_not(backend), auto=False)
