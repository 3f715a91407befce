#!/usr/bin/env bash
# Small CUDA test cases under compute-sanitizer, checking only the kcache_ops kernels:
#   memcheck   out-of-bounds and misaligned accesses (torch's caching allocator off, so each tensor
#              is its own allocation and an overrun past it is seen)
#   racecheck  shared-memory hazards (a missing __syncthreads)
#   synccheck  barriers and warp shuffles reached by part of a block or warp
#
#     bash bench/sanitize.sh [memcheck] [racecheck] [synccheck]   (default: all three)
#     bash bench/sanitize.sh --where       which compute-sanitizer would run
#     bash bench/sanitize.sh --collect     collect every tool's cases, run nothing (no GPU needed)
#     bash bench/sanitize.sh --ran LOG     whether a tool's log shows its cases ran: some passed,
#                                          none skipped (no GPU needed)
#
# compute-sanitizer is $COMPUTE_SANITIZER, else the one on PATH, else $CUDA_HOME/bin's, else
# /usr/local/cuda/bin's, else the one beside nvcc. Exit status: non-zero if a tool reports an
# error, is missing, or a case fails.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
F=tests/test_cuda_ops.py
# memcheck: every kernel, odd sizes, padding and out-of-range values, strided inputs
MEMCHECK=("$F::test_gather_rows_is_a_copy" "$F::test_sparse_attn_v_random_indices"
  "$F::test_qk_topn_exact_ties" "$F::test_qk_topn_strided_inputs"
  "$F::test_out_of_range_values_never_read_out_of_bounds"
  tests/test_lowbit_tail.py::test_strided_inputs tests/test_quantize_rows.py::test_strided_inputs
  tests/test_lowbit_tail.py::test_strided_seq_lens_and_hot_rows
  tests/test_reuse_rows.py::test_strided_inputs
  "$F::test_reuse_rows_matches_reference[per_head-32x8x128]")
# racecheck and synccheck are slower per launch: one case of each kernel and selection mode
# (lowbit_tail's strided inputs: its float32, float16 and bfloat16 cases); qk_topn's n = 7 sorts
# a split row's picks in one warp (warp_bitonic_sort), n = 300 in the whole block
RACECHECK=("$F::test_qk_topn_exact_ties[300-False]" "$F::test_qk_topn_exact_ties[300-True]"
  "$F::test_qk_topn_exact_ties[7-False]" "$F::test_qk_topn_exact_ties[7-True]"
  "$F::test_sparse_attn_v_random_indices[33]" "$F::test_gather_rows_is_a_copy[64-torch.bfloat16]"
  tests/test_lowbit_tail.py::test_strided_inputs
  "$F::test_reuse_rows_matches_reference[per_head-32x8x128]")
SYNCCHECK=("${RACECHECK[@]}")

find_sanitizer() {
  local c
  for c in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer)" \
    "${CUDA_HOME:-}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
    "$(dirname "$(readlink -f "$(command -v nvcc)" 2> /dev/null || echo .)")/compute-sanitizer"; do
    if [ -n "$c" ] && [ -x "$c" ]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

cases() {  # cases TOOL: the node ids of TOOL's cases
  case $1 in
    memcheck) echo "${MEMCHECK[@]}" ;;
    racecheck) echo "${RACECHECK[@]}" ;;
    synccheck) echo "${SYNCCHECK[@]}" ;;
    *) echo "unknown tool '$1' (memcheck, racecheck, synccheck)" >&2; return 2 ;;
  esac
}

ran() {  # ran LOG: true when pytest's summary in LOG has passes and no skips (where torch sees
  # no device under the tool, every case skips); its last line, not the tool's "=========
  # ERROR SUMMARY: 0 errors" after it
  local summary
  summary=$(grep -v '^=========' "$1" |
    grep -E '[0-9]+ (passed|skipped|failed|errors?|deselected).* in [0-9.]+s' | tail -1)
  grep -qE '[0-9]+ passed' <<< "$summary" && ! grep -qE '[0-9]+ skipped' <<< "$summary" && return
  echo "not every case ran on the GPU under the tool (${summary:-no pytest summary})"
  return 1
}

case ${1:-} in
  --ran)
    ran "$2"
    exit ;;
  --where)
    find_sanitizer ||
      echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin, beside nvcc)"
    exit 0 ;;
  --collect)  # every case must exist (pytest accepts a missing id beside its whole function)
    all=$(printf '%s\n' "${MEMCHECK[@]}" "${RACECHECK[@]}" "${SYNCCHECK[@]}" | sort -u)
    # shellcheck disable=SC2086  # node ids hold no spaces
    listed=$("$PY" -m pytest -q --collect-only -p no:cacheprovider $all) || {
      echo "$listed"
      exit 1
    }
    echo "$listed"
    missing=0
    for id in $all; do
      grep -qxF -e "$id" <<< "$listed" || grep -qF "$id[" <<< "$listed" ||
        { echo "not collected: $id"; missing=1; }
    done
    exit $missing ;;
esac

SAN=$(find_sanitizer) || { echo "compute-sanitizer not found"; exit 1; }
tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(memcheck racecheck synccheck)
status=0
for tool in "${tools[@]}"; do
  ids=$(cases "$tool") || exit 2
  # memcheck: torch's caching allocator off, so each tensor is its own allocation
  caching=()
  [ "$tool" != memcheck ] || caching=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  echo "== $SAN --tool $tool: $ids"
  log=$(mktemp)
  # shellcheck disable=SC2086  # node ids hold no spaces
  "${caching[@]}" "$SAN" --tool "$tool" --error-exitcode 99 --kernel-name kns=kcache_ops \
    --report-api-errors no "$PY" -m pytest -q -rs -p no:cacheprovider $ids 2>&1 | tee "$log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  ran "$log" || status=1
  rm -f "$log"
done
exit $status
