#!/usr/bin/env bash
# The one prepared script for a GPU machine (no internet; torch, triton, pybind11, cmake, ninja already there):
# builds r4b._C with CUDA, runs the GPU tests, runs every bench, and prints a short summary table last.
#   bash bench/gpu_check.sh            (results under bench/results/<date>-<gpu>/, logs and copies under $OUT)
# The whole run keeps to R4B_CHECK_BUDGET seconds (default 540, under the device tool's 600 s per command):
# every step's time limit is cut to what is left, minus a reserve for the summary, so the table always prints.
# Peers: `make gpu-wheels` (here, with internet) puts liger-kernel's wheel in .whl/; carry ".whl" to the GPU
# machine and this script installs it to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export TRITON_PRINT_AUTOTUNING=1  # each autotuned kernel prints its best config (tuning data for the next run)
PY=${PY:-python3}
LOGS=${OUT:-/tmp/r4b-gpu-check}
mkdir -p "$LOGS"
START=$(date +%s)
BUDGET=${R4B_CHECK_BUDGET:-540}
RESERVE=20  # seconds kept for the summary
step() { echo; echo "== $1 ($(date +%T), $(( $(date +%s) - START )) s in)"; }
# limit LIMIT: the step's own limit, cut to the time left before the reserve (at least 1 s)
limit() { local left=$(( BUDGET - RESERVE - ($(date +%s) - START) )); local l=$(( $1 < left ? $1 : left ));
          echo $(( l > 1 ? l : 1 )); }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build r4b._C with CUDA"
build_start=$(date +%s)
R4B_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout "$(limit 240)" $PY -m pip install -e . --no-build-isolation \
  --no-deps -q >"$LOGS/build.log" 2>&1
build_rc=$?
tail -n 25 "$LOGS/build.log"
echo "build rc=$build_rc in $(( $(date +%s) - build_start )) s"
$PY -c "import r4b._C as C; print('cuda ops:', C.cuda_ops())" || true

step "GPU tests"
# no -x: every failing GPU test is reported; --durations shows where the time goes (to size the next run);
# the open issues' kernels first (a cut run keeps them), then the rest of tests/ (pytest skips repeated files)
first="tests/test_fused_linear_chunked.py tests/test_fused_linear_grpo_loss.py tests/test_varlen_attention.py
       tests/test_rms_norm.py tests/test_rope.py tests/test_swiglu.py"
per_test=""
$PY -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=90"  # one hung test cannot take it all
timeout "$(limit 200)" $PY -m pytest -q -m gpu -rfE --durations=12 -p no:cacheprovider $per_test $first tests 2>&1 \
  | tee "$LOGS/pytest_gpu.log" | tail -n 45
test_rc=${PIPESTATUS[0]}

step "benches"
# one time limit per bench (seconds, cut to what is left), so a slow one (torch.compile warm-up) cannot starve
# the others; each bench writes its rows as it goes. Issue order: the GRPO loss and varlen attention first.
bench_rc=0
for spec in grpo_loss:120 varlen_attention:100 norms:40 grpo_rows:25 fused_linear:60 group_advantages:20 pack:30; do
  name=${spec%%:*}; lim=$(limit "${spec##*:}")
  if [ "$lim" -le 5 ]; then echo "bench $name: no time left"; bench_rc=124; continue; fi
  timeout "$lim" $PY -m bench "$name" 2>&1 | tee -a "$LOGS/bench.log" | grep -v "^$" | tail -n 40
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "bench $name exited $rc (124 = over its ${lim}s limit)"; bench_rc=$rc; }
done

step "summary"
$PY -m bench.summary --latest --copy-to "$LOGS"
echo "build rc=$build_rc  gpu tests rc=$test_rc  benches rc=$bench_rc  total $(( $(date +%s) - START )) s"
