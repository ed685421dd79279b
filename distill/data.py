"""Training data of the distillation stages: batches of (clean latents, text states).

    data = world_data(pipe, seed=0)        # the shapes world through the bundle's codec + text encoder
    data = shard_data(pipe, "shards/")     # precomputed Wan latents + umT5 states (`python -m distill precompute`)
    x0, context = data.batch(step, 16)     # (B, C, F, H, W) fp32, (B, L, text_dim) fp32
    cond = condition_of(data, x0, step)    # an image-to-video teacher's image condition of that batch, else None

Both are random access by step (batch i depends only on the seed and i), so the step
counter is the whole data-stream state of a resumable run.

Shard format (a directory of `*.safetensors` files, read in sorted order): each file holds
`latents` (N, C, F, H, W) and `context` (N, L, text_dim), both float (fp32/bf16/fp16),
rows aligned, and optionally `uncond` (1, L, text_dim): the text state of the empty prompt
(the CFG unconditional input). Every shard must agree on C, F, H, W, L and text_dim.
Shards of an image-to-video teacher also hold, rows aligned with `latents`:
`image_latents`, the clip's first frame through the codec as the teacher's scheme reads it
(first_frame: the frame alone, (N, C, 1, H, W); concat: the frame then zero frames,
(N, C, F, H, W)), and for a teacher with a CLIP image encoder `image_context` (N, L_img, D_img),
the encoder's tokens of that frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flgengine.bundle import BundleError, load_safetensors
from flgengine.codec import uint8_to_video
from flgengine.conditioning import latent_condition
from flgengine.model import main_expert

from .worlds import shapes


def condition_of(data, x0: torch.Tensor, step: int):
    """The image condition (flgengine.conditioning.ImageCondition) of the batch `data.batch(step, n)`
    whose clean latents are x0 (`data.condition(x0, step)`, on x0's device), or None: text-to-video
    data, or a data object without `condition` (the stages' data interface needs only
    `batch(step, n) -> (x0, context)` and `uncond`)."""
    condition = getattr(data, "condition", None)
    return None if condition is None else condition(x0, step)


def model_inputs(pipe) -> dict[str, float]:
    """Inputs of the teacher's DiT that are the same for every sample: a guidance-distilled
    DiT's embedded guidance (pipeline.json's sampler.embedded_guidance, x 1000), else none."""
    g = getattr(pipe.config.sampler, "embedded_guidance", None)
    return {} if g is None else {"guidance": g * 1000.0}


def with_inputs(cond, inputs: dict[str, float], x0: torch.Tensor):
    """`cond` (an ImageCondition or None) with the constant `inputs` of a batch of clean latents
    x0 put in too (flgengine.conditioning.ExtraInputs)."""
    if not inputs:
        return cond
    if cond is not None:
        raise ValueError("image conditioning of a DiT with extra inputs (embedded guidance) is not supported yet")
    from flgengine.conditioning import ExtraInputs

    return ExtraInputs({k: torch.full((len(x0),), v, device=x0.device, dtype=x0.dtype) for k, v in inputs.items()})


def conditioned(net, cond):
    """`net` as the stages call it, (x, t, context) -> v, with an image-to-video batch's condition
    put in (ImageCondition.model: concat channels, or the clean first frame at t = 0); `net`
    itself without one."""
    return net if cond is None else cond.model(net)


def first_frame_condition(videos: torch.Tensor) -> torch.Tensor:
    """The "concat" conditioning channels of shapes-world clips whose first frame is given (one
    mask channel: a codec of temporal factor 1, whose zero frames encode to zeros):
    (B, C, T, H, W) -> (B, 1 + C, T, H, W) = [mask (1 on frame 0), frame 0 then zeros]."""
    return clip_condition(videos, "concat", (1, 1, 1)).latents


def clip_condition(x0: torch.Tensor, image: str, patch: tuple[int, int, int]):
    """The ImageCondition of shapes-world clean clips x0 (B, C, F, H, W) whose frame 0 is given;
    None for `image` "none". concat: [mask, frame 0 then zeros] on extra channels; first_frame:
    frame 0 put in place, its tokens at t = 0 (flgengine.conditioning.latent_condition)."""
    if image == "none":
        return None
    first = x0[:, :, :1].clone()  # (B, C, 1, H, W)
    if image == "first_frame":
        return latent_condition("first_frame", first, x0.shape[2], 1, patch)
    y = torch.cat([first, x0.new_zeros(x0.shape[0], x0.shape[1], x0.shape[2] - 1, *x0.shape[3:])], dim=2)
    return latent_condition("concat", y, x0.shape[2], 1, patch)


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

    inputs: dict[str, float] = {}  # constant DiT inputs (model_inputs)

    def condition(self, x0: torch.Tensor, step: int | None = None):
        """The ImageCondition of clean latents x0 (clip_condition), None for text to video."""
        return with_inputs(clip_condition(x0, self.image, self.patch), self.inputs, x0)

    @torch.no_grad()
    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        videos, prompts, _ = shapes.batch(self.seed, step, batch_size)
        x0 = self.codec.encode(uint8_to_video(torch.from_numpy(videos))).float()  # (B, C, F, H, W)
        return x0, self.text_encoder.encode(prompts, dtype=torch.float32)  # (B, L, text_dim)


def world_data(pipe, seed: int = 0) -> WorldData:
    """WorldData of a loaded `flgengine.Pipeline` (a bundle of the shapes world)."""
    data = WorldData(pipe.text_encoder, pipe.codec, seed, image=getattr(pipe.config, "image", "none"),
                     patch=tuple(main_expert(pipe.dit).config.patch_size))
    data.inputs = model_inputs(pipe)
    return data


class ShardData:
    """Precomputed latents + text states (see the module docstring for the format). `image`:
    the teacher's image scheme ("none", "first_frame", "concat"), which the shards must carry;
    `patch` and `temporal_factor`: its DiT's patch size and its codec's temporal factor."""

    KEYS = ("latents", "context", "uncond", "image_latents", "image_context")
    inputs: dict[str, float] = {}  # constant DiT inputs (model_inputs), set by shard_data

    def __init__(self, directory: str | Path, seed: int = 0, image: str = "none",
                 patch: tuple[int, int, int] = (1, 1, 1), temporal_factor: int = 1):
        self.directory, self.seed = Path(directory), seed
        self.image, self.patch, self.temporal_factor = image, tuple(patch), temporal_factor
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise BundleError(f"{self.directory}: no *.safetensors shards")
        rows: dict[str, list[torch.Tensor]] = {"latents": [], "context": [], "image_latents": [], "image_context": []}
        uncond = None
        for f in files:
            sd = load_safetensors(f, str(f))
            for key in ("latents", "context"):
                if key not in sd:
                    raise BundleError(f"{f}: missing tensor {key!r} (a shard holds latents and context)")
            unknown = sorted(set(sd) - set(self.KEYS))
            if unknown:
                raise BundleError(f"{f}: unexpected tensor {unknown[0]!r} (a shard holds {', '.join(self.KEYS)})")
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
            first = rows["latents"][0] if rows["latents"] else None
            if first is not None and (lat.shape[1:] != first.shape[1:] or ctx.shape[1:] != rows["context"][0].shape[1:]):
                raise BundleError(f"{f}: shapes {tuple(lat.shape[1:])} / {tuple(ctx.shape[1:])} differ from the first "
                                  f"shard's {tuple(first.shape[1:])} / {tuple(rows['context'][0].shape[1:])}")
            self._check_image_tensors(f, sd, lat, rows)
            for key in rows:
                if key in sd:
                    rows[key].append(sd[key].float())
            if "uncond" in sd:
                uncond = sd["uncond"].float().reshape(1, *ctx.shape[1:])
        self.latents, self.context = torch.cat(rows["latents"]), torch.cat(rows["context"])
        self.image_latents = torch.cat(rows["image_latents"]) if rows["image_latents"] else None
        self.image_context = torch.cat(rows["image_context"]) if rows["image_context"] else None
        self.uncond = torch.zeros(1, *self.context.shape[1:]) if uncond is None else uncond
        if image != "none" and self.image_latents is None:
            raise BundleError(f"{self.directory}: the teacher is image-to-video (image {image!r}) but the shards hold "
                              "no image_latents; precompute them with it: python -m distill precompute TEACHER "
                              "VIDEOS -o SHARDS")

    def _check_image_tensors(self, f, sd, lat, rows: dict[str, list[torch.Tensor]]) -> None:
        """image_latents / image_context of one shard: in every shard or none (`rows`: the shards
        read before), rows and shapes fitting the latents and the image scheme."""
        N, C, F, H, W = lat.shape
        ctx_shape = rows["image_context"][0].shape[1:] if rows["image_context"] else None
        for key in ("image_latents", "image_context"):
            if rows["latents"] and (key in sd) != bool(rows[key]):
                raise BundleError(f"{f}: {'has' if key in sd else 'lacks'} {key!r}, unlike the first shard")
        if "image_latents" in sd and self.image == "none":
            raise BundleError(f"{f}: the shard holds image conditioning (image_latents) but the teacher is "
                              "text-to-video; precompute shards with the teacher you distill")
        if "image_latents" in sd:
            frames = 1 if self.image == "first_frame" else F
            want = (N, C, frames, H, W)
            if tuple(sd["image_latents"].shape) != want:
                raise BundleError(f"{f}: image_latents must be {want} for image {self.image!r} (latents "
                                  f"{tuple(lat.shape)}), got {tuple(sd['image_latents'].shape)}")
        if "image_context" in sd:
            ic = sd["image_context"]
            if "image_latents" not in sd:
                raise BundleError(f"{f}: image_context without image_latents")
            if ic.dim() != 3 or ic.shape[0] != N or 0 in ic.shape or (ctx_shape is not None and ic.shape[1:] != ctx_shape):
                raise BundleError(f"{f}: image_context must be (N, L_img, D_img) with N = {N}, the same in every "
                                  f"shard, got {tuple(ic.shape)}")

    def __len__(self) -> int:
        return len(self.latents)

    def _rows(self, step: int, batch_size: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        return torch.from_numpy(rng.integers(0, len(self), batch_size))

    def condition(self, x0: torch.Tensor, step: int):
        """The ImageCondition of batch `step` (x0 = its latents, on the device wanted), None for
        text to video."""
        if self.image == "none":
            return with_inputs(None, self.inputs, x0)
        idx = self._rows(step, len(x0))
        ctx = None if self.image_context is None else self.image_context[idx].to(x0.device)
        return with_inputs(latent_condition(self.image, self.image_latents[idx].to(x0.device), x0.shape[2],
                                            self.temporal_factor, self.patch, ctx), self.inputs, x0)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._rows(step, batch_size)
        return self.latents[idx], self.context[idx]


def shard_data(pipe, directory: str | Path, seed: int = 0) -> ShardData:
    """ShardData for distilling the loaded teacher `pipe`: its image scheme, patch size and
    codec; shards with CLIP image tokens exactly when the teacher reads them."""
    image = getattr(pipe.config, "image", "none")
    data = ShardData(directory, seed, image=image, patch=tuple(main_expert(pipe.dit).config.patch_size),
                     temporal_factor=pipe.codec.temporal_factor if pipe.codec is not None else 1)
    reads_tokens = getattr(main_expert(pipe.dit).config, "image_dim", None) is not None
    if image != "none" and reads_tokens != (data.image_context is not None):
        raise BundleError(f"{directory}: the teacher {'reads' if reads_tokens else 'takes no'} CLIP image tokens but "
                          f"the shards {'lack' if reads_tokens else 'hold'} image_context; precompute them with it")
    data.inputs = model_inputs(pipe)
    return data
