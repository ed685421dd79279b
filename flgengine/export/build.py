"""Building an engine directory from a bundle: trace, export, verify, write `engine.json`.

    1. load the bundle's DiT on the export device, in the dtype the format traces it in
    2-3. the format's builder (`builder.py`; ONNX file | AOTInductor package | ONNX ->
       TensorRT plan), which traces with the reference ops
    4. verify: the engine vs PyTorch on fresh random inputs (opt shape, and the smallest
       dynamic shape); fails if the relative error exceeds the dtype's tolerance
    5. write engine.json, then move the directory into place

Everything is built in a temporary directory beside the target and put in place whole
(flgengine.files.staged_directory), so an interrupted or failed export never leaves a
half-written engine where a good one was, and two exports into one directory never mix.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..files import check_replaceable, file_sha256, staged_directory
from .engine import Engine, weights_sha256
from .formats import BUILDERS
from .manifest import FORMATS, MANIFEST_NAME, BundleIdentity, EngineError, EngineManifest
from .spec import DYNAMIC_DIMS, EngineSpec, check_dynamic
from .verify import VerificationError, verify_engine

__all__ = ["export_engine", "verify_engine", "VerificationError"]


# ---- progress ----------------------------------------------------------------------------

class Progress:
    """Numbered stage lines on stderr, with a heartbeat every `every` s during long stages."""

    def __init__(self, total: int, enabled: bool = True, every: float = 15.0):
        self.total, self.enabled, self.every, self.n = total, enabled, every, 0

    @contextmanager
    def stage(self, what: str):
        self.n += 1
        t0 = time.perf_counter()
        done = threading.Event()
        if self.enabled:
            print(f"[{self.n}/{self.total}] {what} ...", file=sys.stderr, flush=True)

            def beat():
                while not done.wait(self.every):
                    print(f"      ... {what}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

            threading.Thread(target=beat, daemon=True).start()
        try:
            yield
        finally:
            done.set()
            if self.enabled:
                print(f"      {what}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


# ---- the directory ---------------------------------------------------------------------------

def _check_target(out: Path) -> None:
    check_replaceable(out, MANIFEST_NAME, "an engine directory", error=EngineError)


def clip_tokens(bundle_path: Path, pipeline) -> int | None:
    """How many tokens the bundle's CLIP image encoder gives: (image_size / patch_size)^2 + 1
    (its config.json), or None without one."""
    import json

    enc = pipeline.image_encoder
    if enc.kind != "clip":
        return None
    path = Path(enc.path) if Path(enc.path).is_absolute() else Path(bundle_path) / enc.path
    try:
        c = json.loads((path / "config.json").read_text())
        return (int(c["image_size"]) // int(c["patch_size"])) ** 2 + 1
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}/config.json: cannot read the CLIP image size and patch size ({e}); "
                         "give --image-len") from None


def latent_grid(bundle_path: Path, pipeline, num_frames, height, width) -> tuple[tuple[int, int, int], dict]:
    """The latent (F, H, W) of a num_frames x height x width video through the bundle's codec."""
    from ..codec import build_codec

    num_frames = pipeline.num_frames if num_frames is None else num_frames
    height = pipeline.height if height is None else height
    width = pipeline.width if width is None else width
    codec = build_codec(pipeline.codec, bundle_path, device="cpu", dtype=torch.float32)
    if codec is None:
        raise ValueError(f"bundle {bundle_path} has no codec (DiT-only): give the latent grid with --latent F,H,W")
    _, f, h, w = codec.latent_shape(num_frames, height, width)
    s = codec.spatial_factor
    if height % s or width % s:
        raise ValueError(f"height and width must be multiples of the codec's factor {s}, got {height}x{width}")
    return (f, h, w), {"num_frames": num_frames, "height": height, "width": width}


# An FP8 engine's verification tolerance: e4m3 has 3 mantissa bits, so a value the engine and
# PyTorch compute a few fp32 ulps apart (another summation order) lands on the neighbouring code
# when it sits at a rounding boundary: a few elements move by one e4m3 step (1e-5 - 1e-4 of the
# output, measured on tiny models). FP8 itself differs from the bf16 DiT by ~2e-2: the check
# still tells a wrong engine.
FP8_TOLERANCE = 1e-3


def check_engine_precision(precision: str, fmt: str, device_type: str) -> None:
    """ValueError unless an engine of format `fmt` on `device_type` can be built in `precision`.

    FP8 engines are the CPU's: their graphs are the reference ops, which on a GPU would run FP8
    self-attention as the fp32 emulation (a Sq x Skv score matrix per head) instead of the Triton
    kernel, and TensorRT's FP8 needs its own quantise / dequantise graph (not built)."""
    from ..model.precision import PRECISIONS

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp8" and (fmt not in ("onnx", "aoti") or device_type != "cpu"):
        raise ValueError(f"precision fp8: engines are built in FP8 for the CPU (onnx, aoti), not {fmt} on "
                         f"{device_type}; on a GPU run the FP8 DiT in PyTorch (load(..., precision='fp8'), "
                         "`generate --precision fp8`), whose attention is the FP8 Triton kernel")


