"""Which AOTInductor CUDA packages load back: a tiny DiT exported in several variants at once.

    python bench/aoti_cuda_probe.py [--out probe.json] [--variants cli,static,...] [--timeout 240]

`python -m flgengine.export --format aoti --device cuda` crashed loading its package (torch 2.11,
NVIDIA H100 80GB HBM3, bench/RESULTS.md 2026-11-27) while `tests/test_cudagraph.py::test_aoti_engine_on_cuda` (the
same exporter on a pipeline bundle) passed. Each variant below changes one thing against the
CLI's call. All compile at once, each in its own process (the compiles are CPU-bound and a GPU
machine has the cores); then all load at once in fresh processes that only load (as
`aoti.probe_load` does: a crash or hang there is a record, not the end of this script); then the
ones that loaded are loaded here and run once against eager. Prints one JSON record per variant
and a table; runs in `bench/device_check.sh` (PARTS=aoti_probe).
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

from flgengine.export.aoti import _PROBE_CODE, exit_reason  # what aoti.probe_load's child runs, and its verdict

ROOT = Path(__file__).resolve().parents[1]
# name -> (dtype, dynamic dims, package metadata?, latent grid): one change each against "cli"
VARIANTS = {
    "cli": ("bfloat16", ("batch", "text_len"), True, (3, 8, 8)),  # the export that crashed on load
    "static": ("bfloat16", (), True, (3, 8, 8)),
    "batch_only": ("bfloat16", ("batch",), True, (3, 8, 8)),
    "no_metadata": ("bfloat16", ("batch", "text_len"), False, (3, 8, 8)),
    "fp32": ("float32", ("batch", "text_len"), True, (3, 8, 8)),
    "pipeline_grid": ("bfloat16", ("batch", "text_len"), True, (3, 8, 16)),  # the passing test's grid
}


def _model_and_spec(name: str, device: str):
    """The variant's tiny DiT (seed 0: the same weights in every process) and engine spec."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_config

    from flgengine.export.manifest import DimRange
    from flgengine.export.spec import EngineSpec
    from flgengine.model import DiT

    dtype, dynamic, _, latent = VARIANTS[name]
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DiT(cfg).to(device, getattr(torch, dtype)).eval()
    spec = EngineSpec(in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, latent=latent,
                      batch=DimRange(1, 1, 4) if "batch" in dynamic else DimRange(1, 1, 1),
                      text_len=DimRange(1, 16, 16) if "text_len" in dynamic else DimRange(16, 16, 16),
                      dynamic=dynamic, dtype=dtype)
    return model, spec


def compile_variant(name: str, out_dir: Path, device: str) -> dict:
    """In a worker process: export and compile one variant into out_dir/dit.pt2."""
    import torch

    from flgengine.export.aoti import export_aoti
    from flgengine.export.tracing import export_program

    model, spec = _model_and_spec(name, device)
    dtype, _, metadata, _ = VARIANTS[name]
    t0 = time.time()
    program = export_program(model, spec, torch.device(device))
    export_aoti(program, out_dir, metadata={"weights_sha256": "0" * 64, "flgengine_dtype": dtype} if metadata else None,
                device_type=device)
    return {"compile_s": round(time.time() - t0, 1)}


def run_variant(name: str, out_dir: Path, device: str) -> dict:
    """Here, after a fresh process loaded it: load the package and run one call against eager."""
    import torch

    from flgengine.export.aoti import AotiRunner

    model, spec = _model_and_spec(name, device)
    runner = AotiRunner(out_dir / "dit.pt2", device, probe=False)
    x, t, ctx = spec.random_inputs(torch.Generator().manual_seed(1), device)
    with torch.no_grad():
        want, got = model(x, t, ctx).double(), runner(x, t, ctx).double()
    return {"rel_err": float((got - want).norm() / want.norm())}


def in_parallel(commands: dict[str, list[str]], timeout: float) -> dict[str, tuple[int | None, str, str, float]]:
    """Runs every command at once; name -> (exit status or None on timeout, stdout, stderr, seconds)."""
    t0 = time.time()
    procs = {n: subprocess.Popen(c, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env={**os.environ, "PYTHONFAULTHANDLER": "1"}) for n, c in commands.items()}
    results = {}
    for n, p in procs.items():
        try:
            out, err = p.communicate(timeout=max(1.0, t0 + timeout - time.time()))
            results[n] = (p.returncode, out, err, round(time.time() - t0, 1))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            results[n] = (None, out, err, round(time.time() - t0, 1))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="aoti_cuda_probe.json")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated among {', '.join(VARIANTS)}")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds for all the compiles together")
    ap.add_argument("--load-timeout", type=float, default=150.0, help="seconds for all the fresh-process loads together")
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
    records = {n: {"variant": n, "dtype": VARIANTS[n][0], "dynamic": list(VARIANTS[n][1]), "metadata": VARIANTS[n][2],
                   "latent": list(VARIANTS[n][3])} for n in names}
    for n in names:
        (root / n).mkdir()
    # 1. every compile at once (CPU-bound: the machine's cores)
    compiled = in_parallel({n: [sys.executable, __file__, "--device", args.device, "--worker", n, str(root / n)]
                            for n in names}, args.timeout)
    for n, (rc, out, err, _) in compiled.items():
        if rc == 0:
            records[n].update(compile="ok", **json.loads(out.strip().splitlines()[-1]))
            with zipfile.ZipFile(root / n / "dit.pt2") as z:
                records[n]["files"] = sorted(Path(f).name for f in z.namelist() if not f.endswith("/"))[:40]
        else:
            records[n].update(compile=("timeout" if rc is None else exit_reason(rc)), error=err.strip()[-800:])
    # 2. every fresh-process load at once: only `aoti_load_package`, as `aoti.probe_load` does
    ok = [n for n in names if records[n].get("compile") == "ok"]
    loads = in_parallel({n: [sys.executable, "-c", _PROBE_CODE, str(root / n / "dit.pt2")] for n in ok}, args.load_timeout)
    for n, (rc, _, err, seconds) in loads.items():
        records[n].update(fresh_load="ok" if rc == 0 else ("timeout" if rc is None else exit_reason(rc)),
                          fresh_load_s=seconds)
        if rc != 0:
            records[n]["error"] = err.strip()[-800:]
    # 3. here: load and run the ones that loaded (a crash here would end the script: they did not crash above)
    for n in ok:
        if records[n].get("fresh_load") == "ok":
            try:
                records[n].update(run_variant(n, root / n, args.device))
            except Exception as e:
                records[n].update(error=f"{type(e).__name__}: {str(e)[-800:]}")
        print(json.dumps(records[n]), flush=True)
    records = list(records.values())
    Path(args.out).write_text(json.dumps(records, indent=1))
    for r in records:
        print(f"{r['variant']:>14}: compile {r['compile']}{' %.0f s' % r['compile_s'] if 'compile_s' in r else ''}, "
              f"fresh load {r.get('fresh_load', '-')}, rel err {r.get('rel_err', float('nan')):.1e}, "
              f"kernel.cpp {'yes' if any(f.endswith('.cpp') and 'kernel' in f for f in r.get('files', [])) else 'no'}")
    return 0 if all(r.get("fresh_load") == "ok" and "rel_err" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
