"""Reading and writing a diffusers model directory, whatever the family: its config.json and its
safetensors weights (sharded or not; pickle weights are refused)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import PICKLE_SUFFIXES, BundleError, atomic_save_safetensors, atomic_write_text, load_safetensors


def is_diffusers_pipeline(path: str | Path) -> bool:
    """Whether `path` is a diffusers pipeline directory (it holds model_index.json)."""
    return (Path(path) / "model_index.json").is_file()


def read_diffusers_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of a diffusers transformer directory, or of the transformer/
    folder of a whole pipeline directory."""
    path = Path(path)
    if (path / "transformer" / "config.json").is_file():  # a whole pipeline directory
        path = path / "transformer"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a diffusers transformer directory (no config.json)")
    cfg = json.loads(cfg_file.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f"; found pickle file {pickles[0]!r}, which flgengine refuses to load" if pickles else ""
        raise BundleError(f"{path}: no .safetensors weights{hint}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_safetensors(f, str(f)))
    return cfg, sd


def write_diffusers_dir(out_dir: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """A diffusers model directory: diffusion_pytorch_model.safetensors + config.json, each written atomically."""
    out_dir = Path(out_dir)
    atomic_save_safetensors(out_dir / "diffusion_pytorch_model.safetensors", state, metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


def pipeline_transformer(src: Path, parts: tuple[str, ...], family: str, convert):
    """(config, model) of the transformer of the diffusers pipeline directory `src`, converted
    by `convert(cfg, sd)` and loaded into its family's module (built on the meta device: no
    random init); every folder in `parts` must be there first."""
    from ..model import build

    for sub in parts:
        if not (src / sub).is_dir():
            raise BundleError(f"{src}/{sub}: missing (a diffusers {family} pipeline holds {', '.join(parts)})")
    config, state = convert(*read_diffusers_dir(src))
    with torch.device("meta"):
        model = build(config)
    model.load_state_dict(state, assign=True)
    return config, model


def scheduler_shift(src: Path, key: str, default: float) -> float:
    """The flow-matching shift of the pipeline's scheduler config (`key`), else `default`."""
    sched = src / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        return default
    return float(json.loads(sched.read_text()).get(key, default) or default)


def heads_of(width: int, num_heads: int | None, family: str) -> int:
    """The head count of a bare state dict's transformer (not in its shapes): `num_heads`, else
    width / 128 (both families' head dim)."""
    if num_heads is not None:
        return num_heads
    if width % 128:
        raise ValueError(f"cannot infer num_heads for width {width}: pass num_heads= ({family} uses head_dim 128)")
    return width // 128
