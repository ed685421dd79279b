"""Configs as strict dataclasses with a json round-trip (the machinery: `strict_config.py`).

Every config reads from a dict that must hold exactly its fields: an unknown key or a
missing key is a `ConfigError` naming the key. `to_dict()` writes every field, so a
saved config always reads back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from .strict_config import (DTYPES, FORMAT_VERSION, TORCH_DTYPES, ConfigError, JsonConfig, check_known_keys,
                            dataclass_from_dict, read_json, torch_dtype, type_matches, type_name)
from .strict_config import check as _check

__all__ = [
    "ConfigError",
    "read_json",
    "JsonConfig",
    "dataclass_from_dict",
    "check_known_keys",
    "type_matches",
    "type_name",
    "torch_dtype",
    "TORCH_DTYPES",
    "ModelConfig",
    "SamplerConfig",
    "TextEncoderConfig",
    "CodecConfig",
    "PipelineConfig",
    "ImageEncoderConfig",
    "IMAGE_CONDITIONING",
    "DTYPES",
]

ATTENTION_KINDS = ("dense", "tile_window", "per_head")


def _triple(name: str, v, minimum: int) -> tuple[int, int, int]:
    _check(isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(n, int) and not isinstance(n, bool)
                                                                 and n >= minimum for n in v),
           f"attention.{name} must be 3 integers >= {minimum} (frames, rows, columns), got {v!r}")
    return tuple(v)


@dataclass
class AttentionConfig(JsonConfig):
    """Self-attention's pattern (`config.json`'s "attention"; absent = dense); see
    flgengine/model/sparsity.py. `tile`: tokens per tile on the token grid (frames, rows,
    columns); `window`: tiles attended per axis, centred, odd (3 = the tile and one each side);
    `head_windows`: kind "per_head", one window per head; `block`: the mask's block of tokens."""

    kind: str = "dense"
    tile: tuple[int, int, int] = (1, 1, 1)
    window: tuple[int, int, int] = (1, 1, 1)
    block: int = 128
    head_windows: list[list[int]] | None = None

    def __post_init__(self) -> None:
        _check(self.kind in ATTENTION_KINDS, f"attention.kind must be one of {', '.join(ATTENTION_KINDS)}, "
                                             f"got {self.kind!r}")
        self.tile = _triple("tile", self.tile, 1)
        self.window = _triple("window", self.window, 1)
        _check(all(w % 2 == 1 for w in self.window), f"attention.window must be odd per axis, got {list(self.window)}")
        _check(isinstance(self.block, int) and not isinstance(self.block, bool) and self.block >= 16
               and self.block & (self.block - 1) == 0, f"attention.block must be a power of two >= 16, got {self.block!r}")
        if self.kind == "per_head":
            _check(isinstance(self.head_windows, list) and len(self.head_windows) > 0,
                   f"attention.head_windows must list one window per head for kind 'per_head', got {self.head_windows!r}")
            for w in self.head_windows:
                _check(all(n % 2 == 1 for n in _triple("head_windows[]", w, 1)),
                       f"attention.head_windows entries must be odd per axis, got {w!r}")
        else:
            _check(self.head_windows is None, f"attention.head_windows is for kind 'per_head' only (kind {self.kind!r})")


