#!/usr/bin/env bash
# One prepared run on a lent GPU machine (device tool): builds flgengine._C with its CUDA
# ops, runs the `gpu` tests and the GPU benchmarks, writes everything under $OUT.
# The machine has no network: torch, triton, scikit-build-core, pybind11, cmake and
# ninja are already there; nothing is installed from an index.
#
#   device run: bash bench/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/flg-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PY:-python3}
log() { echo "== $*"; }

log "card"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

log "build _C (CUDA archs 80;90a)"
t0=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - t0 )) s"
$PY -c "import flgengine.ops.native as n, json; print(json.dumps(n.build_info()))" | tee "$OUT/build_info.json"

log "ceilings: copy bandwidth and bf16 matmul (every GPU figure below is a fraction of these)"
(cd bench && $PY -c "import ceilings, json; print(json.dumps(ceilings.measured('cuda')))") | tee "$OUT/ceilings.json"

log "gpu tests"
$PY -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -25
rc_tests=${PIPESTATUS[0]}

log "gpu benchmarks"
$PY -m pytest -q bench -m gpu -s -p no:cacheprovider --benchmark-json="$OUT/bench.json" 2>&1 \
  | grep -E "^(adaln|gated|qk_norm|attention|DiT|few-step)|passed|failed|error" | tee "$OUT/bench_summary.txt"
rc_bench=${PIPESTATUS[0]}

log "export CLI: AOTInductor engine on CUDA (bf16) of a tiny student, then generate through it"
# (the gpu tests and benchmarks above already cover the CUDA graph loop: test_cudagraph.py,
#  bench/test_bench_export.py::test_gpu_fewstep_loop_eager_vs_cuda_graph)
ENG=$(mktemp -d)
$PY - "$ENG" <<'PYEOF' 2>&1 | tail -5
import sys, torch
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import tiny_config
from flgengine.checkpoint import save_bundle
from flgengine.model import DiT
save_bundle(Path(sys.argv[1]) / "bundle", DiT(tiny_config()))
PYEOF
t0=$(date +%s)
$PY -m flgengine.export "$ENG/bundle" --format aoti --device cuda --dtype bf16 --latent 3,8,8 --text-len 16 \
  -o "$ENG/aoti" --json >"$OUT/export_aoti_cuda.json" 2>"$OUT/export_aoti_cuda.log"
rc_export=$?
echo "export rc=$rc_export in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/export_aoti_cuda.log"
$PY -c "import tensorrt" 2>/dev/null && echo "tensorrt present" || echo "tensorrt absent (TensorRT build not checked)"

log "done: tests rc=$rc_tests bench rc=$rc_bench export rc=$rc_export"
exit $(( rc_tests || rc_bench || rc_export ))
