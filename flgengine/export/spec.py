"""The shapes an engine is built for, from the export options.

The DiT's inputs and output:

    x         (batch, C, F, H, W)     latents, engine dtype
    t         (batch,)                timesteps in the teacher's units (0..1000), float32
    context   (batch, text_len, text_dim)   text encoder states, engine dtype
    velocity  (batch, C, F, H, W)     output, engine dtype

`batch` and `text_len` may be dynamic (a min/opt/max range). The latent grid (F, H, W)
is fixed per engine: the DiT builds its 3D RoPE tables from the token grid in Python
while it is traced, so one engine serves one resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch

from ..config import ModelConfig
from .manifest import ENGINE_DTYPES, DimRange, TensorSpec

__all__ = ["DYNAMIC_DIMS", "EngineSpec", "DTYPE_NAMES"]

DYNAMIC_DIMS = ("batch", "text_len")
FIXED_DIMS = ("frames", "height", "width")
# engine dtype name <-> torch dtype
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert tuple(DTYPE_NAMES) == ENGINE_DTYPES, "manifest.ENGINE_DTYPES names the dtypes DTYPE_NAMES has"
# relative error (||engine - torch|| / ||torch||) an engine may show against PyTorch in its dtype
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 1e-2}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPE_NAMES.items():
        if d == dtype:
            return name
    raise ValueError(f"engines are float32, bfloat16 or float16, not {dtype}")


def check_dynamic(dims) -> None:
    """ValueError unless every name in `dims` is a dim an engine can leave dynamic."""
    bad = [d for d in dims if d not in DYNAMIC_DIMS]
    if bad:
        why = ("frames, height and width are fixed per engine (the DiT builds its 3D RoPE tables from the token "
               "grid when it is traced): export one engine per resolution") if bad[0] in FIXED_DIMS else \
            f"dynamic dims are {', '.join(DYNAMIC_DIMS)}"
        raise ValueError(f"cannot make {bad[0]!r} dynamic: {why}")


@dataclass
class EngineSpec:
    """Input shapes of one engine: a static latent grid, static or ranged batch / text length.

    Image-to-video DiTs take more: `t_tokens` = S (a "first_frame" model: one timestep per
    token, t of shape (batch, S)), `image` = (image_len, image_dim) (a Wan2.1-I2V DiT: the
    CLIP image tokens, a fourth input `image_context`). A "concat" model's extra channels are
    just `in_channels`."""

    in_channels: int
    out_channels: int
    text_dim: int
    latent: tuple[int, int, int]  # (F, H, W) of the latents
    batch: DimRange
    text_len: DimRange
    dynamic: tuple[str, ...] = DYNAMIC_DIMS
    dtype: str = "float32"
    t_tokens: int | None = None
    image: tuple[int, int] | None = None
    ranges: dict[str, DimRange] = field(init=False)

    def __post_init__(self) -> None:
        check_dynamic(self.dynamic)
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        for name, r in (("batch", self.batch), ("text_len", self.text_len)):
            if name not in self.dynamic and r.min != r.max:
                raise ValueError(f"{name} is static but has a range {r.min}..{r.max}; make it dynamic or give one size")
        self.ranges = {n: r for n, r in (("batch", self.batch), ("text_len", self.text_len)) if n in self.dynamic}

    @classmethod
    def from_options(cls, config: ModelConfig, latent: tuple[int, int, int], *, batch: int = 1,
                     min_batch: int | None = None, max_batch: int | None = None, text_len: int = 512,
                     min_text_len: int | None = None, max_text_len: int | None = None,
                     dynamic: tuple[str, ...] = DYNAMIC_DIMS, dtype: str = "float32", per_token_t: bool = False,
                     image_len: int | None = None) -> "EngineSpec":
        """Ranges from the options: a dynamic batch defaults to 1..max(4, 2*batch) (CFG
        doubles a teacher's batch), a dynamic text length to 1..text_len. `per_token_t`: t
        is (batch, tokens); `image_len`: the CLIP image tokens of a DiT with image_dim."""
        latent = tuple(int(n) for n in latent)
        if len(latent) != 3 or any(n < 1 for n in latent):
            raise ValueError(f"latent grid must be 3 positive sizes (frames, height, width), got {latent}")
        for name, n, p in zip(FIXED_DIMS, latent, config.patch_size):
            if n % p:
                raise ValueError(f"latent {name} {n} is not divisible by the patch size {p}")

        def rng(name, opt, lo, hi, default_lo, default_hi):
            if name not in dynamic:
                if (lo is not None and lo != opt) or (hi is not None and hi != opt):
                    raise ValueError(f"--min/--max {name.replace('_', '-')} need {name} to be dynamic (--dynamic {name})")
                return DimRange(opt, opt, opt)
            return DimRange(default_lo if lo is None else lo, opt, default_hi if hi is None else hi)

        if config.image_dim is not None and not (isinstance(image_len, int) and image_len > 0):
            raise ValueError(f"this DiT reads CLIP image tokens (image_dim {config.image_dim}): give their count "
                             f"(--image-len; Wan2.1-I2V's CLIP gives 257), got {image_len!r}")
        tokens = math.prod(n // p for n, p in zip(latent, config.patch_size))
        return cls(
            in_channels=config.in_channels, out_channels=config.out_channels, text_dim=config.text_dim, latent=latent,
            batch=rng("batch", batch, min_batch, max_batch, 1, max(4, 2 * batch)),
            text_len=rng("text_len", text_len, min_text_len, max_text_len, 1, text_len),
            dynamic=tuple(dynamic), dtype=dtype, t_tokens=tokens if per_token_t else None,
            image=None if config.image_dim is None else (image_len, config.image_dim),
        )

    # -- tensors ---------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.dtype]

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]

    def _dim(self, name: str, r: DimRange) -> int | str:
        return name if name in self.dynamic else r.opt

    def input_specs(self) -> tuple[TensorSpec, ...]:
        b, n = self._dim("batch", self.batch), self._dim("text_len", self.text_len)
        t = (b,) if self.t_tokens is None else (b, self.t_tokens)
        image = () if self.image is None else (TensorSpec("image_context", (b, *self.image), self.dtype),)
        return (TensorSpec("x", (b, self.in_channels, *self.latent), self.dtype),
                TensorSpec("t", t, "float32"),
                TensorSpec("context", (b, n, self.text_dim), self.dtype), *image)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.input_specs()]

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("velocity", (self._dim("batch", self.batch), self.out_channels, *self.latent), self.dtype),)

    def shapes(self, **dims: int) -> dict[str, tuple[int, ...]]:
        """Input shapes at the given dims (default: the opt sizes)."""
        sizes = {"batch": dims.get("batch", self.batch.opt), "text_len": dims.get("text_len", self.text_len.opt)}
        return {s.name: s.concrete(sizes) for s in self.input_specs()}

    def random_inputs(self, generator: torch.Generator, device="cpu", **dims: int) -> tuple[torch.Tensor, ...]:
        """Fresh random (x, t, context[, image_context]): x, context, image ~ N(0, 1), t ~ U(0, 1000)."""
        shp = self.shapes(**dims)
        x = torch.randn(shp["x"], generator=generator).to(device, self.torch_dtype)
        t = (torch.rand(shp["t"], generator=generator) * 1000).to(device)
        ctx = torch.randn(shp["context"], generator=generator).to(device, self.torch_dtype)
        if self.image is None:
            return x, t, ctx
        return x, t, ctx, torch.randn(shp["image_context"], generator=generator).to(device, self.torch_dtype)

    def check_shapes(self, batch: int, text_len: int) -> None:
        for name, n, r in (("batch", batch, self.batch), ("text_len", text_len, self.text_len)):
            if n not in r:
                raise ValueError(f"{name} {n} is outside the engine's range {r.min}..{r.max}")

    # -- for the exporters -------------------------------------------------------------------
    def torch_dynamic_shapes(self) -> dict | None:
        """`dynamic_shapes` for torch.export / torch.onnx.export (None when all static).
        Engines check the range itself at run time (`Engine.check_inputs`)."""
        if not self.dynamic:
            return None
        from torch.export import Dim

        example = self.example_dims()
        dims = {n: Dim(n, min=1, max=max(self.ranges[n].max, example[n])) for n in self.dynamic}
        b, n = dims.get("batch"), dims.get("text_len")
        shapes = {"x": {0: b} if b else {}, "t": {0: b} if b else {}, "context": {k: v for k, v in ((0, b), (1, n)) if v}}
        if self.image is not None:
            shapes["image_context"] = {0: b} if b else {}
        return shapes

    def example_dims(self) -> dict[str, int]:
        """Sizes to trace with: not 1 and not equal to each other, so no dim specialises."""
        b = self.batch.opt if "batch" not in self.dynamic else max(2, self.batch.opt)
        n = self.text_len.opt if "text_len" not in self.dynamic else max(3, self.text_len.opt)
        if "batch" in self.dynamic and "text_len" in self.dynamic and n == b:
            n += 1
        return {"batch": b, "text_len": n}

    def profiles(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: input name -> (min, opt, max) shapes."""
        lo = {n: r.min for n, r in (("batch", self.batch), ("text_len", self.text_len))}
        opt = {n: r.opt for n, r in (("batch", self.batch), ("text_len", self.text_len))}
        hi = {n: r.max for n, r in (("batch", self.batch), ("text_len", self.text_len))}
        return {s.name: (s.concrete(lo), s.concrete(opt), s.concrete(hi)) for s in self.input_specs()}
