"""Building an engine directory from a bundle: trace, export, verify, write `engine.json`.

    1. load the bundle's DiT (reference ops) on the export device and dtype
    2. torch.export it at the spec's shapes, dynamic batch / text length
    3. the format's exporter: ONNX file | AOTInductor package | ONNX -> TensorRT plan
    4. verify: the engine vs PyTorch on fresh random inputs (opt shape, and the smallest
       dynamic shape); fails if the relative error exceeds the dtype's tolerance
    5. write engine.json, then move the directory into place

Everything is built in a temporary directory beside the target, so an interrupted or
failed export never leaves a half-written engine where a good one was.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .manifest import FORMATS, MANIFEST_NAME, BundleIdentity, EngineError, EngineManifest, Verification
from .spec import DYNAMIC_DIMS, TOLERANCE, EngineSpec, check_dynamic

__all__ = ["export_engine", "verify_engine", "VerificationError"]


class VerificationError(EngineError):
    """The engine's output differs from PyTorch's by more than the tolerance."""


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


# ---- verification ----------------------------------------------------------------------------

def verify_shapes(spec: EngineSpec) -> list[dict[str, int]]:
    """The opt shape, and when a dim is dynamic another one: one more sample than opt
    (a dynamic batch really batches) and the fewest text tokens."""
    opt = {"batch": spec.batch.opt, "text_len": spec.text_len.opt}
    other = {"batch": min(spec.batch.opt + 1, spec.batch.max), "text_len": spec.text_len.min}
    return [opt] if other == opt else [opt, other]


@torch.no_grad()
def verify_engine(run, model, spec: EngineSpec, device, *, seed: int = 0, tolerance: float | None = None) -> Verification:
    """`run(x, t, context)` vs `model` (reference ops) on fresh random inputs; raises
    VerificationError past `tolerance` (default: the spec dtype's)."""
    tol = spec.tolerance if tolerance is None else tolerance
    gen = torch.Generator().manual_seed(seed)
    worst_abs = worst_rel = 0.0
    shapes = verify_shapes(spec)
    old = model.backend
    model.backend = "ref"
    try:
        for dims in shapes:
            x, t, ctx = spec.random_inputs(gen, device, **dims)
            want = model(x, t, ctx).double()
            got = run(x, t, ctx).to(want.device).double()
            if got.shape != want.shape:
                raise VerificationError(f"engine output has shape {tuple(got.shape)}, PyTorch's {tuple(want.shape)}")
            if not torch.isfinite(got).all():
                raise VerificationError(f"engine output has NaN or Inf values at {dims}")
            worst_abs = max(worst_abs, (got - want).abs().max().item())
            worst_rel = max(worst_rel, ((got - want).norm() / want.norm().clamp_min(1e-30)).item())
    finally:
        model.backend = old
    result = Verification(max_abs_error=worst_abs, rel_error=worst_rel, tolerance=tol, shapes=shapes, seed=seed)
    if not worst_rel <= tol:
        raise VerificationError(f"engine differs from PyTorch: relative error {worst_rel:.3e} > tolerance {tol:.1e} "
                                f"(max abs error {worst_abs:.3e}); rerun with --no-verify to keep it anyway")
    return result


# ---- the directory ---------------------------------------------------------------------------

def _versions(fmt: str) -> dict[str, str]:
    from ..version import __version__

    out = {"flgengine": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    if fmt in ("onnx", "tensorrt"):
        from .onnx import onnx_versions

        out.update(onnx_versions())
    if fmt == "tensorrt":
        from .tensorrt import import_tensorrt

        out["tensorrt"] = import_tensorrt().__version__
    return out


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise EngineError(f"{out} exists and is not an engine directory; refusing to overwrite it (choose another -o)")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replaces `out` (absent, empty or an old engine) by `tmp`."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "engine")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def export_engine(bundle, fmt: str, out: str | os.PathLike, *, batch: int = 1, min_batch: int | None = None,
                  max_batch: int | None = None, num_frames: int | None = None, height: int | None = None,
                  width: int | None = None, latent: tuple[int, int, int] | None = None, text_len: int | None = None,
                  min_text_len: int | None = None, max_text_len: int | None = None,
                  dynamic: tuple[str, ...] = DYNAMIC_DIMS, dtype: str = "fp32", device: str | None = None,
                  opset: int | None = None, verify: bool = True, seed: int = 0, workspace_gib: float = 8.0,
                  timing_cache: str | os.PathLike | None = None, max_autotune: bool = False,
                  progress: bool = True) -> EngineManifest:
    """Exports a bundle's DiT as an engine directory `out`; returns its manifest.

    Shapes: the video `num_frames x height x width` (default: the bundle's pipeline.json)
    through the codec, or `latent=(F, H, W)` directly; `text_len` defaults to the text
    encoder's max_length. `dynamic` names the dims with a (min, opt, max) range.
    """
    from ..bundle import load_bundle
    from ..config import TORCH_DTYPES
    from ..pipeline import resolve_model

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    dtype = TORCH_DTYPES[dtype]
    if fmt == "tensorrt":
        from .tensorrt import builder_flags, import_tensorrt

        import_tensorrt()  # fail here, with the install hint, before any work
        builder_flags(dtype)
    device = torch.device(device or ("cuda" if fmt == "tensorrt" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} needs CUDA, which is not available here")
    if fmt == "tensorrt" and device.type != "cuda":
        raise ValueError("TensorRT engines are built on a CUDA device")
    if fmt == "onnx" and dtype == "bfloat16":
        raise ValueError("ONNX engines are float32 or float16 (ONNX Runtime has few bfloat16 kernels); for bf16 on a "
                         "GPU use --format tensorrt --dtype bf16 (a float32 ONNX built in bf16) or --format aoti")
    if fmt == "onnx" and device.type != "cpu":
        raise ValueError("ONNX engines are exported and verified on the CPU (ONNX Runtime); use --format tensorrt for CUDA")
    check_dynamic(dynamic)
    if max_autotune and fmt != "aoti":
        raise ValueError(f"max_autotune is an AOTInductor option (--format aoti), not {fmt}")
    out = Path(out)
    _check_target(out)
    bundle_path = resolve_model(bundle)
    steps = Progress((3 + verify + (fmt == "aoti")) if fmt != "tensorrt" else (4 + 2 * verify), enabled=progress)

    # 1. the DiT; a TensorRT build traces in float32 and sets its precision in the builder
    io_dtype = "float32" if fmt == "tensorrt" else dtype
    with steps.stage(f"loading {bundle_path} ({io_dtype}, {device})"):
        b = load_bundle(bundle_path, device=device, dtype=torch.float32 if fmt == "tensorrt" else getattr(torch, dtype))
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
            text_len = b.pipeline.text_encoder.max_length if b.pipeline.text_encoder.kind != "none" else 512
        spec = EngineSpec.from_options(model.config, latent, batch=batch, min_batch=min_batch, max_batch=max_batch,
                                       text_len=text_len, min_text_len=min_text_len, max_text_len=max_text_len,
                                       dynamic=tuple(dynamic), dtype=io_dtype)
        identity = BundleIdentity(path=str(bundle_path), weights_sha256=_weights_sha(bundle_path),
                                  model_config=model.config.to_dict())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an engine is an ordinary readable directory
    try:
        # 2-3. trace and write the engine file(s)
        options: dict = {}
        dyn = ", ".join(spec.dynamic) or "none"
        if fmt in ("onnx", "tensorrt"):
            from .onnx import DEFAULT_OPSET, OnnxRunner, check_onnx_spec, export_onnx
            from .tensorrt import TENSORRT_OPSET

            options["opset"] = opset or (TENSORRT_OPSET if fmt == "tensorrt" else DEFAULT_OPSET)
            with steps.stage(f"ONNX export (torch.onnx.export dynamo, opset {options['opset']}, dynamic: {dyn})"):
                files = export_onnx(model, spec, device, tmp, options["opset"])
                check_onnx_spec(tmp / files[0], spec)
            run = OnnxRunner(tmp / files[0]) if verify else None
            run_device = torch.device("cpu")
        if fmt == "tensorrt":
            from .tensorrt import TensorRTRunner, build_engine

            options.update(precision=dtype, workspace_gib=workspace_gib)
            if verify:  # the ONNX TensorRT consumes, checked first
                with steps.stage("verifying the ONNX with ONNX Runtime"):
                    model.cpu()
                    verify_engine(run, model, spec, "cpu", seed=seed)
                    model.to(device)
            with steps.stage(f"TensorRT build ({dtype})"):
                onnx_files = files
                files = build_engine(tmp / onnx_files[0], spec, tmp, precision=dtype, workspace_gib=workspace_gib,
                                     timing_cache=timing_cache) + onnx_files
            run = TensorRTRunner(tmp / files[0]) if verify else None
            run_device = device
        if fmt == "aoti":
            from .aoti import AotiRunner, export_aoti
            from .tracing import export_program

            with steps.stage(f"torch.export (dynamic: {dyn})"):
                program = export_program(model, spec, device)
            options["max_autotune"] = bool(max_autotune)
            with steps.stage(f"AOTInductor compile ({device.type}{', max_autotune' if max_autotune else ''})"):
                files = export_aoti(program, tmp, metadata={"weights_sha256": identity.weights_sha256,
                                                             "flgengine_dtype": dtype}, max_autotune=max_autotune,
                                   device_type=device.type)
            del program
            run = AotiRunner(tmp / files[0], device.type) if verify else None
            run_device = device

        # 4. verify
        verification = None
        if verify:
            with steps.stage(f"verifying {fmt} against PyTorch on fresh inputs"):
                tol = TOLERANCE[dtype] if fmt == "tensorrt" else None
                guarded = _guarded(run, spec, fmt, device)
                verification = verify_engine(guarded, model, spec, run_device if fmt != "onnx" else "cpu",
                                             seed=seed, tolerance=tol)
            run = guarded = None

        # 5. manifest and move into place
        with steps.stage(f"writing {out}"):
            manifest = EngineManifest(
                format=fmt, files=tuple(files), dtype=io_dtype, device=device.type if fmt != "onnx" else "cpu",
                inputs=spec.input_specs(), outputs=spec.output_specs(), dynamic_dims=spec.ranges, video=video,
                bundle=identity, versions=_versions(fmt), options=options, verification=verification,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            manifest.write(tmp)
            _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress and verification is not None:
        print(f"{fmt} engine in {out}: relative error {verification.rel_error:.2e}, max abs error "
              f"{verification.max_abs_error:.2e} vs PyTorch (tolerance {verification.tolerance:.0e})", file=sys.stderr)
    return manifest


def _weights_sha(bundle_path: Path) -> str:
    from .engine import weights_sha256

    return weights_sha256(bundle_path)


def _guarded(run, spec: EngineSpec, fmt: str, device):
    """The runner behind the same input checks `load_engine` puts in front of it."""
    from .engine import Engine

    manifest = EngineManifest(format=fmt, files=("-",), dtype=spec.dtype, device=device.type if fmt != "onnx" else "cpu",
                              inputs=spec.input_specs(), outputs=spec.output_specs(), dynamic_dims=spec.ranges,
                              video=None, bundle=BundleIdentity("-", "-", {}), versions={}, options={},
                              verification=None, created="-")
    return Engine(Path("."), manifest, run)
