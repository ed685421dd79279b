"""Image conditioning of the sampler: the two Wan image-to-video schemes (pipeline.json `image`).

"first_frame" (Wan2.2-TI2V): the image's latent is the first latent frame, kept clean.

    cond = codec.encode(image as a one-frame video)               # (B, C, 1, h, w)
    mask = 0 on latent frame 0, 1 elsewhere                       # (1, 1, F, h, w)
    every DiT call:  x_in = mask * x + (1 - mask) * cond,  t per token = t * mask (frame 0 at t = 0)
    at the end:      x = mask * x + (1 - mask) * cond

"concat" (Wan2.1-I2V, Wan2.2-I2V): the DiT reads the image on extra input channels.

    y = codec.encode([image, then num_frames - 1 zero (mid-grey) frames])   # (B, C, F, h, w)
    m = 1 on latent frame 0, 0 elsewhere, one channel per pixel frame a latent frame stands for
        (the codec's temporal factor r: Wan's 4)                             # (B, r, F, h, w)
    every DiT call:  v = DiT(cat([x, m, y], channels), t, context, image_context)
    image_context = the CLIP vision encoder's penultimate hidden states of the image (Wan2.1-I2V;
                    a bundle with `image_encoder`), else None

Both follow diffusers' WanImageToVideoPipeline (expand_timesteps True / False). Classifier-free
guidance keeps the image in both halves: only the text differs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ImageEncoderConfig

__all__ = ["ExtraInputs", "ImageCondition", "ClipImageEncoder", "build_image_encoder", "check_image_model", "encode_image",
           "image_condition", "images_for", "latent_condition"]


class ClipImageEncoder:
    """A transformers CLIPVisionModel + CLIPImageProcessor from local directories: images ->
    the penultimate layer's hidden states (B, 1 + patches, hidden), as Wan2.1-I2V reads them."""

    def __init__(self, path: Path, processor_path: Path, device=None, dtype=None):
        try:
            from transformers import CLIPImageProcessor, CLIPVisionModel
        except ImportError as e:
            raise ImportError("the clip image encoder needs transformers: pip install 'flgengine[diffusers]'") from e
        for what, p in (("image encoder", path), ("image processor", processor_path)):
            if not Path(p).is_dir():
                raise FileNotFoundError(f"{what} directory not found: {p}")
        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        self.model = CLIPVisionModel.from_pretrained(path, **kwargs).to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(processor_path)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, images: list[torch.Tensor]) -> torch.Tensor:
        """n x (H, W, 3) uint8 -> (n, L, hidden) in the encoder's dtype."""
        pixels = self.processor(images=[im.numpy() for im in images], return_tensors="pt").pixel_values
        p = next(self.model.parameters())
        out = self.model(pixel_values=pixels.to(p.device, p.dtype), output_hidden_states=True)
        return out.hidden_states[-2]


def build_image_encoder(cfg: ImageEncoderConfig, root: Path, device=None, dtype=None) -> ClipImageEncoder | None:
    """The image encoder `cfg` names (paths relative to `root`), or None for kind "none"."""
    if cfg.kind == "none":
        return None
    resolve = lambda p: Path(p) if Path(p).is_absolute() else Path(root) / p  # noqa: E731
    return ClipImageEncoder(resolve(cfg.path), resolve(cfg.processor_path), device=device, dtype=dtype)


def images_for(kind: str, image, n: int, path, cuda_graph=None) -> list[torch.Tensor] | None:
    """The `n` images of a generate() call on a model of image scheme `kind`, as (H, W, 3) uint8;
    None for a text-to-video model. Every mistake is a ValueError before compute."""
    from .image import read_images

    if kind == "none":
        if image is not None:
            raise ValueError(f"model {path} is text-to-video (pipeline.json image 'none'): it takes no image")
        return None
    if image is None:
        raise ValueError(f"model {path} is image-to-video (pipeline.json image {kind!r}): pass image= "
                         "(a path, a PIL image or an (H, W, 3) uint8 array), one for all prompts or one per prompt")
    if cuda_graph:
        raise ValueError("cuda_graph=True is not supported for image-to-video models yet")
    return read_images(image, n)


