"""Reading a diffusers model directory, whatever the family: its config.json and its
safetensors weights (sharded or not; pickle weights are refused)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import PICKLE_SUFFIXES, BundleError, load_safetensors


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
