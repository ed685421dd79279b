"""Image inputs of image-to-video models: reading, checking, fitting to the video's size.

    images = read_images(image, n)            # one per prompt or one for all -> n x (H, W, 3) uint8
    frame = fit_image(images[0], 480, 832)    # (3, 480, 832) float32 in [-1, 1]

An image is a path (any format Pillow reads; converted to RGB), a PIL image, a uint8
`(H, W, 3)` numpy array or tensor, or a float `(3, H, W)` tensor in [0, 1]. Everything is
checked before any compute and errors name the bad value.

Fitting follows Wan's reference image-to-video code: the image is scaled, keeping its aspect
ratio, until it covers the frame (the larger of height / H and width / W; bicubic with
antialiasing), then its centre is cropped to height x width. A 4:3 photo for a 16:9 video
loses a band at its top and bottom; it is never stretched.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

__all__ = ["read_image", "read_images", "fit_image", "MAX_SIDE"]

MAX_SIDE = 16384  # larger images are refused (a decoded 16k x 16k RGB image is 768 MiB)


def read_image(image, where: str = "image") -> torch.Tensor:
    """One image as a (H, W, 3) uint8 CPU tensor; a ValueError naming `where` if it is not one."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{where} {str(path)!r}: no such file")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
                image.load()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"{where} {str(path)!r}: not an image Pillow can read ({e})") from None
    if type(image).__module__.startswith("PIL."):
        import numpy as np

        image = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    elif type(image).__module__ == "numpy":
        if image.dtype.name != "uint8":
            raise ValueError(f"{where}: a numpy image must be uint8 (H, W, 3), got dtype {image.dtype.name}")
        image = torch.from_numpy(image.copy())
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{where} must be a path, a PIL image, a uint8 (H, W, 3) array or tensor, or a float "
                         f"(3, H, W) tensor in [0, 1]; got {type(image).__name__}")
    if image.dtype == torch.uint8:
        if image.dim() != 3 or image.shape[-1] != 3:
            raise ValueError(f"{where}: a uint8 image must be (H, W, 3) RGB, got shape {tuple(image.shape)}")
    elif image.is_floating_point():
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{where}: a float image must be (3, H, W) RGB in [0, 1], got shape {tuple(image.shape)}")
        if image.numel() and (not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1):
            raise ValueError(f"{where}: a float image must hold finite values in [0, 1], got "
                             f"[{image.min().item():.3g}, {image.max().item():.3g}]")
        image = (image.detach().float().cpu() * 255).round().to(torch.uint8).permute(1, 2, 0)
    else:
        raise ValueError(f"{where}: dtype {image.dtype} is neither uint8 (H, W, 3) nor float (3, H, W)")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"{where} is empty ({h}x{w} pixels)")
    if max(h, w) > MAX_SIDE:
        raise ValueError(f"{where} is {h}x{w} pixels; images up to {MAX_SIDE} pixels a side are taken")
    return image.detach().cpu().contiguous()


def read_images(image, n: int) -> list[torch.Tensor]:
    """`image` for `n` prompts: one image (used for all) or a list / tuple of exactly `n`."""
    if isinstance(image, (list, tuple)):
        if len(image) != n:
            raise ValueError(f"got {len(image)} images for {n} prompt{'s' if n != 1 else ''}: give one image "
                             "for all prompts or one per prompt")
        return [read_image(im, f"image {i}") for i, im in enumerate(image)]
    return [read_image(image)] * n


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, height, width) float32 in [-1, 1]: scaled to cover the frame,
    keeping its aspect ratio (bicubic, antialiased), and centre-cropped."""
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    # the covering size, at least the frame (rounding must not leave it a pixel short)
    sh, sw = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    x = image.permute(2, 0, 1).unsqueeze(0).float() / 255.0  # (1, 3, H, W) in [0, 1]
    if (sh, sw) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(sh, sw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (sh - height) // 2, (sw - width) // 2
    x = x[0, :, top:top + height, left:left + width]
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
