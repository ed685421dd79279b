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


def register(registry) -> None:
    """Registers the _C ops as backends "cpu" and "cuda"."""
    for backend in ("cpu", "cuda"):
        registry.register("adaln_modulate", backend, adaln_modulate, adaln_why_not(backend))
