"""Triton kernels (backend "triton"): one module per op, each with its launcher.

Triton is optional: without it (or without a GPU and `TRITON_INTERPRET=1`) nothing is
registered and the other backends serve every op.
"""

from __future__ import annotations


def register(registry) -> None:
    """Registers the Triton ops that this install can run (none yet)."""
    return None
