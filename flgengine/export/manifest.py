"""`engine.json`: what an engine directory holds and what it was built from.

    {"manifest_version": 2, "format": "onnx", "files": ["dit.onnx", "dit.onnx.data"],
     "sha256": {"dit.onnx": "9f86d0...", "dit.onnx.data": "60303a..."},
     "dtype": "float32", "precision": "bf16", "device": "cpu",
     "inputs": [{"name": "x", "shape": ["batch", 16, 21, 60, 104], "dtype": "float32"}, ...],
     "outputs": [{"name": "velocity", ...}],
     "dynamic_dims": {"batch": {"min": 1, "opt": 1, "max": 4}, "text_len": {...}},
     "video": {"num_frames": 81, "height": 480, "width": 832} | null,
     "bundle": {"path": ..., "weights_sha256": ..., "model_config": {...}},
     "versions": {"torch": ..., "onnx": ...}, "options": {"opset": 23},
     "verification": {"max_abs_error": ..., "rel_error": ..., "tolerance": ..., "shapes": [...], "seed": 0} | null,
     "created": "..."}

A shape entry is an int (static) or the name of a dynamic dim in `dynamic_dims`.
Reading is strict like every config here: unknown or missing keys are errors naming the key.
An engine holds native code (an AOTInductor package is a shared library, a TensorRT plan runs
plugins): `sha256` pins every file, and `load_engine` checks them before opening anything.
Manifests of version 1 (no hashes) are refused: export the engine again. Version 2 (before
`precision`) reads as a "bf16" engine.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, check_known_keys, dataclass_from_dict
from ..files import atomic_write_text, cached_sha256

__all__ = ["EngineError", "DimRange", "TensorSpec", "BundleIdentity", "Verification", "EngineManifest",
           "MANIFEST_NAME", "FORMATS", "read_manifest", "check_file_hashes"]

MANIFEST_NAME = "engine.json"
MANIFEST_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: before `precision` (an engine in its dtype, "bf16")
FORMATS = ("onnx", "aoti", "tensorrt")
ENGINE_DTYPES = ("float32", "bfloat16", "float16")  # spec.DTYPE_NAMES
ENGINE_DEVICES = ("cpu", "cuda")


class EngineError(ValueError):
    """An engine directory is malformed, or does not fit the bundle / inputs it is used with."""


@dataclass(frozen=True)
class DimRange:
    """A dynamic dim's range: TensorRT's optimisation profile, torch.export's `Dim` bounds."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.min, self.opt, self.max))
        if not ok or not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"a dim range needs integers 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def __contains__(self, n: int) -> bool:
        return self.min <= n <= self.max


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # int = static size, str = a dynamic dim's name
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in ENGINE_DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype must be one of {', '.join(ENGINE_DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(self.shape))
        bad = [d for d in self.shape if not (isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d > 0))]
        if bad:
            raise ValueError(f"tensor {self.name!r}: shape entries are positive ints or dim names, got {bad[0]!r}")

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        """The shape with every dynamic dim replaced by `dims[name]`."""
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class BundleIdentity:
    """The bundle an engine was built from: its weights' sha256 and its model config."""

    path: str
    weights_sha256: str
    model_config: dict


@dataclass(frozen=True)
class Verification:
    """Engine vs PyTorch (reference ops, same dtype and device) on fresh random inputs."""

    max_abs_error: float
    rel_error: float  # ||engine - torch|| / ||torch||, the worst over `shapes`
    tolerance: float
    shapes: list  # the input shapes checked, {"batch": b, "text_len": l}
    seed: int


