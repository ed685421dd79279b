"""Command line: `python -m flgengine generate ...`, `python -m flgengine info [BUNDLE]`,
`python -m flgengine store BUNDLE OUT --dtype int4`.

Export lives in its own entry point, `python -m flgengine.export`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _init_process_group(kind: str | None) -> bool:
    """--parallel: the process group torchrun's environment describes (NCCL on CUDA, else gloo).
    True when this call set it up (and the command should take it down at the end)."""
    if kind is None:
        return False
    import os

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--parallel {kind} runs one process per rank: launch with "
                         "torchrun --nproc_per_node N -m flgengine generate ...")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def _end_process_group(done: bool) -> None:
    """Takes the group down: a process that exits with a live gloo group aborts ("terminate called
    without an active exception") and torchrun reports the run failed. `done`: the command
    finished, so every rank first waits for the others (rank 0 may still be writing the video)."""
    import torch.distributed as dist

    if done:
        dist.barrier()
    dist.destroy_process_group()


def peak_memory(device) -> str:
    """The process's peak memory: the GPU's (allocated by PyTorch) on CUDA, else resident (RSS)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on {torch.cuda.get_device_name(device)} (allocated)"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (CPU)"


def _generate(args) -> int:
    if not _init_process_group(args.parallel):
        return _generate_in(args)
    done = False
    try:
        rc = _generate_in(args)
        done = True
        return rc
    finally:
        _end_process_group(done)


def _generate_in(args) -> int:
    import flgengine

    t0 = time.perf_counter()
    scales = args.lora_scale[0] if args.lora_scale and len(args.lora_scale) == 1 else args.lora_scale
    pipe = flgengine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend, engine=args.engine,
                          precision=args.precision, lora=args.lora, lora_scale=scales, parallel=args.parallel,
                          offload=args.offload)
    t1 = time.perf_counter()
    video = pipe(args.prompt, image=args.image, seed=args.seed, num_frames=args.frames, height=args.height, width=args.width,
                 steps=args.steps, guidance=args.guidance, negative_prompt=args.negative_prompt,
                 output=args.output, progress=not args.quiet, force=args.force, cuda_graph=args.cuda_graph)
    t2 = time.perf_counter()
    if not args.quiet and pipe._writes():
        B, T, H, W, _ = video.shape
        print(f"{B} video(s) of {T} frames {H}x{W} in {t2 - t1:.2f} s (load {t1 - t0:.2f} s; {pipe.precision} "
              f"on {pipe.device.type}) -> {args.output}")
        if args.verbose:
            print(f"peak memory: {peak_memory(pipe.device)}")
    return 0


