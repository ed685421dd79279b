"""Which backend serves an op: `ref` (PyTorch), `cpu` (C++ ops in `_C`), `cuda`
(CUDA ops in `_C`), `triton` (grows with the kernels work).

Order of decision: the call's `backend=` argument, then the model's backend (`prefer()`),
then the `FLG_BACKEND` environment variable (those two only for ops that have that
backend at all), then an automatic pick. An explicit request that cannot be served raises
`BackendUnavailable`; an automatic pick falls back to `ref` and logs why, once.
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
# A model-wide preference (DiT.backend) set for the duration of a forward pass.
_PREFERRED: contextvars.ContextVar[str | None] = contextvars.ContextVar("flg_backend", default=None)


@contextlib.contextmanager
def prefer(backend: str | None):
    """Within the block, ops called without `backend=` use `backend` where they have it
    (like FLG_BACKEND, which it overrides); None leaves the choice to FLG_BACKEND / auto."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    token = _PREFERRED.set(backend)
    try:
        yield
    finally:
        _PREFERRED.reset(token)


def register(op: str, backend: str, impl: Callable, why_not: Callable[..., str | None], auto: bool = True) -> None:
    """Adds `impl` for `op` on `backend`; `why_not(*tensors)` says why it can't serve them (None = it can).
    `auto=False`: only explicit requests (the `backend=` argument, FLG_BACKEND) get it, not
    the automatic pick nor a model-wide preference: for implementations that are correct but
    measured slower than the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = (impl, why_not)
    (_EXPLICIT_ONLY.discard if auto else _EXPLICIT_ONLY.add)((op, backend))


def requested_backend(backend: str | None) -> str | None:
    """The backend asked for: the argument, else the model's preference, else FLG_BACKEND,
    else None (automatic)."""
    name = backend or _PREFERRED.get() or os.environ.get("FLG_BACKEND") or None
    if name is not None and name not in BACKENDS:
        source = "backend argument" if backend is not None else "FLG_BACKEND"
        raise ValueError(f"{source}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


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
    """Returns (backend name, implementation) for `op` on `tensors`."""
    impls = _IMPLS.get(op, {})
    name = requested_backend(backend)
    if name is not None and backend is None and name not in impls:
        name = None  # a model-wide / FLG_BACKEND choice this op has no implementation of: it runs its own
    if name is not None and backend is None and _PREFERRED.get() == name and (op, name) in _EXPLICIT_ONLY:
        name = None  # a model-wide preference is not a request for an implementation slower than the reference
    if name is not None:
        if name not in impls:
            raise BackendUnavailable(f"op {op!r} has no {name!r} backend (available: {', '.join(sorted(impls))})")
        impl, why_not = impls[name]
        reason = why_not(*tensors)
        if reason is not None:
            raise BackendUnavailable(f"op {op!r} cannot run on backend {name!r}: {reason}")
        return name, impl
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
