"""`python -m flgengine.export BUNDLE --format onnx|aoti|tensorrt -o DIR`: a bundle's DiT as an engine.

    python -m flgengine.export path/to/bundle --format onnx -o engines/onnx
    python -m flgengine.export path/to/bundle --format aoti -o engines/aoti --max-batch 2
    python -m flgengine.export path/to/bundle --format tensorrt --dtype bf16 -o engines/trt
    python -m flgengine generate "a red circle" --model path/to/bundle --engine engines/aoti
"""

from __future__ import annotations

import argparse
import json
import sys

from .spec import DYNAMIC_DIMS


def _dims(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    return () if names in ((), ("none",)) else names


def _grid(text: str) -> tuple[int, int, int]:
    try:
        f, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected F,H,W (three integers), got {text!r}") from None
    return f, h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flgengine.export",
        description="Export a bundle's DiT (reference ops) to ONNX, AOTInductor or TensorRT, verify it against "
                    "PyTorch on fresh random inputs, and write DIR/engine.json. The text encoder and codec stay in "
                    "PyTorch; run the engine with `python -m flgengine generate --engine DIR`.")
    p.add_argument("bundle", help="bundle directory or shipped model name")
    p.add_argument("--format", required=True, choices=["onnx", "aoti", "tensorrt"], help="engine kind")
    p.add_argument("-o", "--output", required=True, help="engine directory to write (replaced if it holds an engine)")
    s = p.add_argument_group("shapes (frames, height and width are fixed per engine)")
    s.add_argument("--frames", type=int, default=None, help="video frames the latents stand for (default: pipeline.json)")
    s.add_argument("--height", type=int, default=None, help="video height in pixels (default: pipeline.json)")
    s.add_argument("--width", type=int, default=None, help="video width in pixels (default: pipeline.json)")
    s.add_argument("--latent", type=_grid, default=None, metavar="F,H,W",
                   help="the latent grid itself (DiT-only bundles, which have no codec)")
    s.add_argument("--batch", type=int, default=1, help="batch size to optimise for (default: 1)")
    s.add_argument("--min-batch", type=int, default=None, help="smallest batch (dynamic; default 1)")
    s.add_argument("--max-batch", type=int, default=None, help="largest batch (dynamic; default max(4, 2*batch))")
    s.add_argument("--text-len", type=int, default=None, help="text tokens to optimise for (default: the text encoder's max_length)")
    s.add_argument("--min-text-len", type=int, default=None, help="fewest text tokens (dynamic; default 1)")
    s.add_argument("--max-text-len", type=int, default=None, help="most text tokens (dynamic; default --text-len)")
    s.add_argument("--image-len", type=int, default=None,
                   help="CLIP image tokens of a Wan2.1-I2V DiT (default: what the bundle's image encoder gives)")
    s.add_argument("--dynamic", type=_dims, default=DYNAMIC_DIMS, metavar="DIMS",
                   help=f"comma-separated dynamic dims among {','.join(DYNAMIC_DIMS)}, or 'none' (default: both)")
    e = p.add_argument_group("engine")
    e.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (TensorRT: the builder's precision; default fp32)")
    e.add_argument("--precision", default="bf16", choices=["bf16", "fp8"],
                   help="the DiT's precision: bf16 (its --dtype) or fp8 (e4m3 block linears and self-attention, "
                        "the numerics `--precision fp8` emulates on the CPU; onnx and aoti on the CPU; default bf16)")
    e.add_argument("--device", default=None, help="cpu or cuda (AOTInductor; default cpu; TensorRT: cuda)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 23; 20 for the ONNX TensorRT consumes)")
    e.add_argument("--max-autotune", action="store_true",
                   help="AOTInductor: benchmark GEMM kernels while compiling (~3x compile time, a few %% faster)")
    e.add_argument("--workspace-gib", type=float, default=8.0, help="TensorRT builder workspace (default 8 GiB)")
    e.add_argument("--timing-cache", default=None, help="TensorRT timing cache file to read and update "
                                                        "(default: DIR/timing.cache)")
    v = p.add_argument_group("verification")
    v.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare the engine with PyTorch on fresh random inputs and fail past the dtype's "
                        "tolerance (default: on)")
    v.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON when done")
    return p


def _export(args) -> int:
    from .build import export_engine

    manifest = export_engine(
        args.bundle, args.format, args.output, batch=args.batch, min_batch=args.min_batch, max_batch=args.max_batch,
        num_frames=args.frames, height=args.height, width=args.width, latent=args.latent, text_len=args.text_len,
        min_text_len=args.min_text_len, max_text_len=args.max_text_len, dynamic=args.dynamic, dtype=args.dtype,
        device=args.device, opset=args.opset, verify=args.verify, seed=args.seed, workspace_gib=args.workspace_gib,
        timing_cache=args.timing_cache, max_autotune=args.max_autotune, image_len=args.image_len,
        precision=args.precision, progress=not args.quiet)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    elif not args.quiet:
        print(f"wrote {args.output} ({manifest.format}, {manifest.describe_shapes()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..__main__ import run_command

    args = build_parser().parse_args(argv)
    args.func = _export
    try:
        return run_command(args)
    except ImportError as e:  # a missing optional package: say how to install it
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
