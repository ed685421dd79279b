"""flgengine: a compressed-model inference engine for video diffusion transformers.

    import flgengine
    video = flgengine.generate("a red circle moving left", model="path/to/bundle", output="out.mp4")
    pipe = flgengine.load("path/to/bundle")          # reuse the loaded model
    video = pipe(["prompt one", "prompt two"], seed=1)
    pipe = flgengine.load("path/to/bundle", engine="engines/aoti")  # the DiT through a built engine
"""

from __future__ import annotations

import os

from .version import __version__

__all__ = ["load", "generate", "save_video", "Pipeline", "__version__"]


def load(model: str | os.PathLike | None = None, *, device=None, dtype=None, backend: str | None = None,
         engine: str | os.PathLike | None = None, precision: str | None = None, allow_outside_paths: bool = False,
         lora=None, lora_scale=None, lora_mode: str = "merge", parallel: str | None = None,
         offload: str | None = None):
    """Loads a bundle (a path, or a shipped model's name) into a `Pipeline`.

    device: "cpu" / "cuda" / None (CUDA when available); dtype: None (bf16 on CUDA, fp32
    on CPU) or a torch dtype / "bf16" / "fp16" / "fp32"; backend: ops backend
    ("ref", "cpu", "cuda", "triton"; None = automatic). engine: a directory built by
    `python -m flgengine.export` from this bundle; the DiT runs through it (device and
    dtype then default to the engine's), and an engine built from another bundle is refused.
    precision: "bf16" (the DiT in `dtype`) or "fp8" (e4m3 weights, activations and
    self-attention: real on GPUs of compute capability >= 8.9, emulated on the CPU; see
    docs/architecture.md); None: "bf16", or an engine's own (one built in another precision
    than asked for is refused, naming both). allow_outside_paths: let pipeline.json name text encoder / codec
    directories outside the bundle (refused by default: a bundle cannot point us elsewhere).
    lora: a LoRA file or a list of them (safetensors; diffusers/PEFT, original Wan or kohya keys),
    `lora_scale` one strength or one per file (default 1.0). A teacher's LoRA maps onto a pruned
    student; `lora_mode` "merge" (default: into the weights, before FP8 quantisation) or
    "unmerged" (beside them: `pipe.dit.set_lora_scale(s)` switches them). `pipe.lora` reports the
    layers changed and any keys that matched nothing (see flgengine/lora.py).
    parallel: "sequence" (the video tokens split across the process group's ranks, all-to-all
    around self-attention) or "cfg" (a teacher's conditional and unconditional halves on
    different ranks); needs an initialised process group (torchrun). Every rank gets the same
    video; rank 0 writes `output` (see flgengine/parallel.py). offload: "blocks" keeps the DiT's
    block weights in pinned CPU memory and streams each to the GPU one block ahead (at most two
    blocks on the GPU: models larger than the card; flgengine/offload.py).
    """
    from .pipeline import Pipeline

    return Pipeline.from_bundle(model, device=device, dtype=dtype, backend=backend, engine=engine, precision=precision,
                                allow_outside_paths=allow_outside_paths, lora=lora, lora_scale=lora_scale,
                                lora_mode=lora_mode, parallel=parallel, offload=offload)


def generate(prompt, model: str | os.PathLike | None = None, *, image=None, seed: int = 0, num_frames: int | None = None,
             height: int | None = None, width: int | None = None, steps: int | None = None,
             guidance: float | None = None, device=None, dtype=None, backend: str | None = None,
             negative_prompt: str | None = None, output: str | os.PathLike | None = None,
             progress: bool = True, force: bool = False, engine: str | os.PathLike | None = None,
             cuda_graph: bool | None = None, precision: str | None = None, lora=None, lora_scale=None,
             parallel: str | None = None):
    """Generates one video per prompt; returns uint8 `(B, T, H, W, 3)`.

    Defaults (frames, size, steps, guidance) come from the bundle's pipeline.json.
    `image`: the first frame of an image-to-video model (a path, a PIL image, a uint8
    `(H, W, 3)` array; one for all prompts or a list, one per prompt), fitted to the frame by
    scaling to cover it and cropping the centre (`flgengine.image`).
    `output` (.mp4 / .gif) also writes the video (`name_i.mp4` per prompt when B > 1).
    A distilled student refuses other step counts and CFG unless `force=True`.
    `engine`: run the DiT through a built engine directory (see `load`). `cuda_graph`:
    capture a student's whole few-step loop as one CUDA graph (None: on for students on CUDA).
    `precision`: "bf16" or "fp8"; `lora`, `lora_scale`: LoRAs merged into the DiT; `parallel`:
    "sequence" / "cfg" over a process group (see `load`).
    """
    pipe = load(model, device=device, dtype=dtype, backend=backend, engine=engine, precision=precision, lora=lora,
                lora_scale=lora_scale, parallel=parallel)
    return pipe(prompt, image=image, seed=seed, num_frames=num_frames, height=height, width=width, steps=steps,
                guidance=guidance, negative_prompt=negative_prompt, output=output, progress=progress, force=force,
                cuda_graph=cuda_graph)


def save_video(frames, path, fps: int = 16):
    """Writes (T, H, W, 3) uint8 frames as .mp4 or .gif."""
    from .video import save_video as _save

    return _save(frames, path, fps=fps)


def __getattr__(name):
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'flgengine' has no attribute {name!r}")