@dataclass(frozen=True)
class EngineManifest:
    format: str
    files: tuple[str, ...]  # relative to the engine directory; the first is the one to load
    sha256: dict[str, str]  # file name -> sha256 hex digest of its bytes
    dtype: str
    device: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_dims: dict[str, DimRange]
    video: dict | None  # {"num_frames", "height", "width"} the latent grid stands for (None: DiT-only bundle)
    bundle: BundleIdentity
    versions: dict[str, str]
    options: dict[str, Any]
    verification: Verification | None
    created: str
    precision: str = "bf16"  # the DiT's precision (model/precision.py): "bf16" (its dtype) or "fp8"
    manifest_version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.dtype not in ENGINE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(ENGINE_DTYPES)}, got {self.dtype!r}")
        if self.device not in ENGINE_DEVICES:
            raise ValueError(f"device must be one of {', '.join(ENGINE_DEVICES)}, got {self.device!r}")
        if not isinstance(self.created, str):
            raise ValueError(f"created must be a string, got {self.created!r}")
        if self.manifest_version not in READABLE_VERSIONS:
            raise ValueError(f"manifest_version {self.manifest_version!r} is not supported (this flgengine reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}; export the engine again)")
        from ..model.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.files:
            raise ValueError("files must name at least the engine file")
        for name in self.files:
            if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"files must be names inside the engine directory, got {name!r}")
            digest = self.sha256.get(name)
            if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise ValueError(f"sha256 must give each file's hex digest; {name!r} has {digest!r}")
        if set(self.sha256) != set(self.files):
            raise ValueError(f"sha256 names {sorted(set(self.sha256) - set(self.files))} which files does not")
        for spec in (*self.inputs, *self.outputs):
            unknown = [d for d in spec.shape if isinstance(d, str) and d not in self.dynamic_dims]
            if unknown:
                raise ValueError(f"tensor {spec.name!r} names dim {unknown[0]!r}, which dynamic_dims does not define")

    # -- views ---------------------------------------------------------------------------
    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, F, H, W) of the latents the engine takes (static: fixed per engine)."""
        return tuple(self.input("x").shape[1:])  # type: ignore[return-value]

    def describe_shapes(self) -> str:
        dims = ", ".join(f"{k} {r.min}..{r.max}" for k, r in self.dynamic_dims.items()) or "all static"
        video = (f" (video {self.video['num_frames']} frames {self.video['height']}x{self.video['width']})"
                 if self.video else "")
        return f"latents {self.latent_shape}{video}; {dims}"

    # -- json ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("inputs", "outputs"):
                v = [s.to_dict() for s in v]
            elif f.name == "dynamic_dims":
                v = {k: dataclasses.asdict(r) for k, r in v.items()}
            elif f.name == "files":
                v = list(v)
            elif dataclasses.is_dataclass(v):
                v = dataclasses.asdict(v)
            out[f.name] = v
        return out

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "EngineManifest":
        if not isinstance(data, dict):
            raise EngineError(f"{source}: expected a JSON object")
        version = data.get("manifest_version")
        if version not in READABLE_VERSIONS:  # before the keys: another version has others
            raise EngineError(f"{source}: manifest_version {version!r} is not supported (this flgengine reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))}; export the engine again)")
        names = [f.name for f in dataclasses.fields(cls) if version >= 3 or f.name != "precision"]
        try:
            check_known_keys(data, names, source)
        except ConfigError as e:
            raise EngineError(str(e)) from None
        missing = [n for n in names if n not in data]
        if missing:
            raise EngineError(f"{source}: missing key {missing[0]!r}")
        try:
            kw = dict(data)
            kw["files"] = tuple(_typed(data["files"], list, "files"))
            kw["sha256"] = dict(_typed(data["sha256"], dict, "sha256"))
            kw["inputs"] = tuple(dataclass_from_dict(TensorSpec, s, f"{source}: inputs") for s in _typed(data["inputs"], list, "inputs"))
            kw["outputs"] = tuple(dataclass_from_dict(TensorSpec, s, f"{source}: outputs") for s in _typed(data["outputs"], list, "outputs"))
            kw["dynamic_dims"] = {k: dataclass_from_dict(DimRange, r, f"{source}: dynamic_dims.{k}")
                                  for k, r in _typed(data["dynamic_dims"], dict, "dynamic_dims").items()}
            kw["bundle"] = dataclass_from_dict(BundleIdentity, data["bundle"], f"{source}: bundle")
            if data["verification"] is not None:
                kw["verification"] = dataclass_from_dict(Verification, data["verification"], f"{source}: verification")
            for key, kind in (("versions", dict), ("options", dict)):
                _typed(data[key], kind, key)
            if data["video"] is not None:
                _typed(data["video"], dict, "video")
            return cls(**kw)
        except ConfigError as e:
            raise EngineError(str(e)) from None
        except (TypeError, ValueError) as e:
            raise EngineError(f"{source}: {e}") from None


def _typed(value, kind: type, key: str):
    if not isinstance(value, kind):
        raise TypeError(f"{key} must be a JSON {'array' if kind is list else 'object'}, got {type(value).__name__}")
    return value


def read_manifest(directory: str | Path) -> EngineManifest:
    """Reads and checks `DIR/engine.json`, and that the files it names are there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EngineError(f"{directory}: engine directory does not exist (build one with python -m flgengine.export)")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise EngineError(f"{path}: missing; {directory} is not an engine directory (build one with python -m flgengine.export)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    manifest = EngineManifest.from_dict(data, str(path))
    for name in manifest.files:
        if not (directory / name).is_file() or (directory / name).is_symlink():
            raise EngineError(f"{directory / name}: missing or not a plain file (named in {MANIFEST_NAME})")
    return manifest


def check_file_hashes(directory: str | Path, manifest: EngineManifest) -> None:
    """EngineError unless every file of the engine has the sha256 engine.json pins."""
    directory = Path(directory)
    for name in manifest.files:
        digest = cached_sha256(directory / name)
        if digest != manifest.sha256[name]:
            raise EngineError(f"{directory / name}: sha256 {digest[:12]}... differs from {manifest.sha256[name][:12]}... "
                              f"in {MANIFEST_NAME}: the file was changed after export; refusing to load it "
                              "(load engines only from trusted sources; export it again)")