def check_image_model(dit, cfg, codec, image_encoder, path) -> None:
    """The DiT, codec and image encoder of a bundle fit its pipeline.json `image` scheme: a
    BundleError naming the mismatch (at load, before any generation)."""
    from .files import BundleError

    where = f"{path}/pipeline.json"
    experts = (dit.high, dit.low) if hasattr(dit, "low") else (dit,)
    configs = [getattr(d, "config", None) for d in experts]
    c = configs[0]
    image_dim = getattr(c, "image_dim", None)
    if getattr(c, "image_condition", None) is not None:
        raise BundleError(f"{path}/config.json: the DiT is an image-to-video transformer (image_condition "
                          f"{c.image_condition!r}); it runs as a model (its forward, conversion to and from diffusers) but "
                          "not in a pipeline: its text encoder would have to read the image")
    if cfg.image == "none":
        if image_dim is not None:
            raise BundleError(f"{where}: image is 'none' but the DiT reads CLIP image tokens (image_dim {image_dim}); "
                              "an image-to-video bundle says image: 'concat' with an image_encoder")
        return
    if codec is None:
        raise BundleError(f"{where}: image {cfg.image!r} needs a codec to encode the image")
    C = codec.latent_channels
    if cfg.image == "first_frame":
        if c.in_channels != C:
            raise BundleError(f"{where}: image 'first_frame' needs a DiT of {C} input channels (the codec's), "
                              f"got {c.in_channels}")
        return
    want = C + codec.temporal_factor + C  # noise + mask + image latents
    for conf in configs:
        if conf.in_channels != want:
            raise BundleError(f"{where}: image 'concat' needs a DiT of {want} input channels ({C} noise + "
                              f"{codec.temporal_factor} mask + {C} image latents), got {conf.in_channels}")
    if (image_encoder is None) != (image_dim is None):
        raise BundleError(f"{where}: the DiT {'reads' if image_dim else 'takes no'} CLIP image tokens (image_dim "
                          f"{image_dim}) but image_encoder is {cfg.image_encoder.kind!r}")
    if image_encoder is not None and image_encoder.hidden_size != image_dim:
        raise BundleError(f"{where}: the image encoder gives {image_encoder.hidden_size}-wide tokens, the DiT's "
                          f"image_dim is {image_dim}")


