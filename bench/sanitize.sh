#!/usr/bin/env bash
# Small CUDA test cases under compute-sanitizer: memcheck (out-of-bounds and misaligned accesses,
# with torch's caching allocator off so every tensor is its own allocation) and racecheck (shared
# memory hazards), checking only the kcache_ops kernels. Exit status: non-zero if any tool reports.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SAN=${COMPUTE_SANITIZER:-compute-sanitizer}
CASES="test_gather_rows_is_a_copy or test_sparse_attn_v_random_indices or test_qk_topn_exact_ties or test_qk_topn_strided_inputs or test_out_of_range_values"
status=0
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 99 \
      --kernel-name kns=kcache_ops --report-api-errors no \
      "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py -k "$CASES" || status=1
done
exit $status
