"""ONNX: `torch.onnx.export(dynamo=True)` of the DiT (reference ops, `tracing.traceable`)
-> `dit.onnx` (+ `dit.onnx.data`), run with ONNX Runtime.

Opset 23 is the default: it has native `RMSNormalization` and `Attention` nodes, so the
graph keeps the model's structure. Weights always go to external data (`dit.onnx.data`),
so a model past protobuf's 2 GiB limit exports the same way a tiny one does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .builder import EngineBuilder, dynamic_names
from .spec import EngineSpec

__all__ = ["DEFAULT_OPSET", "export_onnx", "OnnxRunner", "onnx_versions", "OnnxBuilder"]

DEFAULT_OPSET = 23
ONNX_FILE = "dit.onnx"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"ONNX export needs {module}: pip install 'flgengine[export]' "
                          "(onnx, onnxscript, onnxruntime)") from None


def onnx_versions() -> dict[str, str]:
    out = {}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            out[name] = _require(name).__version__
        except ImportError:
            pass
    return out


def export_onnx(model, spec: EngineSpec, device, out_dir: Path, opset: int = DEFAULT_OPSET) -> list[str]:
    """Writes `out_dir/dit.onnx` and its external data; returns the file names written.

    Traced from the module (not from an ExportedProgram) so the graph's dynamic dims keep
    their names (`batch`, `text_len`) instead of torch.export's `s0`, `s1`.
    """
    from .tracing import traceable

    _require("onnx"), _require("onnxscript")
    out_dir = Path(out_dir)
    example = spec.random_inputs(torch.Generator().manual_seed(1234), device, **spec.example_dims())
    path = out_dir / ONNX_FILE
    # the exporter logs every op it cannot find a torchvision translation for, and more
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    fp8 = any(t.dtype == torch.float8_e4m3fn for t in model.buffers())  # an FP8 DiT (model/precision.py)
    try:
        with traceable(model, example), torch.no_grad():
            program = torch.onnx.export(model, example, input_names=spec.input_names, output_names=["velocity"],
                                        opset_version=opset, dynamo=True, dynamic_shapes=spec.torch_dynamic_shapes(),
                                        report=False, verbose=False, optimize=not fp8)
        if fp8:
            _optimize_keeping_e4m3(program.model)
        program.save(str(path), external_data=True)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    files = sorted(p.name for p in out_dir.iterdir() if p.name.startswith(ONNX_FILE))
    return [ONNX_FILE] + [f for f in files if f != ONNX_FILE]


def _optimize_keeping_e4m3(model) -> None:
    """The exporter's graph optimisation (constant folding, dead code), except that the e4m3
    weights' dequantisation (Cast to float, then times the scales) is not folded into fp32
    constants: the graph keeps the weights in e4m3 (half of bf16 on disk and in memory)."""
    from onnxscript import ir, optimizer

    def should_fold(node) -> bool | None:
        if node.op_type == "Cast" and node.inputs and node.inputs[0] is not None \
                and node.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN:
            return False
        return None  # the optimiser's own choice

    optimizer.optimize_ir(model, should_fold=should_fold)


def onnx_input_dims(path: Path) -> dict[str, list[int | str]]:
    """Input name -> shape as the ONNX graph declares it (ints, or dim names for dynamic dims)."""
    onnx = _require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


class OnnxRunner:
    """Runs `dit.onnx` with ONNX Runtime on the CPU; takes and returns torch tensors.
    Uses as many threads as PyTorch does (`torch.get_num_threads()`) unless told otherwise."""

    def __init__(self, path: Path, threads: int | None = None):
        ort = _require("onnxruntime")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.device = torch.device("cpu")

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """(x, t, context[, image_context]) in the graph's input order."""
        names = [i.name for i in self.session.get_inputs()]
        feeds = {n: (v.float() if n == "t" else v).detach().contiguous().numpy() for n, v in zip(names, inputs)}
        (out,) = self.session.run(["velocity"], feeds)
        return torch.from_numpy(out)


def check_onnx_spec(path: Path, spec: EngineSpec) -> None:
    """The ONNX graph's inputs are the spec's: names, static sizes, and a named dim exactly
    where the spec has a dynamic one (what TensorRT's optimisation profile refers to)."""
    declared = onnx_input_dims(path)
    for s in spec.input_specs():
        got = declared.get(s.name)
        if got is None or len(got) != len(s.shape):
            raise ValueError(f"{path}: input {s.name!r} is {got}, expected rank {len(s.shape)}")
        for want, have in zip(s.shape, got):
            if isinstance(want, int) and have != want or isinstance(want, str) and not isinstance(have, str):
                raise ValueError(f"{path}: input {s.name!r} has shape {got}, expected {list(s.shape)}")


def export_checked(model, spec: EngineSpec, device, out_dir: Path, opset: int, steps) -> list[str]:
    """`export_onnx` as one progress stage, then `check_onnx_spec`; the file names written."""
    with steps.stage(f"ONNX export (torch.onnx.export dynamo, opset {opset}, dynamic: {dynamic_names(spec)})"):
        files = export_onnx(model, spec, device, out_dir, opset)
        check_onnx_spec(Path(out_dir) / files[0], spec)
    return files


class OnnxBuilder(EngineBuilder):
    """`dit.onnx`, exported and verified on the CPU and run with ONNX Runtime; float32 or float16."""

    format = "onnx"

    def __init__(self, dtype: str, device=None, *, opset: int | None = None, **options):
        super().__init__(dtype, device, **options)
        if dtype == "bfloat16":
            raise ValueError("ONNX engines are float32 or float16 (ONNX Runtime has few bfloat16 kernels); for bf16 "
                             "on a GPU use --format tensorrt --dtype bf16 (a float32 ONNX built in bf16) or --format aoti")
        if self.device.type != "cpu":
            raise ValueError("ONNX engines are exported and verified on the CPU (ONNX Runtime); use --format tensorrt "
                             "for CUDA")
        self.options = {"opset": opset or DEFAULT_OPSET}

    def build(self, model, spec, out_dir, steps, *, verify, seed, metadata) -> list[str]:
        return export_checked(model, spec, self.device, out_dir, self.options["opset"], steps)

    @staticmethod
    def open(path: Path, device: str) -> OnnxRunner:
        return OnnxRunner(path)

    def versions(self) -> dict[str, str]:
        return {**super().versions(), **onnx_versions()}
