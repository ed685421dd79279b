"""The DiT (Wan2.1 architecture) and its embeddings."""

from .dit import DiT
from .experts import TwoExpertDiT, main_expert

__all__ = ["DiT", "TwoExpertDiT", "main_expert"]
