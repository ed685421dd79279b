"""AOTInductor: `torch.export` program -> `torch._inductor.aoti_compile_and_package` -> `dit.pt2`.

The package is compiled for the device and dtype it was exported on (a CUDA package needs
the same GPU architecture to load). It does not check input shapes itself: a static
package given other shapes reads out of bounds and can crash the process, so the engine
checks every call against the manifest first (`Engine.check_inputs`).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["export_aoti", "AotiRunner", "AOTI_FILE"]

AOTI_FILE = "dit.pt2"


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
    """Loads `dit.pt2` back; call it with torch tensors on the package's device."""

    def __init__(self, path: Path, device: str = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{path} is a CUDA AOTInductor package but CUDA is not available here")
        self.model = _inductor().aoti_load_package(str(path))

    def metadata(self) -> dict[str, str]:
        return dict(self.model.get_metadata())

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(), t.contiguous(), context.contiguous())
