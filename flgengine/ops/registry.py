"""Which backend serves an op call: `ref` (PyTorch, the definition), `cpu` (C++ ops in
`_C`), `cuda` (CUDA ops in `_C`), `triton` (Triton kernels), `flex` (FlexAttention).

The whole choice is `pick` below; first match wins:

    1. the call's `backend=`       that backend; BackendUnavailable if it cannot serve these inputs
    2. the model's backend         `DiT.backend` (`load(..., backend=)`), in force while the model's
                                   forward runs (`prefer`); ops without that backend, and
                                   implementations registered `auto=False`, take step 4
    3. FLG_BACKEND                 that backend; ops without it take step 4
    4. the automatic order         `_auto_order`: on CUDA `CUDA_ORDER`, on the CPU `cpu`, `ref`;
                                   the first that serves these inputs; `ref` after logging why, once

Inputs that need grad always take `ref` in step 4 (the fused ops have no backward).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Callable

import torch

log = logging.getLogger("flgengine.ops")

BACKENDS = ("ref", "cpu", "cuda", "triton", "flex")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this op on these inputs."""


# op name -> backend name -> (implementation, why_not(tensors) -> str | None)
_IMPLS: dict[str, dict[str, tuple[Callable, Callable[..., str | None]]]] = {}
# (op, backend) pairs that serve explicit requests only, never the automatic pick
_EXPLICIT_ONLY: set[tuple[str, str]] = set()
_LOGGED: set[tuple[str, str]] = set()
# The backend of the model whose forward is running (step 2), None outside any.
_MODEL_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("flg_model_backend", default=None)


def check_name(name: str | None, source: str = "backend") -> str | None:
    """`name` if it is a backend or None; ValueError naming `source` otherwise."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def prefer(backend: str | None):
    """Step 2 within the block: the model's backend. A model's forward enters it with its
    `backend`; None leaves the enclosing choice in force (a two-expert model's, export's `ref`)."""
    check_name(backend)
    if backend is None:
        yield
        return
    token = _MODEL_BACKEND.set(backend)
    try:
        yield
    finally:
        _MODEL_BACKEND.reset(token)


def register(op: str, backend: str, impl: Callable, why_not: Callable[..., str | None], auto: bool = True) -> None:
    """Adds `impl` for `op` on `backend`; `why_not(*tensors)` says why it can't serve them (None = it can).
    `auto=False`: only steps 1 and 3 (the `backend=` argument, FLG_BACKEND) get it, not the
    model's backend nor the automatic order: for implementations that are correct but
    measured slower than the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = (impl, why_not)
    (_EXPLICIT_ONLY.discard if auto else _EXPLICIT_ONLY.add)((op, backend))


def requested_backend(backend: str | None) -> str | None:
    """The name steps 1-3 give (None: automatic), for an op that applies them itself."""
    if backend is not None:
        return check_name(backend, "backend argument")
    return _MODEL_BACKEND.get() or check_name(os.environ.get("FLG_BACKEND") or None, "FLG_BACKEND")


# The automatic order on CUDA, from H100 measurements of each backend (Wan-1.3B 480p, bf16;
# bench/RESULTS.md): Triton's adaln_modulate and gated_residual_adaln ran 1.3x and 1.5x faster
# than the CUDA ones, and Triton's qk_norm_rope, once it read whole rows,
# 1.2-1.4x faster than the CUDA one (252-293 us vs 360 us). The CUDA kernels stay for
# `backend="cuda"` and where Triton is missing. (Our attention kernels are explicit-only:
# torch SDPA was faster.)
CUDA_ORDER: dict[str, tuple[str, ...]] = {
    "adaln_modulate": ("triton", "cuda", "ref"),
    "gated_residual_adaln": ("triton", "cuda", "ref"),
    "qk_norm_rope": ("triton", "cuda", "ref"),
    # the FP8-out variants exist in Triton only (the activation quantised inside the norm's pass)
    "adaln_modulate_fp8": ("triton", "ref"),
    "gated_residual_adaln_fp8": ("triton", "ref"),
    "gelu_fp8": ("triton", "ref"),
}


def _auto_order(op: str, tensors) -> tuple[str, ...]:
    t = tensors[0]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors if isinstance(x, torch.Tensor)):
        return ("ref",)  # fused ops have no backward: training runs the reference
    if t.device.type == "cuda":
        return CUDA_ORDER.get(op, ("cuda", "triton", "ref"))
    if t.device.type == "cpu":
        return ("cpu", "ref")
    return ("ref",)


def pick(op: str, tensors, backend: str | None = None) -> tuple[str, Callable]:
    """(backend name, implementation) for `op` on `tensors`: steps 1-4 of the module docstring."""
    impls = _IMPLS.get(op, {})
    if backend is not None:  # 1. the call's argument
        return _required(op, impls, check_name(backend, "backend argument"), tensors)
    model = _MODEL_BACKEND.get()
    if model is not None:  # 2. the model's backend, where this op has it for the automatic pick
        if model in impls and (op, model) not in _EXPLICIT_ONLY:
            return _required(op, impls, model, tensors)
        return _automatic(op, impls, tensors)
    env = check_name(os.environ.get("FLG_BACKEND") or None, "FLG_BACKEND")
    if env is not None and env in impls:  # 3. FLG_BACKEND, where this op has it
        return _required(op, impls, env, tensors)
    return _automatic(op, impls, tensors)  # 4.


def _required(op: str, impls, name: str, tensors) -> tuple[str, Callable]:
    if name not in impls:
        raise BackendUnavailable(f"op {op!r} has no {name!r} backend (available: {', '.join(sorted(impls))})")
    impl, why_not = impls[name]
    reason = why_not(*tensors)
    if reason is not None:
        raise BackendUnavailable(f"op {op!r} cannot run on backend {name!r}: {reason}")
    return name, impl


def _automatic(op: str, impls, tensors) -> tuple[str, Callable]:
    for cand in _auto_order(op, tensors):
        if cand not in impls or (op, cand) in _EXPLICIT_ONLY:
            continue
        impl, why_not = impls[cand]
        reason = why_not(*tensors)
        if reason is None:
            return cand, impl
        key = (op, cand)
        if key not in _LOGGED and cand != "ref":
            _LOGGED.add(key)
            log.info("flgengine: %s falls back from %s backend: %s", op, cand, reason)
    raise BackendUnavailable(f"no backend can run op {op!r} on these inputs")


def why_not(op: str, backend: str, *args, **kwargs) -> str | None:
    """Why `backend` cannot run `op` on these arguments (None: it can; a reason if it has no such backend)."""
    entry = _IMPLS.get(op, {}).get(backend)
    return f"op {op!r} has no {backend!r} backend" if entry is None else entry[1](*args, **kwargs)


def available(op: str) -> dict[str, Callable]:
    return {name: impl for name, (impl, _) in _IMPLS.get(op, {}).items()}
