"""The engine formats: name -> builder (`builder.EngineBuilder`)."""

from __future__ import annotations

from .aoti import AotiBuilder
from .builder import EngineBuilder
from .manifest import FORMATS
from .onnx import OnnxBuilder
from .tensorrt import TensorRTBuilder

__all__ = ["BUILDERS"]

BUILDERS: dict[str, type[EngineBuilder]] = {b.format: b for b in (OnnxBuilder, AotiBuilder, TensorRTBuilder)}
assert tuple(BUILDERS) == FORMATS, "manifest.FORMATS names the formats BUILDERS has"
