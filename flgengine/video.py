"""Writing videos: mp4 (H.264 through imageio-ffmpeg) or gif."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _as_frames(frames) -> np.ndarray:
    a = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if a.ndim == 5 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 (or (1, T, H, W, 3)), got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {a.dtype}; generate() returns uint8 video")
    return a


def save_video(frames, path: str | Path, fps: int = 16) -> Path:
    """Writes (T, H, W, 3) uint8 frames to `path` (.mp4 or .gif); returns the path.

    mp4 is H.264 yuv420p (plays everywhere), so odd sizes are padded by one edge pixel.
    """
    import imageio.v2 as imageio

    path = Path(path)
    a = _as_frames(frames)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        imageio.mimsave(path, list(a), duration=1000.0 / fps, loop=0)
    elif suffix == ".mp4":
        pad_h, pad_w = a.shape[1] % 2, a.shape[2] % 2
        if pad_h or pad_w:
            a = np.pad(a, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        with imageio.get_writer(path, fps=fps, codec="libx264", pixelformat="yuv420p", quality=8,
                                macro_block_size=1, ffmpeg_log_level="error") as w:
            for f in a:
                w.append_data(f)
    else:
        raise ValueError(f"unsupported video format {suffix!r} for {path}; use .mp4 or .gif")
    return path
