"""Export a Wan2.1-1.3B-shaped student to ONNX on this machine: time and peak memory.

    python bench/wan_onnx_export.py [--dtype fp32|fp16] [--out /tmp/wan-onnx] [--smoke]

The student: Wan2.1-T2V-1.3B's DiT (30 blocks, width 1536, 12 heads x 128, FFN 8960, text
4096) with 9 of its 30 blocks removed (~30% of the parameters), random weights, at the
480p x 81-frame latent (16 x 21 x 60 x 104 -> 32760 tokens), 512 text tokens, dynamic
batch and text length. The bundle is written first (the model building's memory is not
the export's), then `python -m flgengine.export` runs in a child process under
`/usr/bin/time -v`, whose maximum resident set size is the export's peak memory. The
export is not verified here (one fp32 forward at 480p is hours on 2 CPU cores): tests
verify the same exporter against onnxruntime on small models, and the ONNX graph is
checked (`onnx.checker` with external data) below.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAN_1_3B_STUDENT = dict(in_channels=16, out_channels=16, patch_size=(1, 2, 2), num_heads=12, head_dim=128,
                        ffn_dim=8960, text_dim=4096, freq_dim=256, num_layers=30,
                        block_ids=[i for i in range(30) if i not in (2, 5, 8, 11, 14, 17, 20, 23, 26)])
LATENT = "21,60,104"


def main() -> int:
    from flgengine.bundle import save_bundle
    from flgengine.config import ModelConfig
    from flgengine.model import DiT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"],
                   help="fp32 (default: what --format tensorrt builds from, in any precision) or fp16")
    p.add_argument("--out", default="/tmp/wan-onnx", help="work directory (bundle + engine), about 4-8 GB")
    p.add_argument("--smoke", action="store_true", help="a narrow model of the same depth and shapes (checks the script)")
    args = p.parse_args()
    out = Path(args.out)
    bundle = out / "bundle"
    if not (bundle / "model.safetensors").is_file():
        torch.manual_seed(0)
        shape = {**WAN_1_3B_STUDENT, **(dict(num_heads=2, head_dim=16, ffn_dim=64) if args.smoke else {})}
        model = DiT(ModelConfig(**shape)).eval()
        print(f"student: {model.num_params() / 1e9:.3f}B parameters, {len(model.blocks)} blocks")
        save_bundle(bundle, model, provenance={"kind": "bench: Wan2.1-1.3B-shaped student, random weights"})
        del model
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "flgengine.export", str(bundle), "--format", "onnx",
           "-o", str(out / "onnx"), "--latent", "3,6,8" if args.smoke else LATENT, "--text-len", "512", "--max-text-len", "512",
           "--dtype", args.dtype, "--no-verify", "--quiet", "--json"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.time() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
        return proc.returncode
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    files = {f.name: f.stat().st_size for f in (out / "onnx").iterdir() if f.is_file()}

    import onnx

    onnx.checker.check_model(str(out / "onnx" / "dit.onnx"), full_check=False)
    result = {"dtype": args.dtype, "export_seconds": round(seconds, 1), "peak_rss_gib": round(peak_kib / 2**20, 2),
              "files_mib": {k: round(v / 2**20, 1) for k, v in files.items()},
              "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}"}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
