"""Training data of the distillation stages: batches of (clean latents, text states).

    data = world_data(pipe, seed=0)        # the shapes world through the bundle's codec + text encoder
    data = ShardData("shards/", seed=0)    # precomputed Wan latents + umT5 states (`python -m distill precompute`)
    x0, context = data.batch(step, 16)     # (B, C, F, H, W) fp32, (B, L, text_dim) fp32

Both are random access by step (batch i depends only on the seed and i), so the step
counter is the whole data-stream state of a resumable run.

Shard format (a directory of `*.safetensors` files, read in sorted order): each file holds
`latents` (N, C, F, H, W) and `context` (N, L, text_dim), both float (fp32/bf16/fp16),
rows aligned, and optionally `uncond` (1, L, text_dim): the text state of the empty prompt
(the CFG unconditional input). Every shard must agree on C, F, H, W, L and text_dim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flgengine.bundle import BundleError, load_safetensors
from flgengine.codec import uint8_to_video
from flgengine.model import main_expert

from .worlds import shapes


def condition_of(data, x0: torch.Tensor):
    """The image condition (flgengine.conditioning.ImageCondition) `data` gives clean latents x0
    (`data.condition(x0)`), or None: text-to-video data, or a data object without `condition`
    (the stages' data interface needs only `batch(step, n) -> (x0, context)` and `uncond`)."""
    condition = getattr(data, "condition", None)
    return None if condition is None else condition(x0)


def conditioned(net, cond):
    """`net` as the stages call it, (x, t, context) -> v, with an image-to-video batch's condition
    put in (ImageCondition.model: concat channels, or the clean first frame at t = 0); `net`
    itself without one."""
    return net if cond is None else cond.model(net)


def first_frame_condition(videos: torch.Tensor) -> torch.Tensor:
    """The "concat" conditioning channels of clips whose first frame is given (one mask channel:
    a codec of temporal factor 1): (B, C, T, H, W) -> (B, 1 + C, T, H, W) = [mask (1 on frame 0),
    frame 0 then zeros], as flgengine.conditioning builds them at sampling time."""
    B, C, T, H, W = videos.shape
    cond = videos.new_zeros(B, 1 + C, T, H, W)
    cond[:, 0, 0] = 1
    cond[:, 1:, 0] = videos[:, :, 0]
    return cond


def clip_condition(x0: torch.Tensor, image: str, patch: tuple[int, int, int]):
    """The ImageCondition of clean clips x0 (B, C, F, H, W) whose frame 0 is given; None for
    `image` "none". concat: first_frame_condition's channels; first_frame: frame 0 put in place,
    its tokens at t = 0."""
    from flgengine.conditioning import ImageCondition

    if image == "none":
        return None
    if image == "first_frame":
        mask = x0.new_ones(1, 1, *x0.shape[2:])
        mask[:, :, 0] = 0
        return ImageCondition("first_frame", x0[:, :, :1].clone(), mask, patch)
    return ImageCondition("concat", first_frame_condition(x0), None, patch)


class WorldData:
    """The shapes world as a bundle sees it: videos through its codec, prompts through its
    (frozen) text encoder. The empty prompt's state is `uncond`. `image` (pipeline.json's scheme
    of an image-to-video bundle, "concat" or "first_frame"; `patch` its DiT's patch size):
    `condition(x0)` gives a batch's first frames as the ImageCondition every DiT call on it reads."""

    def __init__(self, text_encoder, codec, seed: int = 0, image: str = "none",
                 patch: tuple[int, int, int] = (1, 1, 1)):
        self.text_encoder, self.codec, self.seed, self.image, self.patch = text_encoder, codec, seed, image, patch
        self.uncond = text_encoder.encode([""], dtype=torch.float32)  # (1, L, text_dim)
        if image != "none" and codec.temporal_factor != 1:
            raise ValueError("the shapes world's image conditioning is built for a codec of temporal factor 1")

    def condition(self, x0: torch.Tensor):
        """The ImageCondition of clean latents x0 (clip_condition), None for text to video."""
        return clip_condition(x0, self.image, self.patch)

    @torch.no_grad()
    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        videos, prompts, _ = shapes.batch(self.seed, step, batch_size)
        x0 = self.codec.encode(uint8_to_video(torch.from_numpy(videos))).float()  # (B, C, F, H, W)
        return x0, self.text_encoder.encode(prompts, dtype=torch.float32)  # (B, L, text_dim)


def world_data(pipe, seed: int = 0) -> WorldData:
    """WorldData of a loaded `flgengine.Pipeline` (a bundle of the shapes world)."""
    return WorldData(pipe.text_encoder, pipe.codec, seed, image=getattr(pipe.config, "image", "none"),
                     patch=tuple(main_expert(pipe.dit).config.patch_size))


class ShardData:
    """Precomputed latents + text states (see the module docstring for the format)."""

    def __init__(self, directory: str | Path, seed: int = 0):
        self.directory, self.seed = Path(directory), seed
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise BundleError(f"{self.directory}: no *.safetensors shards")
        latents, context, uncond = [], [], None
        for f in files:
            sd = load_safetensors(f, str(f))
            for key in ("latents", "context"):
                if key not in sd:
                    raise BundleError(f"{f}: missing tensor {key!r} (a shard holds latents and context)")
            unknown = sorted(set(sd) - {"latents", "context", "uncond"})
            if unknown:
                raise BundleError(f"{f}: unexpected tensor {unknown[0]!r} (a shard holds latents, context and uncond)")
            for key, v in sd.items():
                if not v.is_floating_point():
                    raise BundleError(f"{f}: tensor {key!r} has dtype {v.dtype}, expected a floating point dtype")
                if not torch.isfinite(v.float()).all():
                    raise BundleError(f"{f}: tensor {key!r} contains NaN or Inf values")
            lat, ctx = sd["latents"].float(), sd["context"].float()
            if lat.dim() != 5 or ctx.dim() != 3 or lat.shape[0] != ctx.shape[0] or 0 in lat.shape or 0 in ctx.shape:
                raise BundleError(f"{f}: latents must be (N, C, F, H, W) and context (N, L, D) with the same N, "
                                  f"no size 0, got {tuple(lat.shape)} and {tuple(ctx.shape)}")
            if "uncond" in sd and tuple(sd["uncond"].shape) not in ((1, *ctx.shape[1:]), tuple(ctx.shape[1:])):
                raise BundleError(f"{f}: uncond must be (1, L, D) = {(1, *ctx.shape[1:])}, got {tuple(sd['uncond'].shape)}")
            if latents and (lat.shape[1:] != latents[0].shape[1:] or ctx.shape[1:] != context[0].shape[1:]):
                raise BundleError(f"{f}: shapes {tuple(lat.shape[1:])} / {tuple(ctx.shape[1:])} differ from the first "
                                  f"shard's {tuple(latents[0].shape[1:])} / {tuple(context[0].shape[1:])}")
            latents.append(lat)
            context.append(ctx)
            if "uncond" in sd:
                uncond = sd["uncond"].float().reshape(1, *ctx.shape[1:])
        self.latents, self.context = torch.cat(latents), torch.cat(context)
        self.uncond = torch.zeros(1, *self.context.shape[1:]) if uncond is None else uncond

    def __len__(self) -> int:
        return len(self.latents)

    def condition(self, x0: torch.Tensor) -> None:
        return None  # shards of text-to-video data

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        idx = torch.from_numpy(rng.integers(0, len(self), batch_size))
        return self.latents[idx], self.context[idx]
