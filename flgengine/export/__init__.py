"""Engines: the DiT of a bundle as ONNX, an AOTInductor package or a TensorRT engine.

    python -m flgengine.export BUNDLE --format onnx|aoti|tensorrt -o DIR

    from flgengine.export import export_engine, load_engine
    export_engine("path/to/bundle", "aoti", "engines/aoti")
    engine = load_engine("engines/aoti")         # engine(x, t, context) -> velocity
    flgengine.generate("a red circle", model="path/to/bundle", engine="engines/aoti")

Every engine directory holds `engine.json` (see `manifest.py`): format, input shapes and
dynamic dims, dtype, the source bundle's weights hash and config, tool versions and the
measured error against PyTorch.
"""

from .build import export_engine
from .engine import Engine, EngineDiT, load_engine
from .manifest import EngineError, EngineManifest, read_manifest
from .spec import EngineSpec
from .verify import VerificationError, verify_engine

__all__ = ["export_engine", "verify_engine", "load_engine", "read_manifest", "Engine", "EngineDiT", "EngineError",
           "EngineManifest", "EngineSpec", "VerificationError"]
