"""The model families and their DiTs: one module class per family, each with the same
interface (`forward(x, t, context, **conditioning)`, `check_inputs`, `config`, `blocks`,
`num_params`, `cast`, `backend`), picked by config.json's `family`.

    config = model_config_from_dict(json.load(...), "config.json")   # ModelConfig, HunyuanVideoConfig, ...
    model = build(config)                                            # DiT, HunyuanVideoDiT, ...
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, ModelConfig, read_json
from .dit import DiT
from .experts import TwoExpertDiT, main_expert
from .hunyuan import HunyuanVideoConfig, HunyuanVideoDiT

__all__ = ["DiT", "HunyuanVideoDiT", "TwoExpertDiT", "main_expert", "FAMILIES", "build", "model_config_from_dict",
           "model_config_from_json"]

# config.json "family" -> (config class, module class); a file without the key is Wan's
FAMILIES = {"wan": (ModelConfig, DiT), "hunyuan_video": (HunyuanVideoConfig, HunyuanVideoDiT)}


def model_config_from_dict(data, source: str = "<dict>"):
    """The config of the family `data` names (`family`, default "wan"), strictly checked."""
    family = data.get("family", "wan") if isinstance(data, dict) else "wan"
    if family not in FAMILIES:
        raise ConfigError(f"{source}: family = {family!r}: expected one of {', '.join(map(repr, FAMILIES))}")
    return FAMILIES[family][0].from_dict(data, source)


def model_config_from_json(path: str | Path):
    return model_config_from_dict(read_json(path), str(path))


def build(config):
    """The DiT module of `config`'s family."""
    return FAMILIES[config.family][1](config)
