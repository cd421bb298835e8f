#!/usr/bin/env bash
# The one prepared script for a GPU machine (no internet; torch, triton, pybind11, cmake, ninja already there):
# builds r4b._C with CUDA, runs the GPU tests, runs every bench, and prints a short summary table last.
# Each step has its own time limit so the whole run stays under ~8 minutes on an H100.
#   bash bench/gpu_check.sh            (results under bench/results/<date>-<gpu>/, copies under $OUT if set)
# Peers: `make gpu-wheels` (here, with internet) puts liger-kernel's wheel in .whl/; carry ".whl" to the GPU
# machine and this script installs it to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOGS=${OUT:-/tmp/r4b-gpu-check}
mkdir -p "$LOGS"
step() { echo; echo "== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build r4b._C with CUDA"
build_start=$(date +%s)
R4B_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout 300 $PY -m pip install -e . --no-build-isolation --no-deps -q \
  >"$LOGS/build.log" 2>&1
build_rc=$?
tail -n 25 "$LOGS/build.log"
echo "build rc=$build_rc in $(( $(date +%s) - build_start )) s"
$PY -c "import r4b._C as C; print('cuda ops:', C.cuda_ops())" || true

step "GPU tests"
timeout 240 $PY -m pytest -q -m gpu -x -p no:cacheprovider tests 2>&1 | tee "$LOGS/pytest_gpu.log" | tail -n 30
test_rc=${PIPESTATUS[0]}

step "benches"
# one time limit per bench (seconds), so a slow one (torch.compile warm-up) cannot starve the others;
# each bench writes its results as soon as it finishes
bench_rc=0
for spec in grpo_loss:140 fused_linear:80 varlen_attention:120 norms:45 group_advantages:25 pack:40; do
  name=${spec%%:*}; limit=${spec##*:}
  timeout "$limit" $PY -m bench "$name" 2>&1 | tee -a "$LOGS/bench.log" | grep -v "^$" | tail -n 40
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "bench $name exited $rc (124 = over its ${limit}s limit)"; bench_rc=$rc; }
done

step "summary"
$PY -m bench.summary --latest --copy-to "$LOGS"
echo "build rc=$build_rc  gpu tests rc=$test_rc  benches rc=$bench_rc"
