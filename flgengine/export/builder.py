"""The interface every engine format implements: `export_engine` (`build.py`) and
`load_engine` (`engine.py`) go through it and name no format themselves.

    builder = BUILDERS[fmt](dtype, device, **options)   # checks the options, before any work
    b = load_bundle(..., dtype=builder.trace_dtype)      # the DiT as the format traces it
    files = builder.build(model, spec, out_dir, steps, verify=..., seed=..., metadata=...)
    runner = builder.open(out_dir / files[0], builder.engine_device)   # to verify, and in load_engine
    engine.json: format, files, builder.engine_device, builder.options, builder.versions()

A format is a subclass in its module (`onnx.py`, `aoti.py`, `tensorrt.py`) entered in
`formats.BUILDERS`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, ClassVar

import torch

from .spec import EngineSpec

__all__ = ["EngineBuilder", "dynamic_names"]

Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class EngineBuilder:
    """Builds and opens one engine format. The constructor checks the options (raising
    before any work); `options` is what engine.json records of them."""

    format: ClassVar[str]
    default_device: ClassVar[str] = "cpu"
    stage_count: ClassVar[int] = 1  # progress stages `build` reports (without verify's)

    def __init__(self, dtype: str, device: str | torch.device | None = None, *, max_autotune: bool = False,
                 **other_formats_options):
        """`dtype`: "float32" / "bfloat16" / "float16", what the engine computes in. Options
        of other formats are ignored, except `max_autotune` (AOTInductor's), which is refused."""
        if max_autotune:
            raise ValueError(f"max_autotune is an AOTInductor option (--format aoti), not {self.format}")
        self.dtype = dtype
        self.device = torch.device(device or self.default_device)  # where it is built
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device} needs CUDA, which is not available here")
        self.options: dict = {}

    # -- what the build and the manifest need to know ---------------------------------------
    @property
    def trace_dtype(self) -> str:
        """The dtype the DiT is loaded and traced in: the engine's inputs and output."""
        return self.dtype

    @property
    def engine_device(self) -> str:
        """The device type the engine runs on (engine.json's `device`)."""
        return self.device.type

    @property
    def tolerance(self) -> float | None:
        """The verification's tolerance; None: the trace dtype's (`spec.TOLERANCE`)."""
        return None

    def stages(self, verify: bool) -> int:
        return self.stage_count

    def versions(self) -> dict[str, str]:
        """Tool versions for engine.json."""
        from ..version import __version__

        out = {"flgengine": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
        if torch.version.cuda:
            out["cuda"] = torch.version.cuda
        return out

    # -- the format's work ----------------------------------------------------------------
    def build(self, model, spec: EngineSpec, out_dir: Path, steps, *, verify: bool, seed: int,
              metadata: dict[str, str]) -> list[str]:
        """Writes the engine file(s) into `out_dir` (reporting `stages()` progress stages on
        `steps`); returns their names, the one to load first."""
        raise NotImplementedError

    @staticmethod
    def open(path: Path, device: str) -> Runner:
        """The engine file at `path` as a callable `runner(x, t, context) -> velocity`."""
        raise NotImplementedError


def dynamic_names(spec: EngineSpec) -> str:
    """The spec's dynamic dims for a progress line: "batch, text_len" or "none"."""
    return ", ".join(spec.dynamic) or "none"