def _default_grid(b) -> tuple[int, int, int] | None:
    """The token grid (F', H', W') of a generation at the bundle's default size, or None when
    the codec's factors are unknown (a DiT-only bundle)."""
    import json

    p, c = b.pipeline, b.model.config
    if p.codec.kind == "pixel":
        tf, sf = 1, 1
    elif p.codec.kind == "wan_vae":
        vae = b.path / (p.codec.path or "vae") / "config.json"
        cfg = json.loads(vae.read_text()) if vae.is_file() else {}
        tf, sf = cfg.get("scale_factor_temporal", 4), cfg.get("scale_factor_spatial", 8)
    else:
        return None
    latent = ((p.num_frames - 1) // tf + 1, p.height // sf, p.width // sf)
    return tuple(n // q for n, q in zip(latent, c.patch_size))


def _attention_info(b) -> dict:
    """Self-attention's pattern and the fraction of query-key pairs it computes at the bundle's
    default size."""
    dit = b.model.high if hasattr(b.model, "low") else b.model
    if dit.sparse is None:
        return {"kind": "dense", "density": 1.0}
    a = dit.config.attention
    out = {"kind": a.kind, "tile": list(a.tile), "block": a.block}
    out.update({"window": list(a.window)} if a.kind == "tile_window" else {"head_windows": a.head_windows})
    grid = _default_grid(b)
    out["grid"] = None if grid is None else list(grid)
    out["density"] = None if grid is None else round(dit.sparse.density(grid), 4)
    return out


def _describe_bundle(path: str) -> dict:
    from .bundle import load_bundle
    from .pipeline import resolve_model

    b = load_bundle(resolve_model(path), device="cpu")
    c, p = b.model.config, b.pipeline
    return {
        "bundle": str(b.path),
        "family": c.family,
        "parameters": b.model.num_params(),
        **c.describe_blocks(),
        "low_noise_expert": None if p.low_noise_boundary is None else
        {"boundary": p.low_noise_boundary, "parameters": b.model.low.num_params(), "blocks": len(b.model.low.blocks)},
        "sampler": p.sampler.to_dict(),
        "distilled": p.distilled,
        "defaults": {"num_frames": p.num_frames, "height": p.height, "width": p.width, "fps": p.fps},
        "text_encoder": p.text_encoder.kind,
        "codec": p.codec.kind,
        "image": p.image if p.image_encoder.kind == "none" else f"{p.image} + {p.image_encoder.kind} image tokens",
        "attention": _attention_info(b),
        "weights": {"stored": b.provenance.get("storage_dtype", "float32"), "mib": round(_dit_mib(b.path), 2)},
        "config": c.to_dict(),
        "provenance": b.provenance,
    }


def _dit_mib(path) -> float:
    """MiB of a bundle's DiT weights (both experts of a two-expert bundle)."""
    files = (Path(path) / "model.safetensors", Path(path) / "low_noise" / "model.safetensors")
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def _build() -> dict:
    import torch

    from . import ops
    from .version import __version__
    from .ops.native import build_info

    return {
        "flgengine": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.cuda.is_available(),
        "build": build_info(),
        "op_backends": {op: ops.backends_for(op) for op in sorted(ops.registry._IMPLS)},
    }


def _store(args) -> int:
    from .bundle import store_bundle
    from .pipeline import resolve_model
    from .storage import INT4_GROUP, check_int4_group, storage_dtype_of

    if args.int4_group is not None and args.dtype != "int4":
        raise SystemExit(f"error: --int4-group {args.int4_group} is for --dtype int4, not {args.dtype}")
    group = INT4_GROUP if args.int4_group is None else args.int4_group
    try:
        check_int4_group(group)
    except ValueError as e:
        raise SystemExit(f"error: --int4-group: {e}") from None
    src = resolve_model(args.bundle)
    out = store_bundle(src, args.output, storage_dtype_of(args.dtype), group)
    print(f"wrote {out}: DiT weights in {args.dtype}, {_dit_mib(src):.2f} MiB -> {_dit_mib(out):.2f} MiB "
          "(measure it: python -m distill evaluate BUNDLE --write-provenance)")
    return 0


def _info(args) -> int:
    info = _describe_bundle(args.bundle) if args.bundle else _build()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k in ("config", "provenance") and not args.verbose:
            continue
        print(f"{k:>14}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    if args.bundle and not args.verbose:
        prov = info["provenance"]
        print(f"{'provenance':>14}: {prov.get('kind', '?')} (--verbose for all of it)")
        for stage in prov.get("stages") or []:
            print(f"{'':>14}  - {_stage_summary(stage)}")
        for key, label in (("evaluation", "evaluation"), ("evaluation_fp8", "in fp8")):  # as stored; in FP8
            ev = prov.get(key)
            if not ev:
                continue
            a = ev["prompt_adherence"]
            print(f"{label:>14}: {ev['videos']} videos, {ev['steps']} steps: adherence {a['adherence']:.3f} "
                  f"(colour {a['colour']:.3f}, shape {a['shape']:.3f}, direction {a['direction']:.3f}), "
                  f"motion {ev['motion']['ratio']:.2f}x, FD {ev['fd']:.0f} (floor {ev['fd_real_vs_real']:.0f}), "
                  f"{ev['seconds_per_video']:.3f} s/video"
                  + (f", frame 0 PSNR {ev['first_frame']['frame0_psnr']:.1f} dB, appearance kept "
                     f"{ev['first_frame']['appearance_kept']:.3f}" if "first_frame" in ev else ""))
    return 0


def _stage_summary(stage: dict) -> str:
    """One line per provenance stage: what it was, how long, its main result."""
    name, parts = stage.get("stage", "?"), []
    if name == "plan":
        parts.append(f"dropped blocks {stage.get('drop')} ({stage.get('removed_fraction', 0):.1%} of the parameters)")
    if name == "store":
        group = f", groups of {stage['int4_group']}" if "int4_group" in stage else ""
        parts.append(f"weights stored in {stage.get('storage_dtype')}{group} (were {stage.get('from_storage_dtype')})")
    if "adapt" in stage:
        parts.append(f"after {stage['adapt'].get('steps')} steps of pattern adaptation")
    if "steps" in stage:
        parts.append(f"{stage['steps']} steps")
    if "train_seconds" in stage:
        parts.append(f"{stage['train_seconds'] / 60:.1f} min")
    loss = stage.get("heldout_flow_loss", {})
    if loss.get("end"):
        parts.append("held-out flow loss full {eval_full:.4f}, pruned {eval_pruned:.4f}".format(**loss["end"]))
    selected = stage.get("selected")
    if selected:
        parts.append(f"best checkpoint at step {selected.get('step')}")
    return f"{name}: " + (", ".join(parts) if parts else json.dumps({k: v for k, v in stage.items() if k != 'stage'})[:120])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flgengine", description="flgengine: fast video generation with compressed video DiTs.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a video from a prompt",
                       description="Generate a video. Defaults (frames, size, steps, guidance) come from the bundle's pipeline.json.")
    g.add_argument("prompt", nargs="?", help="text prompt (quote it)")
    g.add_argument("--image", default=None, metavar="PATH",
                   help="first frame of an image-to-video model (scaled to cover the frame, centre-cropped)")
    g.add_argument("--prompts-file", default=None, help="file with one prompt per line: a batch, one video each")
    g.add_argument("-o", "--output", default="out.mp4", help="output video (.mp4 or .gif); with several prompts, name_i.mp4 (default: out.mp4)")
    g.add_argument("--model", default=None, help="bundle directory or shipped model name (default: the built-in default model)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--frames", type=int, default=None, help="number of frames (Wan VAE: 4k+1)")
    g.add_argument("--height", type=int, default=None, help="height in pixels")
    g.add_argument("--width", type=int, default=None, help="width in pixels")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (students refuse other counts without --force)")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale (teachers; students have it baked in)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt for CFG")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--backend", default=None, choices=["ref", "cpu", "cuda", "triton"], help="ops backend (default: automatic; env FLG_BACKEND)")
    g.add_argument("--precision", default=None, choices=["bf16", "fp8"],
                   help="DiT precision: bf16 (the --dtype weights) or fp8 (e4m3 weights, activations and self-attention; "
                        "FP8 tensor cores on compute capability >= 8.9, emulated on the CPU) (default: bf16, or "
                        "the --engine's own)")
    g.add_argument("--engine", default=None, metavar="DIR",
                   help="run the DiT through an engine built from this bundle by python -m flgengine.export")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture a student's whole few-step loop as one CUDA graph (default: on for students on CUDA)")
    g.add_argument("--lora", action="append", default=None, metavar="PATH",
                   help="a LoRA (.safetensors: diffusers/PEFT, original Wan or kohya keys) merged into the DiT; "
                        "repeat for several. A teacher's LoRA maps onto a pruned student (removed blocks' deltas "
                        "dropped, with a warning)")
    g.add_argument("--lora-scale", action="append", type=float, default=None, metavar="S",
                   help="LoRA strength (default 1.0); one for all LoRAs, or one per --lora in order")
    g.add_argument("--parallel", default=None, choices=["sequence", "cfg"],
                   help="run the DiT over torchrun's processes: sequence (video tokens split, all-to-all around "
                        "self-attention) or cfg (a teacher's two CFG halves on two ranks); rank 0 writes the video")
    g.add_argument("--offload", default=None, choices=["blocks"],
                   help="keep the DiT's block weights in CPU memory and stream them to the GPU one block ahead "
                        "(models larger than the card; CUDA only)")
    g.add_argument("--verbose", action="store_true", help="also print the peak memory of the generation")
    g.add_argument("--force", action="store_true", help="allow step counts / CFG a student was not distilled for")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    g.set_defaults(func=_generate)

    i = sub.add_parser("info", help="describe a bundle, or (without one) this build",
                       description="With BUNDLE: config, parameter count, kept blocks, sampler, provenance. "
                                   "Without: versions, native build (CUDA, archs) and op backends.")
    i.add_argument("bundle", nargs="?", help="bundle directory or shipped model name")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("-v", "--verbose", action="store_true", help="also print the full config and provenance")
    i.set_defaults(func=_info)

    from .storage import INT4_GROUP, STORAGE_DTYPES

    st = sub.add_parser("store", help="copy a bundle with its weights stored in another dtype (fp16, int8, int4, ...)",
                        description="Copy a bundle with its DiT weights stored in another dtype: float16 / bfloat16 "
                                    "halve fp32; int8 (per-row scales) quarters it; int4 (the blocks' linear weights "
                                    "in 4-bit groups of 64 (--int4-group) with fp16 scales, the rest int8) stores about a seventh; fp8 (e4m3 block linears). "
                                    "Weights load in float32 and run in the compute dtype as before; int8 / int4 "
                                    "round them, so measure the copy before shipping it.")
    st.add_argument("bundle", help="bundle directory or shipped model name")
    st.add_argument("output", help="the new bundle directory (absent, empty or a bundle)")
    st.add_argument("--dtype", required=True, choices=STORAGE_DTYPES,
                    help="storage dtype of the weights")
    st.add_argument("--int4-group", type=int, default=None, metavar="N",
                    help=f"int4: weights per fp16 scale along a row (default {INT4_GROUP}; 32 rounds closer for a quarter bit more "
                         "per weight); an even divisor of the input dims, else a matrix is stored int8")
    st.set_defaults(func=_store)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        if (args.prompt is None) == (args.prompts_file is None):
            parser.error("generate takes a PROMPT or --prompts-file, not both or neither")
        if args.prompts_file is not None:
            args.prompt = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    return run_command(args)


def run_command(args) -> int:
    """Runs `args.func(args)`; bad input (ValueError, FileNotFoundError) prints one
    `error:` line and exits 2 instead of a traceback, a failed write (OSError: a full disk)
    one line and exits 1. Shared by `python -m distill`."""
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
