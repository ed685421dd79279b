"""Which AOTInductor CUDA packages load back: a tiny DiT exported in several variants at once.

    python bench/aoti_cuda_probe.py [--out probe.json] [--variants cli,static,...] [--timeout 240]

`python -m flgengine.export --format aoti --device cuda` crashed loading its package (torch 2.11,
bench/RESULTS.md stops 12 and 14) while `tests/test_cudagraph.py::test_aoti_engine_on_cuda` (the
same exporter on a pipeline bundle) passed. Each variant below changes one thing against the
CLI's call; each is compiled in its own process (all at once: the compiles are CPU-bound and a
GPU machine has the cores), then loaded in a fresh process (`aoti.probe_load`: a crash or hang
there becomes a record, not the end of this script), then loaded here and run once against
eager. Prints one JSON record per variant and a table; runs in `bench/device_check.sh`
(PARTS=aoti_probe).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (dtype, dynamic dims, package metadata?, latent grid): one change each against "cli"
VARIANTS = {
    "cli": ("bfloat16", ("batch", "text_len"), True, (3, 8, 8)),  # stop 14's crashing export
    "static": ("bfloat16", (), True, (3, 8, 8)),
    "batch_only": ("bfloat16", ("batch",), True, (3, 8, 8)),
    "no_metadata": ("bfloat16", ("batch", "text_len"), False, (3, 8, 8)),
    "fp32": ("float32", ("batch", "text_len"), True, (3, 8, 8)),
    "pipeline_grid": ("bfloat16", ("batch", "text_len"), True, (3, 8, 16)),  # the passing test's grid
}


def compile_variant(name: str, out_dir: Path, device: str) -> dict:
    """In a worker process: export and compile one variant into out_dir/dit.pt2."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_config

    from flgengine.export.aoti import export_aoti
    from flgengine.export.manifest import DimRange
    from flgengine.export.spec import EngineSpec
    from flgengine.export.tracing import export_program
    from flgengine.model import DiT

    dtype, dynamic, metadata, latent = VARIANTS[name]
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DiT(cfg).to(device, getattr(torch, dtype)).eval()
    spec = EngineSpec(in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, latent=latent,
                      batch=DimRange(1, 1, 4) if "batch" in dynamic else DimRange(1, 1, 1),
                      text_len=DimRange(1, 16, 16) if "text_len" in dynamic else DimRange(16, 16, 16),
                      dynamic=dynamic, dtype=dtype)
    t0 = time.time()
    program = export_program(model, spec, torch.device(device))
    export_aoti(program, out_dir, metadata={"weights_sha256": "0" * 64, "flgengine_dtype": dtype} if metadata else None,
                device_type=device)
    return {"compile_s": round(time.time() - t0, 1)}


def check_variant(name: str, out_dir: Path, device: str, timeout: float) -> dict:
    """Here: load in a fresh process, then in this one, and run one call against eager."""
    import torch

    from flgengine.export.aoti import AotiLoadError, AotiRunner, probe_load

    rec: dict = {"files": sorted(p.name for p in (out_dir / "unpacked").rglob("*") if p.is_file())[:40]}
    t0 = time.time()
    try:
        probe_load(out_dir / "dit.pt2", timeout=timeout)
    except AotiLoadError as e:
        return {**rec, "fresh_load": "failed", "error": str(e)[-800:], "fresh_load_s": round(time.time() - t0, 1)}
    rec.update(fresh_load="ok", fresh_load_s=round(time.time() - t0, 1))
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_config

    from flgengine.model import DiT

    dtype, dynamic, _, latent = VARIANTS[name]
    torch.manual_seed(0)  # the worker's weights
    model = DiT(tiny_config()).to(device, getattr(torch, dtype)).eval()
    runner = AotiRunner(out_dir / "dit.pt2", device, probe=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, *latent, generator=g).to(device, getattr(torch, dtype))
    t = (torch.rand(1, generator=g) * 1000).to(device)
    ctx = torch.randn(1, 16, 12, generator=g).to(device, getattr(torch, dtype))
    with torch.no_grad():
        want, got = model(x, t, ctx).double(), runner(x, t, ctx).double()
    rec["rel_err"] = float((got - want).norm() / want.norm())
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="aoti_cuda_probe.json")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated among {', '.join(VARIANTS)}")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds for all the compiles together")
    ap.add_argument("--load-timeout", type=float, default=60.0, help="seconds for each fresh-process load")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of this script")
    ap.add_argument("--worker", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:  # one compile, in its own process
        print(json.dumps(compile_variant(args.worker[0], Path(args.worker[1]), args.device)))
        return 0
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("aoti_cuda_probe: needs a CUDA device", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="aoti-probe-"))
    procs = {}
    for n in names:
        (root / n).mkdir()
        procs[n] = subprocess.Popen([sys.executable, __file__, "--device", args.device, "--worker", n, str(root / n)], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    deadline = time.time() + args.timeout
    records = []
    for n, p in procs.items():
        rec = {"variant": n, "dtype": VARIANTS[n][0], "dynamic": list(VARIANTS[n][1]), "metadata": VARIANTS[n][2],
               "latent": list(VARIANTS[n][3])}
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            records.append({**rec, "compile": "timeout"})
            continue
        if p.returncode != 0:
            records.append({**rec, "compile": f"failed (exit {p.returncode})", "error": err.strip()[-800:]})
            continue
        rec.update(compile="ok", **json.loads(out.strip().splitlines()[-1]))
        with zipfile.ZipFile(root / n / "dit.pt2") as z:
            z.extractall(root / n / "unpacked")
        try:
            rec.update(check_variant(n, root / n, args.device, args.load_timeout))
        except Exception as e:  # a load or run that raises (a crash takes this process; probe_load runs first)
            rec.update(error=f"{type(e).__name__}: {str(e)[-800:]}")
        records.append(rec)
        print(json.dumps(rec), flush=True)
    Path(args.out).write_text(json.dumps(records, indent=1))
    for r in records:
        print(f"{r['variant']:>14}: compile {r['compile']}{' %.0f s' % r['compile_s'] if 'compile_s' in r else ''}, "
              f"fresh load {r.get('fresh_load', '-')}, rel err {r.get('rel_err', float('nan')):.1e}, "
              f"kernel.cpp {'yes' if any(f.endswith('.cpp') and 'kernel' in f for f in r.get('files', [])) else 'no'}")
    return 0 if all(r.get("fresh_load") == "ok" and "rel_err" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
