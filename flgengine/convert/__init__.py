"""Conversion between diffusers models and flgengine DiTs and bundles.

    config, state = from_diffusers(src)            # a diffusers transformer -> (ModelConfig, DiT state dict)
    bundle_from_diffusers(pipeline_dir, "bundle")  # a whole diffusers pipeline directory -> a bundle
    to_diffusers(model_or_bundle, "out")           # a DiT (or a bundle path) -> a diffusers transformer directory

Each model family is one module here (`wan`: WanTransformer3DModel, `hunyuan`:
HunyuanVideoTransformer3DModel) with the same few
functions: `from_diffusers(cfg, sd)`, `to_diffusers(model, out_dir)`,
`bundle_from_diffusers(src, out, **options)`, `config_from_state_dict(sd, num_heads)` and
`owns_state_dict(sd)`. The functions here pick the family by the diffusers class name
(`_class_name` of config.json or model_index.json, or the instance's class), or, for a
bare state dict, by its keys. Adding a family is one module and one line in FAMILIES.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import torch

from ..bundle import BundleError, load_bundle
from ..config import ModelConfig
from . import hunyuan, wan
from .source import is_diffusers_pipeline, read_diffusers_dir

__all__ = ["from_diffusers", "to_diffusers", "bundle_from_diffusers", "is_diffusers_pipeline", "FAMILIES"]

# diffusers transformer class -> family module
FAMILIES: dict[str, ModuleType] = {wan.TRANSFORMER_CLASS: wan, hunyuan.TRANSFORMER_CLASS: hunyuan}
# diffusers pipeline class -> family module (a pipeline's transformer/config.json names its class too)
PIPELINES: dict[str, ModuleType] = {**{name: wan for name in ("WanPipeline", "WanImageToVideoPipeline",
                                                               "WanVideoToVideoPipeline", "WanVACEPipeline")},
                                    **{name: hunyuan for name in hunyuan.PIPELINE_CLASSES}}
# our config.json "family" -> family module
BY_FAMILY: dict[str, ModuleType] = {"wan": wan, "hunyuan_video": hunyuan}


def family_of_class(name: str) -> ModuleType:
    """The family module of a diffusers transformer or pipeline class name."""
    family = FAMILIES.get(name) or PIPELINES.get(name)
    if family is None:
        raise ValueError(f"expected a diffusers transformer of a supported family ({', '.join(FAMILIES)}), got {name!r}")
    return family


def family_of_state_dict(sd: dict[str, torch.Tensor]) -> ModuleType:
    """The family whose transformer has the keys of the diffusers state dict `sd`."""
    for family in FAMILIES.values():
        if family.owns_state_dict(sd):
            return family
    raise ValueError(f"a state dict of no supported diffusers transformer ({', '.join(FAMILIES)})")


def family_of_model(config) -> ModuleType:
    """The family module whose diffusers transformer a model of `config` converts to."""
    return BY_FAMILY[config.family]


def from_diffusers(source, *, num_heads: int | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Converts a diffusers transformer to (its family's config, state dict of our module):
    (ModelConfig, DiT state) for Wan, (HunyuanVideoConfig, HunyuanVideoDiT state) for HunyuanVideo.

    `source`: a transformer instance (e.g. a WanTransformer3DModel), a directory (the
    transformer folder or a whole pipeline folder), or a diffusers state dict (`num_heads`
    then names the head count, else width / 128). Unsupported variants (Wan image-to-video)
    are refused with a clear error.
    """
    if isinstance(source, (str, Path)):
        cfg, sd = read_diffusers_dir(Path(source))
    elif isinstance(source, dict):
        family = family_of_state_dict(source)
        return family.from_diffusers(family.config_from_state_dict(source, num_heads), source)
    elif hasattr(source, "state_dict") and hasattr(source, "config"):
        cfg, sd = dict(source.config), source.state_dict()
        if "_class_name" not in cfg and type(source).__name__ in FAMILIES:
            cfg["_class_name"] = type(source).__name__
    else:
        raise TypeError(f"from_diffusers takes a diffusers transformer, a directory or a state dict, "
                        f"got {type(source).__name__}")
    family = family_of_class(cfg["_class_name"]) if "_class_name" in cfg else family_of_state_dict(sd)
    return family.from_diffusers(cfg, sd)


def to_diffusers(model_or_bundle, out_dir: str | Path) -> Path:
    """Writes a DiT (or a bundle path) as a diffusers transformer directory of its family.

    A block-pruned student becomes a transformer with fewer `num_layers`; students with
    per-block widths, and DiT options the family's diffusers class lacks, are refused.
    """
    model = load_bundle(model_or_bundle).model if isinstance(model_or_bundle, (str, Path)) else model_or_bundle
    if hasattr(model, "experts"):
        raise ValueError("to_diffusers: this model has two experts (high / low noise); convert each DiT on its own "
                         "(model.high, model.low): one WanTransformer3DModel each, as Wan2.2's transformer and transformer_2")
    return family_of_model(model.config).to_diffusers(model, Path(out_dir))


def bundle_from_diffusers(src: str | Path, out: str | Path, **options) -> Path:
    """A bundle of the diffusers pipeline directory `src` (DiT converted, text encoder and
    VAE folders copied as they are) written to `out`. `options` are the family's
    bundle defaults (for Wan: num_frames, height, width, steps, guidance, max_length)."""
    src, out = Path(src), Path(out)
    for f in (src / "transformer" / "config.json", src / "model_index.json"):
        name = json.loads(f.read_text()).get("_class_name") if f.is_file() else None
        if name:
            return family_of_class(name).bundle_from_diffusers(src, out, **options)
    raise BundleError(f"{src}: not a diffusers pipeline directory (neither model_index.json nor "
                      "transformer/config.json names its class)")