def export_engine(bundle, fmt: str, out: str | os.PathLike, *, batch: int = 1, min_batch: int | None = None,
                  max_batch: int | None = None, num_frames: int | None = None, height: int | None = None,
                  width: int | None = None, latent: tuple[int, int, int] | None = None, text_len: int | None = None,
                  min_text_len: int | None = None, max_text_len: int | None = None,
                  dynamic: tuple[str, ...] = DYNAMIC_DIMS, dtype: str = "fp32", device: str | None = None,
                  opset: int | None = None, verify: bool = True, seed: int = 0, workspace_gib: float = 8.0,
                  timing_cache: str | os.PathLike | None = None, max_autotune: bool = False,
                  image_len: int | None = None, precision: str = "bf16", progress: bool = True) -> EngineManifest:
    """Exports a bundle's DiT as an engine directory `out`; returns its manifest.

    Shapes: the video `num_frames x height x width` (default: the bundle's pipeline.json)
    through the codec, or `latent=(F, H, W)` directly; `text_len` defaults to the text
    encoder's max_length. `dynamic` names the dims with a (min, opt, max) range. `opset`
    (ONNX, TensorRT), `workspace_gib`, `timing_cache` (TensorRT) and `max_autotune` (AOTInductor)
    go to the format's builder. An image-to-video bundle's engine takes what its DiT takes: t per
    token ("first_frame"), the CLIP image tokens (`image_len` of them; default: what the bundle's
    image encoder gives) for a DiT with image_dim. `precision`: "bf16" (the DiT in `dtype`) or
    "fp8" (e4m3 block linears and self-attention, `flgengine/model/precision.py`): ONNX and
    AOTInductor engines on the CPU, whose graphs hold the FP8 numerics the CPU emulates (e4m3
    weights stored, activations rounded to e4m3 per token, fp32 products).
    """
    from ..bundle import load_bundle
    from ..config import TORCH_DTYPES
    from ..pipeline import resolve_model

    if fmt not in BUILDERS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    check_engine_precision(precision, fmt, torch.device(device or BUILDERS[fmt].default_device).type)
    builder = BUILDERS[fmt](TORCH_DTYPES[dtype], device, opset=opset, workspace_gib=workspace_gib,
                            timing_cache=timing_cache, max_autotune=max_autotune)
    check_dynamic(dynamic)
    out = Path(out)
    _check_target(out)
    bundle_path = resolve_model(bundle)
    steps = Progress(2 + builder.stages(verify) + verify, enabled=progress)

    # 1. the DiT
    trace_dtype = builder.trace_dtype
    with steps.stage(f"loading {bundle_path} ({trace_dtype}, {builder.device})"):
        b = load_bundle(bundle_path, device=builder.device, dtype=getattr(torch, trace_dtype), precision=precision)
        model = b.model
        if b.pipeline.low_noise_boundary is not None:
            raise ValueError(f"{bundle_path} has two DiTs (high / low noise, boundary {b.pipeline.low_noise_boundary}); "
                             "engines hold one: export a student, or a one-DiT teacher")
        video = None
        if latent is None:
            latent, video = latent_grid(bundle_path, b.pipeline, num_frames, height, width)
        elif any(v is not None for v in (num_frames, height, width)):
            raise ValueError("give either the video size (frames, height, width) or the latent grid, not both")
        if text_len is None:
            text_len = b.pipeline.text_encoder.context_length if b.pipeline.text_encoder.kind != "none" else 512
        if image_len is None:
            image_len = clip_tokens(bundle_path, b.pipeline)  # None without a CLIP image encoder
        spec = EngineSpec.from_options(model, latent, batch=batch, min_batch=min_batch, max_batch=max_batch,
                                       text_len=text_len, min_text_len=min_text_len, max_text_len=max_text_len,
                                       dynamic=tuple(dynamic), dtype=trace_dtype,
                                       per_token_t=b.pipeline.image == "first_frame", image_len=image_len)
        identity = BundleIdentity(path=str(bundle_path), weights_sha256=weights_sha256(bundle_path),
                                  model_config=model.config.to_dict())

    with staged_directory(out) as tmp:
        # 2-3. the format's engine file(s)
        files = builder.build(model, spec, tmp, steps, verify=verify, seed=seed,
                              metadata={"weights_sha256": identity.weights_sha256, "flgengine_dtype": builder.dtype})
        manifest = EngineManifest(
            format=fmt, files=tuple(files), sha256={name: file_sha256(tmp / name) for name in files},
            dtype=spec.dtype, device=builder.engine_device, inputs=spec.input_specs(),
            outputs=spec.output_specs(), dynamic_dims=spec.ranges, video=video, bundle=identity,
            versions=builder.versions(), options=dict(builder.options), verification=None,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), precision=precision,
        )

        # 4. verify the engine behind the input checks `load_engine` puts in front of it
        if verify:
            with steps.stage(f"verifying {fmt} against PyTorch on fresh inputs"):
                engine = Engine(tmp, manifest, builder.open(tmp / files[0], builder.engine_device))
                tolerance = builder.tolerance
                if precision == "fp8":  # see FP8_TOLERANCE
                    tolerance = max(tolerance or spec.tolerance, FP8_TOLERANCE)
                verification = verify_engine(engine, model, spec, builder.engine_device, seed=seed, tolerance=tolerance)
                del engine
            manifest = dataclasses.replace(manifest, verification=verification)

        # 5. the manifest; the directory replaces `out` as the block ends (staged_directory: under a
        # lock, in one step, so a kill or a second export into `out` never leaves a mix)
        with steps.stage(f"writing {out}"):
            manifest.write(tmp)
    v = manifest.verification
    if progress and v is not None:
        print(f"{fmt} engine in {out}: relative error {v.rel_error:.2e}, max abs error "
              f"{v.max_abs_error:.2e} vs PyTorch (tolerance {v.tolerance:.0e})", file=sys.stderr)
    return manifest
