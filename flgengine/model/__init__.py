"""The DiT (Wan2.1 architecture) and its embeddings."""

from .dit import DiT

__all__ = ["DiT"]
