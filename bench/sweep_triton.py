"""Tile sweep of the Triton ops on a GPU: each configuration's time, rate, fraction of the
card's ceilings and error against the reference backend, at the Wan-1.3B 480p shape.

    python bench/sweep_triton.py [--out sweep.json] [--quick]

The defaults in flgengine/ops/triton (`_common.row_tiling`, `attention.config`) are chosen
from these numbers; a configuration counts only if its error is within the dtype's
tolerance. A configuration that does not compile (shared memory, registers) is recorded
with its error message. Runs in `bench/device_check.sh`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import ceilings  # noqa: E402
from test_bench_ops import WAN, _elementwise_inputs  # noqa: E402
from timing import median_seconds  # noqa: E402

from flgengine import ops  # noqa: E402
from flgengine.ops import triton as tri  # noqa: E402
from flgengine.ops.triton import _common  # noqa: E402

# (ROWS, num_warps[, ITERS]): ITERS row tiles per program (adaln_modulate, gated_residual_adaln)
ROW_TILINGS = [(1, 2), (1, 4), (2, 4), (2, 8), (4, 8), (1, 4, 4), (1, 4, 8), (1, 4, 16), (1, 2, 8), (2, 4, 8)]
ATTN_TILINGS = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
    (128, 32, 8, 3), (64, 128, 4, 3),
]
ATTN_SHAPES = [(12, 128, 32760, 32760), (12, 72, 32760, 32760), (12, 128, 32760, 512)]  # (H, D, Sq, Skv)
FP8_ATTN_TILINGS = [  # the FP8 kernel (e4m3 tiles are half a bf16 tile's bytes)
    (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3), (64, 128, 4, 3),
    (128, 256, 8, 2), (256, 64, 8, 2),
]
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, "fp8": 0.1}  # fp8: e4m3's 3 mantissa bits, against bf16 SDPA


def reps(device: torch.device, repeat: int = 20) -> dict:
    return {"repeat": repeat, "warmup": 3} if device.type == "cuda" else {"repeat": 1, "warmup": 0}


def rel_err(out, ref) -> float:
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))
               for a, b in zip(outs, refs))


def sweep_elementwise(ceil: dict, dtype, quick: bool, device: torch.device, tilings=ROW_TILINGS) -> list[dict]:
    rows = []
    shape = WAN if device.type == "cuda" else (1, 128, 256)  # CPU: a smoke run under TRITON_INTERPRET=1
    for op in ("adaln_modulate", "gated_residual_adaln", "qk_norm_rope"):
        args, nbytes = _elementwise_inputs(op, shape, dtype, device)
        ref = getattr(ops, op)(*args, backend="ref")
        fn = getattr(tri._module(op), op)  # the launcher itself: it takes `tiling`
        for tiling in tilings[:3] if quick else tilings:
            tiling = dict(zip(("ROWS", "num_warps", "ITERS"), tiling))
            if op == "qk_norm_rope" and tiling.get("ITERS", 1) != 1:
                continue  # one row tile per program
            rec = {"op": op, "dtype": str(dtype), "shape": list(shape), **tiling}
            try:
                out = fn(*args, tiling=tiling)
                t = median_seconds(lambda: fn(*args, tiling=tiling), device, **reps(device))
                rate = nbytes / t / 1e9
                rec.update(us=t * 1e6, GBs=rate, copy_fraction=rate / ceil["copy_GBps"], rel_err=rel_err(out, ref),
                           ok=rel_err(out, ref) <= TOL[dtype])
            except Exception as e:  # a tiling that does not compile or launch
                rec.update(error=f"{type(e).__name__}: {str(e)[:300]}", ok=False)
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    return rows


def sweep_attention(ceil: dict, dtype, quick: bool, device: torch.device, precision: str | None = None) -> list[dict]:
    """Every tiling of the attention kernel (bf16, or `precision="fp8"`: the FP8 kernel with its
    quantisation pass) against torch SDPA in bf16, at Wan's shapes."""
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    shapes = ATTN_SHAPES if device.type == "cuda" else [(2, 72, 160, 130)]
    attention = tri._module("attention").attention
    for H, D, Sq, Skv in shapes[:1] if quick else shapes:
        q = torch.randn(1, Sq, H, D, generator=g, device=device).to(dtype)
        k = torch.randn(1, Skv, H, D, generator=g, device=device).to(dtype)
        v = torch.randn(1, Skv, H, D, generator=g, device=device).to(dtype)
        flops = 4 * H * Sq * Skv * D
        ref = ops.attention(q, k, v, backend="ref")
        t_sdpa = median_seconds(lambda: ops.attention(q, k, v, backend="ref"), device, **reps(device, 10))
        grid = FP8_ATTN_TILINGS if precision == "fp8" else ATTN_TILINGS
        tilings = [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
                   for bm, bn, w, st in (grid[:2] if quick else grid)]
        if precision is None and tri._module("attention").split_head_dim(D)[1]:  # a pruned head dim: the one-tile kernel beside the split
            tilings += [{**t, "SPLIT_D": False} for t in tilings[:2]]
        for tiling in tilings:
            rec = {"op": "attention" if precision is None else f"attention-{precision}", "dtype": str(dtype), "heads": H,
                   "head_dim": D, "Sq": Sq, "Skv": Skv, **tiling, "sdpa_us": t_sdpa * 1e6}
            try:
                out = attention(q, k, v, tiling=tiling, precision=precision)
                t = median_seconds(lambda: attention(q, k, v, tiling=tiling, precision=precision), device,
                                   **reps(device, 10))
                rate = flops / t / 1e12
                rec.update(us=t * 1e6, TFLOPs=rate, matmul_fraction=rate / ceil["matmul_TFLOPs"], vs_sdpa=t_sdpa / t,
                           rel_err=rel_err(out, ref), ok=rel_err(out, ref) <= TOL[precision or dtype])
            except Exception as e:
                rec.update(error=f"{type(e).__name__}: {str(e)[:300]}", ok=False)
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        key = (f"{r['op']} ROWS={r['ROWS']} warps={r['num_warps']} iters={r.get('ITERS', 1)}" if "ROWS" in r else
               f"{r['op']} {r['heads']}x{r['head_dim']} {r['Sq']}x{r['Skv']} BM={r['BLOCK_M']} BN={r['BLOCK_N']} "
               f"warps={r['num_warps']} stages={r['num_stages']}{' one-tile' if r.get('SPLIT_D') is False else ''}")
        if "error" in r:
            lines.append(f"{key}: {r['error'][:120]}")
        elif "GBs" in r:
            lines.append(f"{key}: {r['us']:.0f} us {r['GBs']:.0f} GB/s {r['copy_fraction']:.0%} of copy "
                         f"err {r['rel_err']:.1e}{'' if r['ok'] else ' WRONG'}")
        else:
            lines.append(f"{key}: {r['us']:.0f} us {r['TFLOPs']:.0f} TFLOP/s {r['vs_sdpa']:.2f}x SDPA "
                         f"err {r['rel_err']:.1e}{'' if r['ok'] else ' WRONG'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="sweep_triton.json", help="JSON file for every configuration's record")
    ap.add_argument("--quick", action="store_true", help="a few configurations per op (a smoke run)")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--skip-elementwise", action="store_true", help="attention only")
    ap.add_argument("--fp8-attention", action="store_true", help="also sweep the FP8 attention kernel's tilings")
    ap.add_argument("--row-tilings", default=None, metavar="RxW[xI],...",
                    help="the row ops' ROWS x num_warps [x ITERS] tilings, e.g. 1x2,1x4,1x4x8 (default: a built-in list)")
    args = ap.parse_args(argv)
    t0 = time.time()
    if torch.cuda.is_available():
        device, ceil = torch.device("cuda"), ceilings.measured("cuda")
    elif _common.interpreting():  # a smoke run of this script: small shapes, no ceilings
        device, ceil = torch.device("cpu"), {"copy_GBps": float("nan"), "matmul_TFLOPs": float("nan")}
    else:
        print("sweep_triton: needs a CUDA device (or TRITON_INTERPRET=1 for a CPU smoke run)", file=sys.stderr)
        return 2
    tilings = ROW_TILINGS if args.row_tilings is None else [
        tuple(int(v) for v in item.split("x")) for item in args.row_tilings.split(",")]
    rows = [] if args.skip_elementwise else sweep_elementwise(ceil, torch.bfloat16, args.quick, device, tilings)
    if not args.skip_attention:
        rows += sweep_attention(ceil, torch.bfloat16, args.quick, device)
    if args.fp8_attention:
        rows += sweep_attention(ceil, torch.bfloat16, args.quick, device, precision="fp8")
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)", "torch": torch.__version__, "ceilings": ceil, "rows": rows,
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(table(rows))
    print(f"sweep: {len(rows)} configurations in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
