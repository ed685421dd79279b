"""Loading a built engine: `load_engine(DIR)` reads `engine.json`, opens the runner of its
format, and checks every call's inputs against the manifest before the engine sees them
(an AOTInductor or TensorRT engine given shapes it was not built for reads out of bounds).

`EngineDiT` puts an engine where the pipeline expects its DiT: same call, same config.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..files import cached_sha256
from .formats import BUILDERS
from .manifest import EngineError, EngineManifest, TensorSpec, check_file_hashes, read_manifest
from .spec import DTYPE_NAMES

__all__ = ["Engine", "EngineDiT", "load_engine", "weights_sha256"]

def weights_sha256(bundle: str | os.PathLike) -> str:
    """sha256 of a bundle's model.safetensors (files.cached_sha256)."""
    return cached_sha256(Path(bundle) / "model.safetensors")


class Engine:
    """A built engine: call it like the DiT, `engine(x, t, context) -> velocity`."""

    def __init__(self, directory: Path, manifest: EngineManifest, runner):
        self.directory, self.manifest, self.runner = Path(directory), manifest, runner

    @property
    def dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.manifest.dtype]

    @property
    def device(self) -> torch.device:
        return torch.device(self.manifest.device)

    def __repr__(self) -> str:
        return f"Engine({self.manifest.format}, {self.directory}, {self.manifest.describe_shapes()})"

    # -- checks ---------------------------------------------------------------------------
    @property
    def extra_names(self) -> list[str]:
        """The inputs after (x, t, context): what the DiT's `engine_inputs` named (Wan2.1-I2V's
        image_context, HunyuanVideo's guidance)."""
        return [s.name for s in self.manifest.inputs[3:]]

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *extras: torch.Tensor) -> None:
        """EngineError unless (x, t, context, *extras) have the shapes, dtypes and device the
        engine takes."""
        names = self.extra_names
        if len(extras) != len(names):
            raise EngineError(f"engine {self.directory} takes (x, t, context{''.join(', ' + n for n in names)}), "
                              f"got {3 + len(extras)} inputs")
        dims: dict[str, int] = {}
        for spec, tensor in zip(self.manifest.inputs, (x, t, context, *extras)):
            self._check_one(spec, tensor, dims)

    def _check_one(self, spec: TensorSpec, tensor: torch.Tensor, dims: dict[str, int]) -> None:
        m = self.manifest
        want = "(" + ", ".join(str(d) for d in spec.shape) + ")"
        if not isinstance(tensor, torch.Tensor):
            raise EngineError(f"engine input {spec.name!r} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() != len(spec.shape):
            raise EngineError(f"engine input {spec.name!r} must be {want}, got {tuple(tensor.shape)} ({self.directory})")
        for axis, (d, n) in enumerate(zip(spec.shape, tensor.shape)):
            if isinstance(d, int):
                if n != d:
                    raise EngineError(f"engine input {spec.name!r} must be {want}, got {tuple(tensor.shape)}: this engine "
                                      f"was built for {m.describe_shapes()}; export another one for these shapes "
                                      f"({self.directory})")
                continue
            r = m.dynamic_dims[d]
            if n not in r:
                raise EngineError(f"engine input {spec.name!r}: {d} {n} is outside the engine's range {r.min}..{r.max} "
                                  f"({self.directory}); export with a wider --max/--min {d.replace('_', '-')}")
            if dims.setdefault(d, n) != n:
                raise EngineError(f"engine input {spec.name!r}: {d} is {n} here but {dims[d]} in an earlier input")
        if tensor.dtype != DTYPE_NAMES[spec.dtype]:
            raise EngineError(f"engine input {spec.name!r} must be {spec.dtype}, got {tensor.dtype} ({self.directory})")
        if tensor.device.type != m.device:
            raise EngineError(f"engine input {spec.name!r} must be on {m.device}, got {tensor.device} ({self.directory})")

    def check_bundle(self, bundle: str | os.PathLike, config) -> None:
        """EngineError unless the engine was built from this bundle's weights and config."""
        b = self.manifest.bundle
        if b.model_config != config.to_dict():
            diff = sorted(k for k in set(b.model_config) | set(config.to_dict())
                          if b.model_config.get(k) != config.to_dict().get(k))
            raise EngineError(f"engine {self.directory} was built from a model with another config than bundle {bundle} "
                              f"(differs in {', '.join(diff)}); export an engine from this bundle")
        digest = weights_sha256(bundle)
        if digest != b.weights_sha256:
            raise EngineError(f"engine {self.directory} was built from other weights than bundle {bundle} "
                              f"(sha256 {b.weights_sha256[:12]}... vs {digest[:12]}...; built from {b.path}); "
                              "export an engine from this bundle")

    # -- run -------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, t, context, *extras)
        return self.runner(x, t, context, *extras)


def load_engine(directory: str | os.PathLike) -> Engine:
    """Opens an engine directory written by `python -m flgengine.export`."""
    directory = Path(directory)
    m = read_manifest(directory)
    if m.device == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"{directory}: a CUDA engine, and this machine has no CUDA device; export one with --device cpu")
    check_file_hashes(directory, m)  # before any of its (native) code is opened
    runner = BUILDERS[m.format].open(directory / m.files[0], m.device)
    return Engine(directory, m, runner)


class EngineDiT:
    """An engine in the DiT's place: `dit(x, t, context)`, `.config`, `.engine`."""

    def __init__(self, engine: Engine, config):
        self.engine, self.config = engine, config

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """The DiT's call: its keyword inputs (image_context, guidance) go in the engine's order."""
        names = self.engine.extra_names
        unknown = sorted(k for k, v in inputs.items() if v is not None and k not in names)
        if unknown:
            raise EngineError(f"engine {self.engine.directory} takes no {unknown[0]!r} input")
        missing = [n for n in names if inputs.get(n) is None]
        if missing:
            raise EngineError(f"engine {self.engine.directory} needs the input {missing[0]!r}")
        return self.engine(x, t, context, *(inputs[n] for n in names))

    forward = __call__