@dataclass
class ModelConfig(JsonConfig):
    """The DiT (Wan2.1 transformer architecture); docs/architecture.md explains the options.

    A teacher has `num_layers` blocks; a student keeps `block_ids` (teacher indices, in
    order) and may narrow each kept block's heads (`block_num_heads`) and FFN width
    (`block_ffn_dim`). Model width is `num_heads * head_dim` and never changes.

    Options beyond Wan (all off by default; a model with any of them does not convert to
    diffusers):
    - `pos_embed`: learned absolute position embeddings per frame, row and column
      (`rope_max_seq_len` each), added to the tokens after patchify, on top of RoPE.
    - `pos_grid` = (F', H', W'): with `pos_embed`, one learned vector per token position of
      grids up to that size instead of the sum frame + row + column.
    - `pooled_text`: the mean of the prompt's text states over its real tokens, through an
      MLP, is added to the timestep embedding (a pooled text vector, as in SD3 and Flux).
    - `velocity_skip` = sigma_data: the velocity is `c_skip(t) * x_t + network(x_t)` with
      EDM's least-squares skip for flow matching, `c_skip = (t - (1 - t) sd^2) / ((1 - t)^2 sd^2 + t^2)`.
      With per-token timesteps, each token's own c_skip.
    - `x0_prediction` = a sigma floor: the network predicts the clean sample x0 and the DiT
      returns the velocity it implies, `v = (x_t - x0_hat) / max(t, floor)` (t in 0..1).
      Per-token timesteps: each token's own t. Not with `velocity_skip`.
    - `attention`: a block-sparse self-attention pattern (`AttentionConfig`); None = dense.
    """

    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_heads: int = 12
    head_dim: int = 128
    ffn_dim: int = 8960
    text_dim: int = 4096
    freq_dim: int = 256
    num_layers: int = 30
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    pos_embed: bool = False
    pos_grid: tuple[int, int, int] | None = None
    pooled_text: bool = False
    velocity_skip: float | None = None
    x0_prediction: float | None = None
    block_ids: list[int] | None = None
    block_num_heads: list[int] | None = None
    block_ffn_dim: list[int] | None = None
    dtype: str = "float32"
    attention: AttentionConfig | None = None
    format_version: int = FORMAT_VERSION

    # Wan2.1-I2V: CLIP image tokens of this width go through an image embedder, and every
    # block's cross-attention has extra image K/V projections (diffusers' image_dim /
    # added_kv_proj_dim); None = a text-only DiT
    image_dim: int | None = None

    # the model family (flgengine.model.FAMILIES); this class describes Wan's architecture
    family: str = "wan"

    # optional DiT features that bundles written before them do not name: absent = off.
    # key -> the format_version from which files must name it
    _ADDED_LATER: ClassVar[dict[str, int]] = {"pos_grid": 2, "pooled_text": 2, "velocity_skip": 2, "x0_prediction": 2,
                                              "attention": 2, "image_dim": 3, "family": 4}

    def __post_init__(self) -> None:
        _check(self.family == "wan", f"family must be 'wan' for this config class, got {self.family!r}")
        if isinstance(self.attention, dict):
            self.attention = dataclass_from_dict(AttentionConfig, self.attention, "attention")
        _check(self.attention is None or isinstance(self.attention, AttentionConfig),
               f"attention must be an object (kind, tile, window, block, head_windows) or null, got {self.attention!r}")
        if self.attention is not None and self.attention.kind == "per_head":
            _check(len(self.attention.head_windows) == self.num_heads and self.block_num_heads is None,
                   f"attention.head_windows must list {self.num_heads} windows (one per head; blocks with "
                   f"pruned head counts take kind 'tile_window'), got {len(self.attention.head_windows)}")
        self.patch_size = tuple(int(p) for p in self.patch_size)
        _check(self.velocity_skip is None or (isinstance(self.velocity_skip, (int, float)) and self.velocity_skip > 0),
               f"velocity_skip (sigma_data) must be a positive number or null, got {self.velocity_skip!r}")
        _check(self.x0_prediction is None or (isinstance(self.x0_prediction, (int, float))
                                              and not isinstance(self.x0_prediction, bool) and 0 < self.x0_prediction < 1),
               f"x0_prediction (sigma floor) must be a number in (0, 1) or null, got {self.x0_prediction!r}")
        _check(not (self.x0_prediction and self.velocity_skip), "x0_prediction and velocity_skip cannot both be set")
        if self.pos_grid is not None:
            _check(isinstance(self.pos_grid, (list, tuple)) and len(self.pos_grid) == 3
                   and all(isinstance(n, int) and n > 0 for n in self.pos_grid),
                   f"pos_grid must be 3 positive ints (F', H', W'), got {self.pos_grid!r}")
            _check(self.pos_embed, "pos_grid needs pos_embed=True")
            self.pos_grid = tuple(self.pos_grid)
        for name, top in (("in_channels", 4096), ("out_channels", 4096), ("num_heads", 1024), ("head_dim", 1024),
                          ("ffn_dim", 1 << 20), ("text_dim", 1 << 16), ("freq_dim", 1 << 16), ("num_layers", 1024),
                          ("rope_max_seq_len", 1 << 20)):
            v = getattr(self, name)
            _check(isinstance(v, int) and 0 < v <= top, f"{name} must be an integer in 1..{top}, got {v!r}")
        _check(self.image_dim is None or (type(self.image_dim) is int and 0 < self.image_dim <= 1 << 16),
               f"image_dim must be an integer in 1..{1 << 16} or null, got {self.image_dim!r}")
        _check(all(isinstance(p, int) and 0 < p <= 64 for p in self.patch_size),
               f"patch_size must be 3 integers in 1..64, got {list(self.patch_size)}")
        _check(self.pos_grid is None or all(n <= self.rope_max_seq_len for n in self.pos_grid),
               f"pos_grid {self.pos_grid} must not exceed rope_max_seq_len={self.rope_max_seq_len}")
        _check(len(self.patch_size) == 3 and all(p > 0 for p in self.patch_size), f"patch_size must be 3 positive ints, got {self.patch_size!r}")
        _check(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        _check(self.freq_dim % 2 == 0, f"freq_dim must be even, got {self.freq_dim}")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        ids = self.kept_blocks
        _check(len(ids) > 0, "block_ids must keep at least one block")
        _check(all(isinstance(i, int) and 0 <= i < self.num_layers for i in ids), f"block_ids must be teacher block indices in [0, {self.num_layers}), got {ids}")
        _check(len(set(ids)) == len(ids) and list(ids) == sorted(ids), f"block_ids must be strictly increasing, got {ids}")
        for name, full in (("block_num_heads", self.num_heads), ("block_ffn_dim", self.ffn_dim)):
            v = getattr(self, name)
            if v is None:
                continue
            _check(isinstance(v, list) and len(v) == len(ids), f"{name} must list one value per kept block ({len(ids)}), got {v!r}")
            _check(all(isinstance(n, int) and 0 < n <= full for n in v), f"{name} values must be in [1, {full}], got {v}")

    # -- derived ----------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kept_blocks(self) -> list[int]:
        return list(range(self.num_layers)) if self.block_ids is None else list(self.block_ids)

    def heads_of(self, i: int) -> int:
        """Head count of the i-th kept block (position in the student, not teacher index)."""
        return self.num_heads if self.block_num_heads is None else self.block_num_heads[i]

    def ffn_of(self, i: int) -> int:
        return self.ffn_dim if self.block_ffn_dim is None else self.block_ffn_dim[i]

    @property
    def is_uniform(self) -> bool:
        """True when every kept block has the teacher's heads and FFN width."""
        n = len(self.kept_blocks)
        return all(self.heads_of(i) == self.num_heads and self.ffn_of(i) == self.ffn_dim for i in range(n))

    @property
    def is_pruned(self) -> bool:
        return len(self.kept_blocks) < self.num_layers or not self.is_uniform

    # -- the blocks pruning acts on (every family's config has these) -----------
    @property
    def num_blocks(self) -> int:
        """The teacher's blocks, which block_ids index."""
        return self.num_layers

    @property
    def protected_blocks(self) -> tuple[int, ...]:
        """Teacher blocks a pruning plan always keeps: the first and the last."""
        return (0, self.num_layers - 1)

    def describe_blocks(self) -> dict:
        """What `python -m flgengine info` says of the blocks: kept of the teacher's, widths."""
        return {"blocks": f"{len(self.kept_blocks)} of {self.num_layers}", "kept_blocks": self.kept_blocks,
                "width": self.dim, "heads": self.block_num_heads or self.num_heads,
                "ffn_dim": self.block_ffn_dim or self.ffn_dim}

    def implied_params(self) -> int:
        """About how many parameters this config describes (the blocks' linears and the
        embeddings), without building the model: what loading checks a file's size against."""
        D = self.dim
        patch = (self.in_channels + self.out_channels) * math.prod(self.patch_size) * D
        blocks = sum(8 * D * self.heads_of(i) * self.head_dim + 2 * D * self.ffn_of(i)
                     for i in range(len(self.kept_blocks)))
        pos = 0 if not self.pos_embed else (math.prod(self.pos_grid) if self.pos_grid else 3 * self.rope_max_seq_len) * D
        return patch + blocks + pos + 2 * self.text_dim * D + self.freq_dim * D + 6 * D * D

    def with_blocks(self, keep: list[int]) -> "ModelConfig":
        """The config of the student keeping teacher blocks `keep` (of this full model), with their widths."""
        return dataclasses.replace(
            self, block_ids=list(keep),
            block_num_heads=None if self.block_num_heads is None else [self.block_num_heads[b] for b in keep],
            block_ffn_dim=None if self.block_ffn_dim is None else [self.block_ffn_dim[b] for b in keep])


SAMPLER_KINDS = ("euler", "fewstep")


@dataclass
class SamplerConfig(JsonConfig):
    """How latents are sampled.

    `euler`: flow-matching Euler over `num_steps` shifted sigmas, with classifier-free
    guidance when `guidance > 1` (teachers). `fewstep`: the student sampler over the
    explicit `sigmas` list (predict x0, re-noise to the next sigma); `guidance` is 0,
    CFG is baked in. The model is called with t = sigma * `num_train_timesteps`.

    `low_noise_guidance` (two-expert bundles, Wan2.2's guidance_scale_2): the CFG scale of
    the steps the low-noise expert runs (sigma <= pipeline.json's low_noise_boundary);
    null uses `guidance` throughout.

    `embedded_guidance` (guidance-distilled models, HunyuanVideo's guidance_embeds): the
    guidance scale the DiT reads as an input (given as scale * 1000); such a model is sampled
    without CFG (`guidance` 1). null for models without that input.
    """

    kind: str = "euler"
    num_steps: int = 50
    shift: float = 5.0
    guidance: float = 5.0
    sigmas: list[float] | None = None
    num_train_timesteps: int = 1000
    low_noise_guidance: float | None = None
    embedded_guidance: float | None = None

    _ADDED_LATER: ClassVar[dict[str, int]] = {"low_noise_guidance": 2, "embedded_guidance": 4}

    def __post_init__(self) -> None:
        _check(self.kind in SAMPLER_KINDS, f"sampler kind must be one of {SAMPLER_KINDS}, got {self.kind!r}")
        _check(isinstance(self.num_steps, int) and self.num_steps >= 1, f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        _check(math.isfinite(self.shift) and self.shift > 0, f"shift must be > 0, got {self.shift!r}")
        _check(math.isfinite(self.guidance) and self.guidance >= 0, f"guidance must be >= 0, got {self.guidance!r}")
        for name in ("low_noise_guidance", "embedded_guidance"):
            g = getattr(self, name)
            _check(g is None or (isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g >= 0),
                   f"{name} must be a number >= 0 or null, got {g!r}")
        if self.kind == "fewstep":
            _check(self.sigmas is not None, "a fewstep sampler needs an explicit sigmas list")
        if self.sigmas is not None:
            s = [float(v) for v in self.sigmas]
            _check(len(s) == self.num_steps, f"sigmas has {len(s)} values but num_steps is {self.num_steps}")
            _check(all(0 < v <= 1 for v in s), f"sigmas must lie in (0, 1], got {s}")
            _check(all(a > b for a, b in zip(s, s[1:])), f"sigmas must be strictly decreasing, got {s}")
            self.sigmas = s


@dataclass
class TextEncoderConfig(JsonConfig):
    """`kind`: "umt5" (Wan's umT5 via transformers; `path` = text encoder dir,
    `tokenizer_path` = tokenizer dir), "hunyuan" (HunyuanVideo's Llama in `path` /
    `tokenizer_path` and CLIP-L in `clip_path` / `clip_tokenizer_path`; the prompt goes into
    `template` (null: HunyuanVideo's) at "{}", and the first `crop_start` tokens (null: 95) are
    cut off), "tokens" (the learned word-embedding encoder of built-in worlds, `path` = its dir)
    or "none" (a DiT-only bundle). `max_length`: the prompt's tokens. Relative paths are
    resolved against the bundle directory."""

    kind: str = "none"
    path: str | None = None
    tokenizer_path: str | None = None
    max_length: int = 512
    clip_path: str | None = None
    clip_tokenizer_path: str | None = None
    template: str | None = None
    crop_start: int | None = None

    _ADDED_LATER: ClassVar[dict[str, int]] = {"clip_path": 4, "clip_tokenizer_path": 4, "template": 4, "crop_start": 4}

    def __post_init__(self) -> None:
        _check(type(self.max_length) is int and self.max_length > 0, f"max_length must be a positive integer, got "
               f"{self.max_length!r}")
        _check(self.template is None or "{}" in self.template, "template must hold {} where the prompt goes")
        _check(self.crop_start is None or (type(self.crop_start) is int and self.crop_start >= 0),
               f"crop_start must be an integer >= 0 or null, got {self.crop_start!r}")

    @property
    def context_length(self) -> int:
        """Rows of the context this encoder gives: max_length (+ the pooled row of "hunyuan"'s packed text)."""
        return self.max_length + (1 if self.kind == "hunyuan" else 0)


@dataclass
class CodecConfig(JsonConfig):
    """`kind`: "wan_vae" (diffusers AutoencoderKLWan in `path`), "hunyuan_vae" (its
    AutoencoderKLHunyuanVideo), "pixel" (latents are the frames scaled to [-1, 1]) or "none"
    (a DiT-only bundle)."""

    kind: str = "none"
    path: str | None = None


@dataclass
class ImageEncoderConfig(JsonConfig):
    """`kind`: "clip" (a transformers CLIPVisionModel in `path`, its CLIPImageProcessor in
    `processor_path`: Wan2.1-I2V's image tokens, the penultimate layer's hidden states) or
    "none". Relative paths are resolved against the bundle directory."""

    kind: str = "none"
    path: str | None = None
    processor_path: str | None = None

    def __post_init__(self) -> None:
        _check(self.kind in IMAGE_ENCODERS, f"image_encoder.kind must be one of {', '.join(IMAGE_ENCODERS)}, "
               f"got {self.kind!r}")
        _check(self.kind == "none" or (self.path and self.processor_path),
               f"image_encoder.kind {self.kind!r} needs path and processor_path")


IMAGE_ENCODERS = ("none", "clip")
# how a bundle takes an image (pipeline.json's `image`); docs/architecture.md, "Image to video"
IMAGE_CONDITIONING = ("none", "first_frame", "concat")


@dataclass
class PipelineConfig(JsonConfig):
    """`pipeline.json`: the parts around the DiT and the defaults of a generation.

    `distilled` marks a student: running it with another step count or with CFG is
    refused unless the caller passes `force=True`.
    """

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    num_frames: int = 81
    height: int = 480
    width: int = 832
    fps: int = 16
    negative_prompt: str = ""
    distilled: bool = False
    # a two-expert bundle (Wan2.2's high-/low-noise split): the DiT in low_noise/ runs every step at
    # t <= low_noise_boundary (t in 0..1), the bundle's own DiT the steps above it
    low_noise_boundary: float | None = None
    # image to video: "none" (text only), "first_frame" (Wan2.2-TI2V: the image's latent is the
    # first latent frame, kept clean, its tokens at timestep 0) or "concat" (Wan2.1-I2V,
    # Wan2.2-I2V: a mask + the image's latent video on the DiT's input channels; with
    # `image_encoder` CLIP image tokens too, for a DiT with image_dim: Wan2.1-I2V)
    image: str = "none"
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    format_version: int = FORMAT_VERSION

    _ADDED_LATER: ClassVar[dict[str, int]] = {"low_noise_boundary": 2, "image": 3, "image_encoder": 3}

    def part_paths(self) -> list[tuple[str, str]]:
        """(key, path) of every part this pipeline names (text encoder, tokenizer, codec, image
        encoder and its processor), relative to the bundle unless absolute."""
        t = self.text_encoder
        named = (("text_encoder.path", t.path), ("text_encoder.tokenizer_path", t.tokenizer_path),
                 ("text_encoder.clip_path", t.clip_path), ("text_encoder.clip_tokenizer_path", t.clip_tokenizer_path),
                 ("codec.path", self.codec.path), ("image_encoder.path", self.image_encoder.path),
                 ("image_encoder.processor_path", self.image_encoder.processor_path))
        return [(k, v) for k, v in named if v is not None]

    def __post_init__(self) -> None:
        _check(self.image in IMAGE_CONDITIONING,
               f"image must be one of {', '.join(IMAGE_CONDITIONING)}, got {self.image!r}")
        _check(self.image == "concat" or self.image_encoder.kind == "none",
               f"image_encoder (kind {self.image_encoder.kind!r}) is for image 'concat' models, not {self.image!r}")
        for name in ("num_frames", "height", "width", "fps"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        b = self.low_noise_boundary
        _check(b is None or (isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1),
               f"low_noise_boundary must be a number in (0, 1) or null, got {b!r}")
