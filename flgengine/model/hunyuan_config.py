"""HunyuanVideo's transformer config (diffusers' HunyuanVideoTransformer3DModel config, our
names): a strict dataclass, config.json "family": "hunyuan_video"; the module is in hunyuan.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..strict_config import DTYPES, FORMAT_VERSION, JsonConfig
from ..strict_config import check as _check

__all__ = ["HunyuanVideoConfig", "IMAGE_CONDITIONS"]

IMAGE_CONDITIONS = (None, "latent_concat", "token_replace")  # diffusers' image_condition_type values


@dataclass
class HunyuanVideoConfig(JsonConfig):
    """HunyuanVideo's transformer (diffusers' HunyuanVideoTransformer3DModel config, our names).

    `num_layers` dual-stream then `num_single_layers` single-stream blocks; a student keeps
    `block_ids`, teacher indices over both kinds (dual-stream blocks are 0..num_layers-1).
    `guidance_embed`: the guidance-distilled variant (HunyuanVideo 13B) reads the CFG scale as
    an input (`guidance`, in the model's units: scale * 1000) and is sampled without CFG.
    `image_condition`: the image-to-video transformers (diffusers' `image_condition_type`):
    "latent_concat" reads the image latents and a mask as extra input channels (`in_channels`
    says how many; the model is otherwise the text-to-video one), "token_replace" takes the
    image as the first latent frame, whose tokens every block modulates as at timestep 0.
    """

    family: str = "hunyuan_video"
    in_channels: int = 16
    out_channels: int = 16
    num_heads: int = 24
    head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    pooled_dim: int = 768
    guidance_embed: bool = True
    rope_theta: float = 256.0
    rope_axes: tuple[int, int, int] = (16, 56, 56)
    rope_max_seq_len: int = 1024
    eps: float = 1e-6
    image_condition: str | None = None
    block_ids: list[int] | None = None
    dtype: str = "float32"
    format_version: int = FORMAT_VERSION

    _ADDED_LATER: ClassVar[dict[str, int]] = {"image_condition": 5}

    def __post_init__(self) -> None:
        _check(self.family == "hunyuan_video", f"family must be 'hunyuan_video', got {self.family!r}")
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.rope_axes = tuple(self.rope_axes)
        for name, top in (("in_channels", 4096), ("out_channels", 4096), ("num_heads", 1024), ("head_dim", 1024),
                          ("num_layers", 1024), ("num_single_layers", 1024), ("num_refiner_layers", 64),
                          ("text_dim", 1 << 16), ("pooled_dim", 1 << 16), ("rope_max_seq_len", 1 << 20)):
            v = getattr(self, name)
            low = 0 if name in ("num_layers", "num_single_layers", "num_refiner_layers") else 1
            _check(type(v) is int and low <= v <= top, f"{name} must be an integer in {low}..{top}, got {v!r}")
        _check(self.num_layers + self.num_single_layers > 0, "the model needs at least one block")
        _check(len(self.patch_size) == 3 and all(0 < p <= 64 for p in self.patch_size)
               and self.patch_size[1] == self.patch_size[2],
               f"patch_size must be (t, p, p) with integers in 1..64, got {list(self.patch_size)}")
        _check(len(self.rope_axes) == 3 and all(type(n) is int and n >= 0 and n % 2 == 0 for n in self.rope_axes)
               and sum(self.rope_axes) == self.head_dim,
               f"rope_axes must be 3 even channel counts summing to head_dim {self.head_dim}, got {list(self.rope_axes)}")
        _check(isinstance(self.mlp_ratio, (int, float)) and 0 < self.mlp_ratio <= 64,
               f"mlp_ratio must be a number in (0, 64], got {self.mlp_ratio!r}")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.image_condition in IMAGE_CONDITIONS,
               f"image_condition must be one of {', '.join(map(repr, IMAGE_CONDITIONS))}, got {self.image_condition!r}")
        ids = self.kept_blocks
        n = self.num_layers + self.num_single_layers
        _check(len(ids) > 0 and all(type(i) is int and 0 <= i < n for i in ids),
               f"block_ids must be teacher block indices in [0, {n}), at least one, got {ids}")
        _check(list(ids) == sorted(set(ids)), f"block_ids must be strictly increasing, got {ids}")

    # -- derived ----------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def kept_blocks(self) -> list[int]:
        return list(range(self.num_blocks)) if self.block_ids is None else list(self.block_ids)

    def kind_of(self, teacher_index: int) -> str:
        """"dual" or "single": the kind of the teacher's block `teacher_index`."""
        return "dual" if teacher_index < self.num_layers else "single"

    @property
    def is_pruned(self) -> bool:
        return len(self.kept_blocks) < self.num_blocks

    # -- the blocks pruning acts on (every family's config has these) -----------
    @property
    def num_blocks(self) -> int:
        """The teacher's blocks of both kinds, which block_ids index (dual-stream first)."""
        return self.num_layers + self.num_single_layers

    @property
    def protected_blocks(self) -> tuple[int, ...]:
        """Teacher blocks a pruning plan always keeps: the first and the last of each kind."""
        L, n = self.num_layers, self.num_blocks
        return tuple(sorted({b for b in (0, L - 1, L, n - 1) if 0 <= b < n}))

    def describe_blocks(self) -> dict:
        """What `python -m flgengine info` says of the blocks: kept of the teacher's, of each kind."""
        dual = sum(self.kind_of(i) == "dual" for i in self.kept_blocks)
        return {"blocks": f"{len(self.kept_blocks)} of {self.num_blocks} ({dual} of {self.num_layers} dual-stream, "
                          f"{len(self.kept_blocks) - dual} of {self.num_single_layers} single-stream)",
                "kept_blocks": self.kept_blocks, "width": self.dim, "heads": self.num_heads, "ffn_dim": self.ffn_dim,
                "image_condition": self.image_condition}

    def implied_params(self) -> int:
        """How many parameters this config describes: counted on the model built on the meta device."""
        import torch

        from .hunyuan import HunyuanVideoDiT

        with torch.device("meta"):
            return HunyuanVideoDiT(self).num_params()

    def with_blocks(self, keep: list[int]) -> "HunyuanVideoConfig":
        """The config of the student keeping teacher blocks `keep`."""
        return dataclasses.replace(self, block_ids=list(keep))
