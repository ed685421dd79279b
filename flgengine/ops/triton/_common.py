"""Shared by the Triton ops: can Triton run these tensors, and which kernel object launches them.

Nothing here imports triton when this module is imported: `import flgengine` must work (and
stay fast) without Triton, and CPU-only runs never pay for importing it.

Compiled or interpreted. `@triton.jit` reads TRITON_INTERPRET when it decorates (in triton 3.x
it returns an `InterpretedFunction` instead of a `JITFunction` if the variable is set then).
So a kernel module imported before a test sets the variable would be stuck with one or the
other. `kernel_for` therefore re-wraps the kernel's Python function per call site: CUDA
tensors get the compiled `JITFunction` (unless TRITON_INTERPRET=1 is set at call time, which
is how Triton itself treats CUDA tensors under the interpreter), CPU tensors the interpreter.
The decision is made per call from the environment, never cached per process.
"""

from __future__ import annotations

import os

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16, bfloat16"


def interpreting() -> bool:
    """TRITON_INTERPRET is set (Triton's own reading of it: 1/true/on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


_IMPORT: dict[str, str | None] = {}  # "error" -> the import's outcome, once probed


def import_error() -> str | None:
    """Why Triton cannot be imported here (None: it can). Imports triton on first call.
    (A plain dict cache rather than functools.lru_cache: torch.compile traces through this.)"""
    if "error" not in _IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language as tl
            from triton.runtime.interpreter import InterpretedFunction

            _IMPORT["error"] = None
            # Triton's own library functions (tl.sum, ...) are jitted when triton is first
            # imported: interpreted kernels can only call them if that import saw TRITON_INTERPRET=1
            _IMPORT["interpreted"] = isinstance(tl.standard.sum, InterpretedFunction)
        except Exception as e:  # ImportError, or a broken install raising something else
            _IMPORT["error"] = (f"triton is not importable ({type(e).__name__}: {e}); "
                                "install it with `pip install triton`")
    return _IMPORT["error"]


def interpreter_reason() -> str | None:
    """Why Triton's interpreter cannot run kernels in this process (None: it can)."""
    if not _IMPORT.get("interpreted"):
        return ("triton was first imported without TRITON_INTERPRET=1, so its library functions are compiled-only; "
                "set TRITON_INTERPRET=1 in the environment before anything imports triton")
    return None


def device_reason(tensors) -> str | None:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            return f"tensors are on different devices ({dev} and {t.device})"
    if dev.type == "cuda":
        return None
    if dev.type == "cpu":
        if interpreting():
            return import_error() or interpreter_reason()
        return ("tensors are on the CPU: the triton backend runs CUDA tensors, or CPU tensors in Triton's "
                "interpreter when TRITON_INTERPRET=1 is set (slow; for tests)")
    return f"tensors are on {dev}: the triton backend runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"


def grad_reason(tensors) -> str | None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "inputs require grad and the Triton ops have no backward (use the ref backend to train)"
    return None


def runtime_reason(tensors) -> str | None:
    """Device, Triton import, autograd: the reasons every op shares. Checks the device first so
    CPU tensors without the interpreter never import triton."""
    return device_reason(tensors) or import_error() or grad_reason(tensors)


def dtype_reason(name: str, t: torch.Tensor, allowed=DTYPES) -> str | None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        return f"{name} dtype {t.dtype} is not supported (allowed: {names})"
    # (skipped while torch.compile traces: dynamo cannot trace the device query; eager calls check)
    if t.dtype == torch.bfloat16 and t.device.type == "cuda" and not torch.compiler.is_compiling():
        cap = torch.cuda.get_device_capability(t.device)
        if cap < (8, 0):
            return f"{name} is bfloat16, which Triton needs compute capability >= 8.0 for (this GPU has {cap})"
    return None


def mod_reason(name: str, m: torch.Tensor, x: torch.Tensor) -> str | None:
    """A modulation tensor (scale / shift / gate): (B, D) per sample or (B, S, D) per token,
    float32 or x's dtype, any strides."""
    B, S, D = x.shape
    if tuple(m.shape) not in ((B, D), (B, S, D)):
        return f"{name} must be (B, D)=({B}, {D}) or (B, S, D)=({B}, {S}, {D}), got shape {tuple(m.shape)}"
    if m.dtype not in (torch.float32, x.dtype):
        return f"{name} dtype {m.dtype} must be float32 or x's dtype {x.dtype}"
    return None


