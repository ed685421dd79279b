"""The shapes an engine is built for, from the export options.

The DiT's inputs and output:

    x         (batch, C, F, H, W)     latents, engine dtype
    t         (batch,)                timesteps in the teacher's units (0..1000), float32
    context   (batch, text_len, text_dim)   text encoder states, engine dtype (HunyuanVideo: packed text)
    ...       what the DiT's `engine_inputs` names: Wan2.1-I2V's image_context (batch, image_len,
              image_dim), engine dtype; a guidance-distilled HunyuanVideo's guidance (batch,), float32
    velocity  (batch, C, F, H, W)     output, engine dtype

`batch` and `text_len` may be dynamic (a min/opt/max range). The latent grid (F, H, W)
is fixed per engine: the DiT builds its 3D RoPE tables from the token grid in Python
while it is traced, so one engine serves one resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch

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

    Some DiTs take more: `t_tokens` = S (a "first_frame" model: one timestep per token, t of
    shape (batch, S)); `extras`, the DiT's `engine_inputs` after (x, t, context): (name,
    per-sample shape, "engine" or "float32"), e.g. Wan2.1-I2V's CLIP image tokens or
    HunyuanVideo's embedded guidance. A "concat" model's extra channels are just `in_channels`."""

    in_channels: int
    out_channels: int
    text_dim: int
    latent: tuple[int, int, int]  # (F, H, W) of the latents
    batch: DimRange
    text_len: DimRange
    dynamic: tuple[str, ...] = DYNAMIC_DIMS
    dtype: str = "float32"
    t_tokens: int | None = None
    extras: tuple[tuple[str, tuple[int, ...], str], ...] = ()
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
    def from_options(cls, model, latent: tuple[int, int, int], *, batch: int = 1,
                     min_batch: int | None = None, max_batch: int | None = None, text_len: int = 512,
                     min_text_len: int | None = None, max_text_len: int | None = None,
                     dynamic: tuple[str, ...] = DYNAMIC_DIMS, dtype: str = "float32", per_token_t: bool = False,
                     image_len: int | None = None) -> "EngineSpec":
        """Ranges from the options for `model` (a DiT of any family): a dynamic batch defaults to
        1..max(4, 2*batch) (CFG doubles a teacher's batch), a dynamic text length to
        model.min_text_len (1 unless the DiT says otherwise)..text_len.
        `per_token_t`: t is (batch, tokens); `image_len`: the CLIP image tokens of a DiT with
        image_dim."""
        config = model.config
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

        extras = model.engine_inputs(image_len)
        tokens = math.prod(n // p for n, p in zip(latent, config.patch_size))
        return cls(
            in_channels=config.in_channels, out_channels=config.out_channels, text_dim=config.text_dim, latent=latent,
            batch=rng("batch", batch, min_batch, max_batch, 1, max(4, 2 * batch)),
            text_len=rng("text_len", text_len, min_text_len, max_text_len, getattr(model, "min_text_len", 1), text_len),
            dynamic=tuple(dynamic), dtype=dtype, t_tokens=tokens if per_token_t else None, extras=tuple(extras),
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
        extras = tuple(TensorSpec(name, (b, *shape), self.dtype if kind == "engine" else kind)
                       for name, shape, kind in self.extras)
        return (TensorSpec("x", (b, self.in_channels, *self.latent), self.dtype),
                TensorSpec("t", t, "float32"),
                TensorSpec("context", (b, n, self.text_dim), self.dtype), *extras)

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
        """Fresh random (x, t, context, *extras): x, context and engine-dtype extras ~ N(0, 1);
        t and float32 extras (a guidance scale x 1000) ~ U(0, 1000) and U(1000, 10000)."""
        shp = self.shapes(**dims)
        x = torch.randn(shp["x"], generator=generator).to(device, self.torch_dtype)
        t = (torch.rand(shp["t"], generator=generator) * 1000).to(device)
        ctx = torch.randn(shp["context"], generator=generator).to(device, self.torch_dtype)
        extras = tuple(torch.randn(shp[name], generator=generator).to(device, self.torch_dtype) if kind == "engine"
                       else (1000 + 9000 * torch.rand(shp[name], generator=generator)).to(device)
                       for name, _, kind in self.extras)
        return (x, t, ctx, *extras)

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
        # batch from 1; text from the DiT's shortest text (1, or 3 for HunyuanVideo's packed text)
        low = {"batch": 1, "text_len": self.text_len.min}
        dims = {n: Dim(n, min=low[n], max=max(self.ranges[n].max, example[n])) for n in self.dynamic}
        b, n = dims.get("batch"), dims.get("text_len")
        shapes = {"x": {0: b} if b else {}, "t": {0: b} if b else {}, "context": {k: v for k, v in ((0, b), (1, n)) if v}}
        for name, _, _ in self.extras:
            shapes[name] = {0: b} if b else {}
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
