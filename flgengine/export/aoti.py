"""AOTInductor: `torch.export` program -> `torch._inductor.aoti_compile_and_package` -> `dit.pt2`.

The package is compiled for the device and dtype it was exported on (a CUDA package needs
the same GPU architecture to load). It does not check input shapes itself: a static
package given other shapes reads out of bounds and can crash the process, so the engine
checks every call against the manifest first (`Engine.check_inputs`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from .builder import EngineBuilder, dynamic_names

__all__ = ["export_aoti", "AotiRunner", "AOTI_FILE", "probe_load", "AotiLoadError", "AotiBuilder"]

AOTI_FILE = "dit.pt2"
PROBE_TIMEOUT_S = 120.0
_PROBE_CODE = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])"  # what the child runs


class AotiLoadError(RuntimeError):
    """An AOTInductor package that does not load back here (the loader crashed or hung)."""


def exit_reason(returncode: int) -> str:
    """A child's non-zero exit status in words: 'crashed (SIGSEGV)' or 'failed (exit 1)'."""
    return f"crashed ({signal.Signals(-returncode).name})" if returncode < 0 else f"failed (exit {returncode})"


def probe_load(path: Path, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Loads `path` in a child process first, so a loader that crashes (torch 2.11's CUDA
    loader segfaulted on our exports, bench/RESULTS.md) or hangs takes the child down, not
    this process: AotiLoadError says which. The child only loads the package."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE_CODE, str(path)], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    except subprocess.TimeoutExpired:
        raise AotiLoadError(f"{path}: loading the AOTInductor package did not finish in {timeout:.0f} s "
                            f"(torch {torch.__version__}); the package is left for inspection") from None
    if r.returncode != 0:
        raise AotiLoadError(f"{path}: the loader {exit_reason(r.returncode)} loading the AOTInductor package "
                            f"(torch {torch.__version__}):\n"
                            f"{r.stderr.strip()[-1500:]}")


def _inductor():
    import torch._inductor as inductor

    if not hasattr(inductor, "aoti_compile_and_package"):
        raise ImportError(f"AOTInductor packaging needs torch >= 2.6 (this is {torch.__version__})")
    return inductor


def export_aoti(program: torch.export.ExportedProgram, out_dir: Path, metadata: dict[str, str] | None = None,
                max_autotune: bool = False, device_type: str = "cpu") -> list[str]:
    """Compiles `program` into `out_dir/dit.pt2`; `metadata` is stored in the package.
    `max_autotune` benchmarks GEMM candidates while compiling (ATen and Inductor's C++
    templates on the CPU, its Triton templates on CUDA): ~3x the compile time on the CPU
    for a few percent (bench/RESULTS.md)."""
    inductor = _inductor()
    path = Path(out_dir) / AOTI_FILE
    configs = {"aot_inductor.metadata": dict(metadata)} if metadata else {}
    if max_autotune:
        configs.update({"max_autotune": True, "max_autotune_gemm_backends": "ATEN,CPP" if device_type == "cpu" else "ATEN,TRITON"})
    with torch.no_grad():
        inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs or None)
    return [AOTI_FILE]


class AotiRunner:
    """Loads `dit.pt2` back; call it with torch tensors on the package's device. `probe`
    (default: on for CUDA packages) loads it in a child process first (`probe_load`)."""

    def __init__(self, path: Path, device: str = "cpu", probe: bool | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{path} is a CUDA AOTInductor package but CUDA is not available here")
        if probe is None:
            probe = self.device.type == "cuda"
        if probe:
            probe_load(path)
        self.model = _inductor().aoti_load_package(str(path))

    def metadata(self) -> dict[str, str]:
        return dict(self.model.get_metadata())

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """(x, t, context[, image_context]), as the program was exported."""
        return self.model(*(v.contiguous() for v in inputs))


class AotiBuilder(EngineBuilder):
    """`dit.pt2`: the `torch.export` program compiled by AOTInductor for the export device."""

    format = "aoti"
    stage_count = 2

    def __init__(self, dtype: str, device=None, *, max_autotune: bool = False, **options):
        super().__init__(dtype, device, **options)
        self.options = {"max_autotune": bool(max_autotune)}

    def build(self, model, spec, out_dir, steps, *, verify, seed, metadata) -> list[str]:
        from .tracing import export_program

        with steps.stage(f"torch.export (dynamic: {dynamic_names(spec)})"):
            program = export_program(model, spec, self.device)
        autotune = self.options["max_autotune"]
        with steps.stage(f"AOTInductor compile ({self.device.type}{', max_autotune' if autotune else ''})"):
            return export_aoti(program, out_dir, metadata=metadata, max_autotune=autotune, device_type=self.device.type)

    @staticmethod
    def open(path: Path, device: str) -> AotiRunner:
        return AotiRunner(path, device)
