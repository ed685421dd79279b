"""Training checkpoints: atomic, resumable, safetensors only.

A checkpoint is one safetensors file: every tensor of the training state (model, EMA,
optimiser moments, torch RNG) plus, in its metadata, a JSON skeleton of the state's
structure and scalars (step, optimiser hyper-parameters). Written to a temp file,
fsynced and renamed, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from flgengine.bundle import BundleError, atomic_save_safetensors, check_safetensors_file

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint"]

CHECKPOINT = "checkpoint.safetensors"


# ---- state <-> (tensors, JSON skeleton) ------------------------------------------------------

def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):
            return {"__intkeys__": {str(k): _flatten(v, f"{key}.{k}", tensors) for k, v in obj.items()}}
        return {str(k): _flatten(v, f"{key}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__intkeys__" in obj:
            return {int(k): _unflatten(v, tensors) for k, v in obj["__intkeys__"].items()}
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Writes `state` (nested dicts / lists of tensors and JSON scalars) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    path = Path(path)
    try:
        atomic_save_safetensors(path, tensors, metadata={"skeleton": json.dumps(skeleton), "format": "flgengine-ckpt"})
    except OSError as e:  # a full disk, a file size limit: the rename never happened
        before = "the previous checkpoint is unchanged" if path.exists() else "no checkpoint was written"
        raise OSError(e.errno, f"writing checkpoint {path} failed ({e.strerror}); {before}") from e
    return path


def load_checkpoint(path: str | Path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    header = check_safetensors_file(path, str(path))
    meta = header.get("__metadata__", {})
    if meta.get("format") != "flgengine-ckpt" or "skeleton" not in meta:
        raise BundleError(f"{path}: not an flgengine training checkpoint (no skeleton metadata)")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _unflatten(json.loads(meta["skeleton"]), tensors)
