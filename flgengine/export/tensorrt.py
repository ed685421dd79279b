"""TensorRT: the exported ONNX -> a serialized engine (`dit.plan`) built with the
`tensorrt` Python API, and a runner.

TensorRT is imported lazily (only here, only when used): where it is missing we say how
to install it. The ONNX it consumes is exported at opset 20 by default (decomposed RMSNorm
and attention, which TensorRT's parser takes and fuses itself); it is verified with ONNX
Runtime before the build, so a wrong graph never reaches TensorRT.

Build: one optimisation profile whose (min, opt, max) shapes come from the dynamic dims
(`EngineSpec.profiles`), fp16 / bf16 builder flags for those precisions (the ONNX and
the engine's inputs and output stay fp32; TensorRT picks each layer's precision), a timing cache read and written beside the engine
(or where `--timing-cache` says) so rebuilds skip tactic timing.

Run: inputs and the output are torch CUDA tensors (the PyTorch allocator owns the
buffers; TensorRT reads and writes them in place through their addresses) and the engine
is enqueued on PyTorch's current stream, so it is ordered with the sampler's own kernels
without extra synchronisation and can be captured in a CUDA graph.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .builder import EngineBuilder
from .spec import TOLERANCE, EngineSpec

__all__ = ["TENSORRT_OPSET", "TENSORRT_FILE", "INSTALL_HINT", "import_tensorrt", "build_engine", "TensorRTRunner",
           "TensorRTBuilder"]

TENSORRT_OPSET = 20
TENSORRT_FILE = "dit.plan"
TIMING_CACHE_FILE = "timing.cache"
INSTALL_HINT = ("TensorRT is not installed. On a machine with an NVIDIA GPU and a CUDA 12/13 driver: "
                "pip install tensorrt (NVIDIA's wheels come from pypi.nvidia.com: "
                "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12), "
                "or use NVIDIA's TensorRT container. Then rerun with --format tensorrt. "
                "Without TensorRT, --format aoti builds a CUDA engine with PyTorch alone.")
# engine dtype -> builder flag name (float32 needs none)
PRECISION_FLAGS = {"float16": "FP16", "bfloat16": "BF16"}


def import_tensorrt():
    """`tensorrt`, or an ImportError that says how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return tensorrt


def builder_flags(precision: str) -> list[str]:
    """TensorRT BuilderFlag names to set for an engine computing in `precision`."""
    if precision not in ("float32", *PRECISION_FLAGS):
        raise ValueError(f"TensorRT precision must be float32, float16 or bfloat16, got {precision!r}")
    return [PRECISION_FLAGS[precision]] if precision in PRECISION_FLAGS else []


def build_engine(onnx_path: Path, spec: EngineSpec, out_dir: Path, *, precision: str = "float32",
                 workspace_gib: float = 8.0, timing_cache: Path | None = None) -> list[str]:
    """Builds `out_dir/dit.plan` from `onnx_path`; returns the file names written."""
    from ..files import atomic_replace

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; TensorRT 8 needs the flag
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if flag is None or int(trt.__version__.split(".")[0]) >= 10 else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: it finds dit.onnx.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for name in builder_flags(precision):
        config.set_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profiles().items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else Path(out_dir) / TIMING_CACHE_FILE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    out = Path(out_dir) / TENSORRT_FILE
    atomic_replace(out, lambda tmp: Path(tmp).write_bytes(bytes(plan)))
    cache_bytes = bytes(config.get_timing_cache().serialize())
    atomic_replace(cache_path, lambda tmp: Path(tmp).write_bytes(cache_bytes))
    return [TENSORRT_FILE] + ([TIMING_CACHE_FILE] if cache_path.parent == Path(out_dir) else [])


class TensorRTRunner:
    """Runs `dit.plan` on torch CUDA tensors, on PyTorch's current stream. The engine's
    inputs and output are float32 (its layers run in the build's precision)."""

    def __init__(self, path: Path):
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise ValueError(f"{path} is a TensorRT engine; it needs a CUDA device")
        self.device = torch.device("cuda")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ValueError(f"{path}: TensorRT could not load this engine (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        """(x, t, context[, image_context]) in the ONNX graph's input order."""
        inputs = {n: v.float().contiguous() for n, v in zip(("x", "t", "context", "image_context"), tensors)}
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape("velocity")), dtype=torch.float32, device=self.device)
        self.context.set_tensor_address("velocity", out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine")
        return out


class TensorRTBuilder(EngineBuilder):
    """`dit.plan`: a float32 ONNX (verified with ONNX Runtime first) built by TensorRT in the
    engine's precision, on a CUDA device; the ONNX stays beside it."""

    format = "tensorrt"
    default_device = "cuda"

    def __init__(self, dtype: str, device=None, *, opset: int | None = None, workspace_gib: float = 8.0,
                 timing_cache: str | Path | None = None, **options):
        import_tensorrt()  # fail here, with the install hint, before any work
        builder_flags(dtype)
        super().__init__(dtype, device, **options)
        if self.device.type != "cuda":
            raise ValueError("TensorRT engines are built on a CUDA device")
        self.timing_cache = timing_cache
        self.options = {"opset": opset or TENSORRT_OPSET, "precision": dtype, "workspace_gib": workspace_gib}

    @property
    def trace_dtype(self) -> str:
        return "float32"  # the precision is the builder's; the ONNX and the engine's inputs stay float32

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]

    def stages(self, verify: bool) -> int:
        return 2 + verify  # ONNX export, [ONNX verification], TensorRT build

    def build(self, model, spec, out_dir, steps, *, verify, seed, metadata) -> list[str]:
        from .onnx import OnnxRunner, export_checked
        from .verify import verify_engine

        onnx_files = export_checked(model, spec, self.device, out_dir, self.options["opset"], steps)
        if verify:  # the ONNX TensorRT consumes, checked first
            with steps.stage("verifying the ONNX with ONNX Runtime"):
                model.cpu()
                verify_engine(OnnxRunner(Path(out_dir) / onnx_files[0]), model, spec, "cpu", seed=seed)
                model.to(self.device)
        with steps.stage(f"TensorRT build ({self.dtype})"):
            return build_engine(Path(out_dir) / onnx_files[0], spec, out_dir, precision=self.dtype,
                                workspace_gib=self.options["workspace_gib"], timing_cache=self.timing_cache) + onnx_files

    @staticmethod
    def open(path: Path, device: str) -> TensorRTRunner:
        return TensorRTRunner(path)

    def versions(self) -> dict[str, str]:
        from .onnx import onnx_versions

        return {**super().versions(), **onnx_versions(), "tensorrt": import_tensorrt().__version__}
