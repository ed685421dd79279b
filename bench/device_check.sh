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

log "gpu tests"
$PY -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -25
rc_tests=${PIPESTATUS[0]}

log "gpu benchmarks"
$PY -m pytest -q bench -m gpu -s -p no:cacheprovider --benchmark-json="$OUT/bench.json" 2>&1 \
  | grep -E "^(adaln|DiT)|passed|failed|error" | tee "$OUT/bench_summary.txt"
rc_bench=${PIPESTATUS[0]}

log "done: tests rc=$rc_tests bench rc=$rc_bench"
exit $(( rc_tests || rc_bench ))
