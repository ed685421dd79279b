"""The Wan path's training data, and the command line of Wan conversion.

    python -m distill convert WAN_DIR -o wan-teacher --frames 81 --height 480 --width 832
    python -m distill precompute wan-teacher VIDEOS_DIR -o shards/      # latents + umT5 states
    # then a run config with  teacher: wan-teacher  and  data: {kind: shards, path: shards/}

`convert` is `flgengine.convert.bundle_from_diffusers`: a diffusers Wan pipeline directory
(`model_index.json`, `transformer/`, `text_encoder/`, `tokenizer/`, `vae/`) as a bundle.
`python -m distill run` does this once (into OUT/teacher) when its `teacher` is such a
directory.

`precompute` reads every video in a folder (`.mp4`, `.gif`, `.webm`, `.mov`) with its
caption in a text file of the same stem (`clip.mp4` + `clip.txt`), takes the first
`num_frames` frames, resizes them to the bundle's height x width, and writes shards of
`shard_size` clips (the format in `distill/data.py`): `latents` (N, C, F, H, W) from the
VAE, `context` (N, L, text_dim) from umT5, `uncond` (1, L, text_dim) for the empty prompt.
For an image-to-video bundle each clip's first frame (resized with the clip) is its image:
`image_latents` as the bundle's scheme encodes it (flgengine.conditioning.encode_image) and,
for a bundle with a CLIP image encoder, `image_context`, its tokens of that frame (as uint8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flgengine.bundle import atomic_save_safetensors
from flgengine.conditioning import encode_image
from flgengine.convert import bundle_from_diffusers, is_diffusers_pipeline

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov")


def read_video(path: Path, num_frames: int, height: int, width: int) -> torch.Tensor:
    """(3, num_frames, height, width) float32 in [-1, 1]: the first frames, resized."""
    import imageio.v3 as iio

    frames = np.asarray(iio.imread(path, index=None))  # (T, H, W, C)
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"{path}: expected RGB video frames, got an array of shape {frames.shape}")
    if len(frames) < num_frames:
        raise ValueError(f"{path}: {len(frames)} frames, the model needs {num_frames}")
    x = torch.from_numpy(frames[:num_frames, ..., :3].copy()).float().permute(3, 0, 1, 2)  # (3, T, H, W)
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return (x / 127.5 - 1).clamp(-1, 1)


def find_clips(videos: str | Path) -> list[tuple[Path, str]]:
    """(video, caption) pairs of a folder, sorted by name; a video without a caption is an error."""
    videos = Path(videos)
    if not videos.is_dir():
        raise FileNotFoundError(f"{videos}: not a directory of videos")
    clips = []
    for v in sorted(p for p in videos.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
        caption = v.with_suffix(".txt")
        if not caption.is_file():
            raise FileNotFoundError(f"{caption}: missing (every video needs a caption file of the same name)")
        clips.append((v, caption.read_text().strip()))
    if not clips:
        raise FileNotFoundError(f"{videos}: no videos ({', '.join(VIDEO_SUFFIXES)})")
    return clips


@torch.no_grad()
def precompute(model: str | Path, videos: str | Path, out: str | Path, shard_size: int = 64,
               batch_size: int = 4, progress: bool = True) -> list[Path]:
    """Writes shards of (latents, context) for the clips in `videos`; returns their paths."""
    import flgengine
    from tqdm.auto import tqdm

    if is_diffusers_pipeline(model):
        raise ValueError(f"{model}: a diffusers directory; convert it to a bundle first: "
                         f"python -m distill convert {model} -o BUNDLE --frames F --height H --width W")
    pipe = flgengine.load(model, device="cpu", dtype="fp32")
    c = pipe.config
    clips = find_clips(videos)
    out = Path(out)
    uncond = pipe.text_encoder.encode([""], dtype=torch.float32)
    paths = []
    rows: dict[str, list[torch.Tensor]] = {"latents": [], "context": [], "image_latents": [], "image_context": []}

    def flush():
        path = out / f"shard-{len(paths):05d}.safetensors"
        shard = {k: torch.cat(v).contiguous() for k, v in rows.items() if v}
        atomic_save_safetensors(path, {**shard, "uncond": uncond.contiguous()})
        paths.append(path)
        for v in rows.values():
            v.clear()

    bar = tqdm(total=len(clips), desc="precompute", unit="clip", disable=not progress)
    for i in range(0, len(clips), batch_size):
        chunk = clips[i:i + batch_size]
        video = torch.stack([read_video(v, c.num_frames, c.height, c.width) for v, _ in chunk])  # (B, 3, T, H, W)
        rows["latents"].append(pipe.codec.encode(video).float())
        rows["context"].append(pipe.text_encoder.encode([cap for _, cap in chunk], dtype=torch.float32))
        if c.image != "none":
            frames = video[:, :, 0]  # (B, 3, H, W) in [-1, 1]: the clips' images
            rows["image_latents"].append(encode_image(c.image, frames, pipe.codec, c.num_frames).float())
            if pipe.image_encoder is not None:
                pixels = ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, 3)
                rows["image_context"].append(pipe.image_encoder.encode(list(pixels)).float())
        bar.update(len(chunk))
        if sum(len(x) for x in rows["latents"]) >= shard_size:
            flush()
    if rows["latents"]:
        flush()
    bar.close()
    return paths


def add_precompute_args(p) -> None:
    p.add_argument("model", help="teacher bundle (its text encoder and VAE encode the clips)")
    p.add_argument("videos", help="folder of videos, each with a caption file of the same name (.txt)")
    p.add_argument("-o", "--out", required=True, help="shard directory")
    p.add_argument("--shard-size", type=int, default=64, help="clips per shard (default 64)")
    p.add_argument("--batch-size", type=int, default=4, help="clips encoded at once (default 4)")
    p.add_argument("--quiet", action="store_true")


def run_precompute(args) -> int:
    paths = precompute(args.model, args.videos, args.out, args.shard_size, args.batch_size, progress=not args.quiet)
    print(f"wrote {len(paths)} shard(s) to {args.out}")
    return 0


def add_convert_args(p) -> None:
    p.add_argument("src", help="diffusers pipeline directory (model_index.json, transformer/, text_encoder/, ...): "
                               "Wan or HunyuanVideo")
    p.add_argument("-o", "--out", required=True, help="bundle directory to write")
    p.add_argument("--frames", type=int, default=None, help="video frames the bundle generates (default: the family's, "
                                                            "Wan 81, HunyuanVideo 129)")
    p.add_argument("--height", type=int, default=None, help="default: Wan 480, HunyuanVideo 720")
    p.add_argument("--width", type=int, default=None, help="default: Wan 832, HunyuanVideo 1280")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale, or the embedded scale of a guidance-distilled HunyuanVideo (default: Wan 5, "
                        "HunyuanVideo 6)")
    p.add_argument("--max-length", type=int, default=None, help="prompt tokens (default: Wan 512, HunyuanVideo 256)")
    p.add_argument("--image", default=None, choices=["none", "first_frame", "concat"],
                   help="image conditioning (default: read off the pipeline: concat for I2V transformers, "
                        "first_frame when model_index.json sets expand_timesteps)")


def run_convert(args) -> int:
    options = dict(num_frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                   guidance=args.guidance, max_length=args.max_length, image=args.image)
    path = bundle_from_diffusers(args.src, args.out, **{k: v for k, v in options.items() if v is not None})
    print(f"wrote {path}")
    return 0
