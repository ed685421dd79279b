"""Where a pipeline's pieces come from: the model (a bundle path or the name of a shipped one), the
device and dtype (defaults: CUDA and bf16 when there is a GPU, else the CPU and fp32), and a bundle's
parts (text encoder, codec, image encoder), whose paths must stay inside the bundle."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .bundle import BundleError
from .codec import build_codec
from .conditioning import build_image_encoder
from .config import PipelineConfig, torch_dtype
from .text import build_text_encoder

ASSETS = Path(__file__).parent / "assets"
# The built-in default: the distilled student once it ships, else the shapes teacher.
DEFAULT_MODELS = ("shapes-4step", "shapes-teacher")


def shipped_models() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "pipeline.json").is_file()) if ASSETS.is_dir() else []


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A bundle path, or the name of a bundle shipped in flgengine/assets."""
    name = model
    if model is None:
        name = next((m for m in DEFAULT_MODELS if m in shipped_models()), DEFAULT_MODELS[-1])
    path = Path(name)
    if path.exists():
        return path
    if (ASSETS / str(name)).is_dir():
        return ASSETS / str(name)
    shipped = shipped_models()
    hint = f"shipped models: {', '.join(shipped)}" if shipped else "no models are shipped in this build yet"
    what = "the built-in default model" if model is None else "model"
    raise FileNotFoundError(f"{what} {str(name)!r} is neither a bundle directory nor a shipped model ({hint}); "
                            "pass model=PATH to a bundle")


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available (torch {torch.__version__})")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype)


def _build_parts(cfg: PipelineConfig, path: Path, device, dtype):
    """The bundle's text encoder and codec; a directory pipeline.json names but the bundle lacks
    is a BundleError naming it."""
    try:
        text = build_text_encoder(cfg.text_encoder, path, device=device,
                                  dtype=dtype if device.type == "cuda" else torch.float32)
        codec = build_codec(cfg.codec, path, device=device, dtype=torch.float32)
    except FileNotFoundError as e:
        raise BundleError(f"{path}/pipeline.json: {e}") from None
    return text, codec


def _build_image_encoder(cfg: PipelineConfig, path: Path, device, dtype):
    try:
        return build_image_encoder(cfg.image_encoder, path, device=device,
                                   dtype=dtype if device.type == "cuda" else torch.float32)
    except (FileNotFoundError, OSError) as e:
        raise BundleError(f"{path}/pipeline.json: image_encoder: {e}") from None


def check_paths_inside(path: Path, cfg: PipelineConfig) -> None:
    """pipeline.json's paths (text encoder, tokenizer, codec, image encoder) must stay inside the
    bundle: no `..`, absolute paths or symlinks leading out (a bundle from elsewhere cannot make
    us read arbitrary files). `load(..., allow_outside_paths=True)` lifts this for bundles you trust."""
    root = Path(path).resolve()
    for key, value in cfg.part_paths():
        target = (Path(path) / value).resolve()
        if target != root and root not in target.parents:
            raise BundleError(f"{path}/pipeline.json: {key} = {value!r} leads outside the bundle (to {target}); "
                              "load it with allow_outside_paths=True if you trust the bundle")
