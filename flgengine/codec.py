"""Latent codecs: video `(B, 3, T, H, W)` in [-1, 1] <-> latents `(B, C, F, h, w)`.

`WanVAECodec` is diffusers' `AutoencoderKLWan` with the Wan pipelines' latent
normalisation, `HunyuanVAECodec` its `AutoencoderKLHunyuanVideo` with the scaling factor;
`PixelCodec` uses the frames themselves as latents. `build_codec` turns
a `CodecConfig` into a codec through the `CODECS` registry (kind -> factory). Also the
video <-> uint8 frame conversions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .config import CodecConfig

__all__ = ["Codec", "PixelCodec", "DiffusersVAECodec", "WanVAECodec", "HunyuanVAECodec", "CODECS", "build_codec", "video_to_uint8", "uint8_to_video"]


class Codec:
    """Base: `temporal_factor * k + 1` frames -> `k + 1` latent frames, each
    `spatial_factor` times smaller in height and width, `latent_channels` channels."""

    name = "codec"
    latent_channels: int
    temporal_factor: int
    spatial_factor: int

    def check_frames(self, num_frames: int) -> None:
        """Raises ValueError unless `num_frames` is `temporal_factor * k + 1`, k >= 0."""
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"{self.name} needs an integer frame count >= 1, got {num_frames!r}")
        f = self.temporal_factor
        if (num_frames - 1) % f:
            lower = (num_frames - 1) // f * f + 1
            raise ValueError(
                f"{self.name} needs {f}k+1 frames (1, {f + 1}, {2 * f + 1}, ...), got {num_frames}: "
                f"use {lower} or {lower + f}"
            )

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, F, h, w)` of the latents of one `num_frames x height x width` video."""
        self.check_frames(num_frames)
        s = self.spatial_factor
        return (self.latent_channels, (num_frames - 1) // self.temporal_factor + 1, height // s, width // s)

    def _check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"{self.name} encodes video of shape (B, 3, T, H, W), got {tuple(video.shape)}")
        self.check_frames(video.shape[2])
        s = self.spatial_factor
        if video.shape[3] % s or video.shape[4] % s:
            h, w = video.shape[3:]
            raise ValueError(f"{self.name} needs height and width divisible by {s}, got {h}x{w}")

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelCodec(Codec):
    """Latents are the frames: 3 channels, no down-sampling, any frame count >= 1."""

    name = "pixel codec"
    latent_channels = 3
    temporal_factor = 1
    spatial_factor = 1

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self._check_video(video)
        return video.clone()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().clamp(-1.0, 1.0)


class DiffusersVAECodec(Codec):
    """A diffusers video VAE from a local directory: encode = the posterior's mode, then
    `(z - shift) * scale`; decode = the VAE of `z / scale + shift`. Subclasses name the VAE class
    and read their factors, shift and scale off its config (`_setup`)."""

    vae_class = ""  # the diffusers class name

    def __init__(self, path: str | Path, device=None, dtype=None):
        try:
            import diffusers
        except ImportError as e:
            raise ImportError(f"the {self.name} codec needs diffusers: pip install 'flgengine[diffusers]'") from e
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{self.name} directory not found: {path}")
        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        self.vae = getattr(diffusers, self.vae_class).from_pretrained(path, **kwargs).to(device).eval()
        self._setup(self.vae.config)

    def _setup(self, cfg) -> None:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, C, F, h, w), VAE dtype."""
        self._check_video(video)
        z = self.vae.encode(video.to(self.device, self.vae.dtype)).latent_dist.mode()
        return (z - self._shift.to(z.device, z.dtype)) * self._scale.to(z.device, z.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents (B, C, F, h, w) -> video (B, 3, T, H, W) float32 in [-1, 1]."""
        z = latents.to(self.device, self.vae.dtype)
        z = z / self._scale.to(z.device, z.dtype) + self._shift.to(z.device, z.dtype)
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1.0, 1.0)


class WanVAECodec(DiffusersVAECodec):
    """diffusers `AutoencoderKLWan`, latents normalised as in the Wan pipelines:
    `(mean - latents_mean) * (1 / latents_std)` on encode (posterior mode, as
    pipeline_wan_video2video / _i2v with sample_mode="argmax"), and
    `z / (1 / latents_std) + latents_mean` before the VAE on decode (pipeline_wan)."""

    name = "Wan VAE"
    vae_class = "AutoencoderKLWan"

    def _setup(self, cfg) -> None:
        self.latent_channels = cfg.z_dim
        self.temporal_factor = 2 ** sum(self.vae.temperal_downsample)
        # Wan2.2's VAE also patchifies pixels before the encoder
        self.spatial_factor = 2 ** len(self.vae.temperal_downsample) * (cfg.patch_size or 1)
        # (1, C, 1, 1, 1), float32 like diffusers builds them; cast at use
        self._shift = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        self._scale = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)


class HunyuanVAECodec(DiffusersVAECodec):
    """diffusers `AutoencoderKLHunyuanVideo`, latents times its `scaling_factor` (as
    HunyuanVideo's pipelines: encode takes the posterior mode, decode divides first)."""

    name = "HunyuanVideo VAE"
    vae_class = "AutoencoderKLHunyuanVideo"

    def _setup(self, cfg) -> None:
        self.latent_channels = cfg.latent_channels
        self.temporal_factor = cfg.temporal_compression_ratio
        self.spatial_factor = cfg.spatial_compression_ratio
        self._shift, self._scale = torch.zeros(()), torch.tensor(float(cfg.scaling_factor))


def _vae_builder(kind: str, cls):
    def build(cfg: CodecConfig, root: Path, device=None, dtype=None):
        if cfg.path is None:
            raise ValueError(f"codec kind {kind!r} needs a path (the vae directory)")
        path = Path(cfg.path)
        return cls(path if path.is_absolute() else Path(root) / path, device=device, dtype=dtype)

    return build


CODECS: dict[str, Callable[..., Codec | None]] = {
    "wan_vae": _vae_builder("wan_vae", WanVAECodec),
    "hunyuan_vae": _vae_builder("hunyuan_vae", HunyuanVAECodec),
    "pixel": lambda cfg, root, device=None, dtype=None: PixelCodec(),
    "none": lambda cfg, root, device=None, dtype=None: None,
}


def build_codec(cfg: CodecConfig, root: Path, device=None, dtype=None) -> Codec | None:
    """The codec `cfg` names (path relative to `root`), or None for kind "none"."""
    factory = CODECS.get(cfg.kind)
    if factory is None:
        raise ValueError(f"unknown codec kind {cfg.kind!r} (known kinds: {', '.join(sorted(CODECS))})")
    return factory(cfg, Path(root), device=device, dtype=dtype)


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8 (clamped, rounded)."""
    frames = ((video.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 4, 1).contiguous()


def uint8_to_video(frames: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32 in [-1, 1]."""
    return (frames.float() / 127.5 - 1.0).permute(0, 4, 1, 2, 3).contiguous()