class ImageCondition:
    """A DiT with the image put in: `condition.model(dit)` is the VelocityFn the samplers call,
    `condition.finish(latents)` the sampled latents with the image's frame put back."""

    def __init__(self, kind: str, latents: torch.Tensor, mask: torch.Tensor, patch_size: tuple[int, int, int],
                 image_context: torch.Tensor | None = None):
        # first_frame: latents (B, C, 1, h, w), mask (1, 1, F, h, w) 0 on frame 0
        # concat: latents = cat([m, y]) (B, r + C, F, h, w), mask unused
        self.kind, self.latents, self.mask, self.patch = kind, latents, mask, patch_size
        self.image_context = image_context

    def map(self, fn) -> "ImageCondition":
        """The condition with `fn` applied to its per-sample tensors (rows of a batch, a device)."""
        img = None if self.image_context is None else fn(self.image_context)
        return ImageCondition(self.kind, fn(self.latents), self.mask, self.patch, img)

    def _repeat(self, t: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Conditioning of B samples for a DiT batch of k * B (CFG doubles it)."""
        return None if t is None else t.repeat(batch // t.shape[0], *([1] * (t.dim() - 1)))

    def model(self, dit):
        def velocity(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            B = x.shape[0]
            img = self._repeat(self.image_context, B)
            kw = {} if img is None else {"image_context": img}
            if self.kind == "concat":
                return dit(torch.cat([x, self._repeat(self.latents, B).to(x.dtype)], dim=1), t, context, **kw)
            cond = self._repeat(self.latents, B).to(x.dtype)
            m = self.mask.to(x.dtype)
            x_in = m * x + (1 - m) * cond  # frame 0 <- the image's latent
            pt, ph, pw = self.patch
            tokens = self.mask[0, 0, ::pt, ::ph, ::pw].flatten().to(t.dtype)  # (S,) 0 on the image's tokens
            return dit(x_in, t[:, None] * tokens[None, :], context, **kw)  # t: (B, S)

        return velocity

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        if self.kind == "concat":
            return latents
        m = self.mask.to(latents.dtype)
        return m * latents + (1 - m) * self.latents.to(latents.dtype)


class ExtraInputs:
    """A model's keyword inputs beyond (x, t, context) that are the same whatever the prompt
    (a guidance-distilled HunyuanVideo's embedded guidance), per sample: `model(net)` is the
    (x, t, context) -> v function the samplers and distillation stages call, with them put in
    (repeated for a batch of k times the samples, as CFG doubles it); `map` and `finish` as
    ImageCondition's."""

    def __init__(self, inputs: dict[str, torch.Tensor]):
        self.inputs = inputs

    def map(self, fn) -> "ExtraInputs":
        return ExtraInputs({k: fn(v) for k, v in self.inputs.items()})

    def of_batch(self, batch: int) -> dict[str, torch.Tensor]:
        """The inputs of a DiT batch of `batch` samples."""
        n = next(iter(self.inputs.values())).shape[0] if self.inputs else batch
        if batch % n:
            raise ValueError(f"a DiT batch of {batch} for inputs of {n} samples")
        return {k: v.repeat(batch // n, *([1] * (v.dim() - 1))) for k, v in self.inputs.items()}

    def model(self, net):
        def velocity(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kw) -> torch.Tensor:
            return net(x, t, context, **self.of_batch(x.shape[0]), **kw)

        return velocity

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def image_condition(kind: str, frames: torch.Tensor, codec, num_frames: int, patch_size: tuple[int, int, int],
                    device, dtype, image_context: torch.Tensor | None = None) -> ImageCondition:
    """The ImageCondition of `frames` (B, 3, H, W) in [-1, 1] (fitted images, flgengine.image)
    for a video of `num_frames` through `codec`."""
    _, F, _, _ = codec.latent_shape(num_frames, *frames.shape[-2:])
    latents = encode_image(kind, frames, codec, num_frames).to(device, dtype)
    return latent_condition(kind, latents, F, codec.temporal_factor, patch_size, image_context)


def encode_image(kind: str, frames: torch.Tensor, codec, num_frames: int) -> torch.Tensor:
    """The image latents scheme `kind` reads, of `frames` (B, 3, H, W) in [-1, 1]: first_frame
    (B, C, 1, h, w), the frame alone; concat (B, C, F, h, w), the frame then num_frames - 1 zero
    (mid-grey) frames."""
    video = frames.float().unsqueeze(2)  # (B, 3, 1, H, W)
    if kind == "first_frame":
        return codec.encode(video)
    if kind != "concat":
        raise ValueError(f"unknown image conditioning {kind!r}")
    rest = video.new_zeros(video.shape[0], 3, num_frames - 1, *video.shape[-2:])
    return codec.encode(torch.cat([video, rest], dim=2))


def latent_condition(kind: str, latents: torch.Tensor, num_latent_frames: int, temporal_factor: int,
                     patch_size: tuple[int, int, int], image_context: torch.Tensor | None = None) -> ImageCondition:
    """The ImageCondition of image latents (encode_image's; what `distill precompute` stores)."""
    B, _, _, h, w = latents.shape
    F = num_latent_frames
    if kind == "first_frame":
        mask = torch.ones(1, 1, F, h, w, device=latents.device, dtype=torch.float32)
        mask[:, :, 0] = 0
        return ImageCondition(kind, latents, mask, patch_size, image_context)
    if kind != "concat":
        raise ValueError(f"unknown image conditioning {kind!r}")
    m = latents.new_zeros(B, temporal_factor, F, h, w)
    m[:, :, 0] = 1
    return ImageCondition(kind, torch.cat([m, latents], dim=1), None, patch_size, image_context)