def mod_strides(m: torch.Tensor) -> tuple[int, int, int]:
    """Element strides (batch, token, channel) of a (B, D) or (B, S, D) modulation; token stride
    0 for a per-sample one."""
    return (m.stride(0), 0, m.stride(1)) if m.dim() == 2 else (m.stride(0), m.stride(1), m.stride(2))


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def row_tiling(block: int, n_rows: int, interpret: bool, tiling: dict | None = None) -> tuple[int, int]:
    """(rows per program, num_warps) for the row-wise ops, `block` = the padded row tile,
    `n_rows` = the rows one program column covers; `tiling` ({"ROWS", "num_warps"}) overrides.

    On a GPU a program holds about 2048 elements of each input with 4 warps (a Wan row of 1536
    -> one row of 2048; qk_norm_rope's 768 pairs -> two rows of 1024): the fastest tiling in
    `bench/sweep_triton.py` on an H100 for all three ops (bench/RESULTS.md, 2026-11-27: 1.1-1.4x
    over 4096 elements with 8 warps). The interpreter costs ~5 ms per program whatever its
    size, so there one program takes as many rows as fit in ~32k elements."""
    if tiling is not None:
        unknown = set(tiling) - {"ROWS", "num_warps", "ITERS"}
        if unknown:
            raise ValueError(f"tiling keys {sorted(unknown)} are not tunable (ROWS, num_warps, ITERS)")
        rows, warps = int(tiling["ROWS"]), int(tiling["num_warps"])
        if rows < 1 or rows & (rows - 1) or warps < 1 or warps & (warps - 1):
            raise ValueError(f"tiling {tiling!r}: ROWS and num_warps must be powers of two")
        return rows, warps
    if interpret:
        return min(next_pow2(n_rows), max(1, 32768 // block)), 4
    rows = max(1, min(16, 2048 // block))
    elems = rows * block
    return rows, 4 if elems <= 2048 else 8 if elems <= 8192 else 16


def row_iters(tiling: dict | None) -> int:
    """Row tiles per program (adaln_modulate, gated_residual_adaln): `tiling`'s "ITERS", else 1."""
    iters = 1 if not tiling else int(tiling.get("ITERS", 1))
    if iters < 1:
        raise ValueError(f"tiling {tiling!r}: ITERS must be >= 1")
    return iters


_KERNELS: dict = {}


def is_interpreted(device: torch.device) -> bool:
    return device.type != "cuda" or interpreting()


def kernel_for(jitted, device: torch.device):
    """The launchable kernel for tensors on `device`: `jitted` is the module's `@triton.jit`
    object (a JITFunction, or an InterpretedFunction if TRITON_INTERPRET was set at import)."""
    interp = is_interpreted(device)
    key = (jitted.fn, interp)
    k = _KERNELS.get(key)
    if k is None:
        if interp:
            from triton.runtime.interpreter import InterpretedFunction
            k = jitted if isinstance(jitted, InterpretedFunction) else InterpretedFunction(jitted.fn)
        else:
            from triton.runtime.jit import JITFunction
            k = jitted if isinstance(jitted, JITFunction) else JITFunction(jitted.fn)
        _KERNELS[key] = k
    return k


def launch(jitted, grid, device: torch.device, *args, **meta) -> None:
    kernel = kernel_for(jitted, device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def fix_bf16_rounding(dtype: torch.dtype, device: torch.device) -> bool:
    """The kernels' RTNE_BF16 flag: the interpreter's fp32->bf16 cast truncates where the GPU
    rounds to nearest even, so under the interpreter the kernels round by hand (bit trick on
    the fp32 value, exact) before each bf16 cast; CPU tests then see the GPU's numerics.
    False on a GPU: the branch is not compiled in."""
    return dtype == torch.bfloat16 and is_interpreted(device)
