#!/usr/bin/env bash
# The GPU session's one script: build kcache_ops with its CUDA kernels, run the kernel benchmarks
# first, then the CUDA tests, a per-kernel profile of the decode step, the end-to-end throughput
# bench and compute-sanitizer.
#
#     bash bench/run_gpu.sh [--dry-run] [STAGE...]
#                           (default: build toolchain bench tests profile e2e sanitize slow)
#
# The benchmarks come before the tests (2026-12-05): issue 10's ratios are what only a GPU gives,
# a failing test stops no later stage, and at the 2026-12-04 stage times the tests ran ~270 s,
# which left the benchmarks after them ~40 s of slack in the budget; run first, a test file that
# hangs to its limit cuts the tests, not the measurements.
#
# Stages run in the order given:
#   build     python setup.py build_ext --inplace (MAX_JOBS=16), then a check that kcache_ops has
#             its CUDA kernels
#   toolchain bench/toolchain.sh: the error paths (integer and shape messages) and alloc_host's
#             pinning on this build, with the compilers and C++ runtime; where the process dies,
#             cuda-gdb's backtrace (setup.py already refuses a compiler that links libstdc++
#             statically, the cause of such deaths on the H200)
#   tests     tests/test_cuda_*.py but the CPU emulator's, then the op tests (test_qk_topn,
#             test_sparse_attn_v; the default decode path's test_lowbit_tail, test_quantize_rows,
#             test_decode_sync, test_hot_rows, test_side_stream, test_cache; test_gather_rows,
#             test_reuse_rows, test_op_errors, test_alloc_host, test_host_pages):
#             one pytest per file under `timeout`, and a per-test time-out (--timeout,
#             pytest-timeout is installed there); their CUDA cases only
#             (KCACHE_OPS_TEST_DEVICES=cuda: CI runs the CPU ones)
#   e2e       python -m kcache_ops bench --device cuda on a grid that fits ($E2E_ARGS)
#   slow      the rest of the suite (model tests, nested pytest runs), the CMake rebuild last
#   profile   where the decode step's time goes, kernel by kernel (bench/profile_step.py:
#             group_select, the default layer step, per head): first torch.profiler's device
#             times at 32K x 8 and 128K x 1 (results/profile_step.json, no hardware counters
#             needed), then, at 32K x 8, where ncu is found (--profile-from-start off: only the
#             steps between cudaProfilerStart/Stop; --clock-control none), first one launch of
#             qk_select_kernel (group_select) with the source-level sections
#             ($NCU_SOURCE_SECTIONS: executed instructions and warp stalls per SASS instruction;
#             the build has -lineinfo, the report embeds the source) ->
#             results/profile_ncu_select_source.ncu-rep and its source page as .csv, where the
#             select's issue slots go; then one ncu process per variant (the kcache_ops kernels,
#             $NCU_KERNELS; sections $NCU_SECTIONS) -> results/profile_ncu_VARIANT.ncu-rep and,
#             imported, .csv (the details page). stages.txt says which ran ("no ncu" where none
#             is found).
#   bench     bench/gpu_decode_attn.py, gpu_qk_topn.py, gpu_gather.py (JSON after each line)
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck on small cases (bench/sanitize.sh)
# On gVisor (the kernel reports 4.4.0) ncu cannot read the counters and compute-sanitizer refuses
# the device (.library/device/KINDS.md): there the ncu runs and the sanitizer are recorded
# "unsupported: gVisor" and skipped (FORCE_TOOLS=1 runs them anyway).
# A GPU stage other than build builds first where kcache_ops has no CUDA kernels yet: a second call
# may get a fresh machine (the first went idle) that has no build.
#
# On a lent GPU (the device tool's `run`; 15 minutes of device time a session, each machine's start,
# 1-2 min, and its idle time counted), one call, the benchmarks first, then the rest in the order
# of what they prove:
#   command: KCACHE_OPS_GIT_COMMIT=<the checkout's commit> bash bench/run_gpu.sh
#            (that machine's copy of the working tree has no .git: the results record this)
#   carry: [".whl"]   timeout_s: 580
# then, only where `status` shows 5 minutes or more of device time left, a second call with the
# stages the first recorded "no time" (a fresh machine builds first, ~60 s). .whl/ holds the
# wheels of `make gpu-wheels` (gguf and the essays: that machine has no package registry); it is
# git-ignored and travels only when carried. Without it the GGUF model tests skip or fail (the
# log says so at the start); the kernels' tests and benchmarks do not need it.
#
# What comes back in $OUT (at most 6 of the 8 files allowed): run_gpu.log, every stage's output
# appended as it is produced, and gpu_results.tar.gz, re-packed after each stage: gpu_logs/ with
# one log per stage, stages.txt, junit_*.xml and results/ (the benchmarks' JSON and PNG, the
# profile's JSON and .csv; results/e2e/ the throughput bench); beside them each ncu report
# (.ncu-rep, up to 4, MBs each), copied apart so that no archive nears the 16 MiB a file may bring
# back (one that passed it would be lost whole). A call cut off at its limit still returns every
# stage that finished and the log of the one that did not. Unpack with
# `tar xzf gpu_results.tar.gz`; copy gpu_logs/results/* to bench/results/ to commit them.
#
# Time plan. BUDGET (default 520 s) is the time of one call's stages: a stage's limit shrinks to
# what is left of it and none starts with less than 15 s left, so a call ends by BUDGET plus ~10 s
# of packing, inside timeout_s 580 (the machine's start comes on top: ~11 min in all).
# Limits (expected, from the H200 runs of 2026-11-30 and 2026-12-04 and the H100 run of
# 2026-12-06) in seconds, in the default order: build 240 + check 30 (37-60); toolchain 150
#   (10-25); tests: test_cuda_ops, test_lowbit_tail and test_cuda_graph 150 each (20, 37-44,
#   31), each other file 60 (5-25; ~5 of each is torch's start; all 16 files 252 s on
#   2026-12-06); bench: decode 110 (46-73), qk_topn 60 (24-28), gather 80 (13; 32 with the
#   footprint rows, two more since); profile: torch.profiler 40 (8-9), the ncu runs and their
#   CSV imports together 90 (37; 26 for the first two variants on 2026-12-06); e2e 150 (55-61);
#   sanitize: memcheck 70, racecheck 45, synccheck 35 (11-15 each); slow: what is left, the
#   CMake rebuild last. The call of 2026-12-06 reached its budget in the profile's third ncu run
#   (508 s); e2e and the sanitizer ran in two short calls after it on the same machine (55 and 38
#   s), as a second call can: slow has still never run.
# Each limit can be set: BUDGET, LIMIT_BUILD, LIMIT_LONG_TEST, LIMIT_TEST, LIMIT_E2E, LIMIT_SLOW,
# LIMIT_CMAKE, LIMIT_PROFILE_TORCH, LIMIT_PROFILE (the ncu runs), LIMIT_DECODE, LIMIT_QK_TOPN,
# LIMIT_GATHER, LIMIT_MEMCHECK, LIMIT_RACECHECK, LIMIT_SYNCCHECK; PER_TEST (60 s) is pytest's
# per-test time-out (5x for the slow stage); LIMIT_QUICK (60 s) bounds each command outside the
# stages (nvidia-smi, the checks for torch's GPU, gguf, pytest-timeout and a build, the wheels).
# ncu is $NCU, else the one on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin, beside nvcc, or the
# newest /opt/nvidia/nsight-compute/*/ncu.
#
# Dry run (--dry-run or DRY_RUN=1), for a machine without a GPU: every stage does its CPU-side part
# (tool lookup, collecting the tests and the sanitizer's cases, the benchmarks' and the profile's
# plans, the throughput command's arguments, the ncu command line), reports "no GPU" instead of the
# GPU work and succeeds; $OUT is packed as in a real run. A real run where no GPU is visible does
# the same and exits 3.
#
# Exit status: 0 when every stage ran and passed; 1 when one failed, timed out at its own limit
# ("TIMED OUT"), was cut short by BUDGET ("cut: budget") or did not start ("no time"); the last
# lines printed are the stage table (gpu_logs/stages.txt).
# 2 when a stage is unknown or $PYTHON (default python3) cannot import torch, before any stage.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${DRY_RUN:-0}
STAGES=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    build | toolchain | tests | e2e | slow | profile | bench | sanitize) STAGES+=("$arg") ;;
    *) echo "unknown stage '$arg' (build, toolchain, tests, e2e, slow, profile, bench, sanitize;" \
      "--dry-run)"
      exit 2 ;;
  esac
done
[ ${#STAGES[@]} -gt 0 ] || STAGES=(build toolchain bench tests profile e2e sanitize slow)
OUT=${OUT:-$ROOT/gpu_out}
WORK=${WORK:-$ROOT/gpu_logs}  # per-stage logs and results, packed into $OUT after each stage
LOG=$OUT/run_gpu.log
ARCHIVE=$OUT/gpu_results.tar.gz
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-520}
PER_TEST=${PER_TEST:-60}
E2E_ARGS=${E2E_ARGS:---models llama3-8b --contexts 32768 --budget 40 --steps 16}
# bench/profile_step.py's variants, in order of interest
PROFILE_VARIANTS=${PROFILE_VARIANTS:-group_select default per_head}
NCU_KERNELS=${NCU_KERNELS:-qk_|sparse_attn_v|lowbit_tail|quantize_rows|sum_partials}  # ncu -k regex
NCU_SECTIONS=${NCU_SECTIONS:-SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats \
MemoryWorkloadAnalysis}
NCU_SOURCE_SECTIONS=${NCU_SOURCE_SECTIONS:-SourceCounters WarpStateStats}
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK/results"
: > "$WORK/stages.txt"
: > "$LOG"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# the op tests' CUDA cases only: CI runs their CPU cases
export KCACHE_OPS_TEST_DEVICES=${KCACHE_OPS_TEST_DEVICES:-cuda}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
T0=$SECONDS
FAILED=0
NO_GPU=0

say() { echo "$*" | tee -a "$LOG"; }

quick() { timeout -k 5 "${LIMIT_QUICK:-60}" "$@"; }  # a command outside the stages, bounded

pack() {  # re-pack the archive; the rename keeps the last complete one if packing is cut off.
  # The ncu reports go beside it, each a file of its own (see the header)
  tar czf "$ARCHIVE.part" --exclude='*.ncu-rep' -C "$(dirname "$WORK")" "$(basename "$WORK")" &&
    mv -f "$ARCHIVE.part" "$ARCHIVE"
  find "$WORK" -name '*.ncu-rep' -exec cp -f {} "$OUT/" \;
}

record() {  # record NAME STATUS SECONDS LIMIT
  printf '%-24s %-12s %5s s  (limit %s s)\n' "$1" "$2" "$3" "$4" |
    tee -a "$LOG" >> "$WORK/stages.txt"
}

stage() {  # stage NAME LIMIT COMMAND...: run under min(LIMIT, budget left), log as it comes,
  # pack; true when it passed
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 15 ]; then
    record "$name" "no time" 0 "$limit"
    FAILED=1
    return 1
  fi
  local cut=0
  [ "$limit" -le "$left" ] || { limit=$left; cut=1; }
  say "==== $name (limit $limit s): $*"
  local t=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.txt"
  local rc=${PIPESTATUS[0]} status=ok
  case $rc in
    0) ;;
    5) status="no tests" ;;  # pytest: nothing collected
    124 | 137) status="TIMED OUT"; [ $cut = 0 ] || status="cut: budget"; FAILED=1 ;;
    *) status="FAILED rc=$rc"; FAILED=1 ;;
  esac
  record "$name" "$status" $((SECONDS - t)) "$limit"
  pack
  [ "$status" = ok ]
}

gpu_here() {  # gpu_here STAGE: true where GPU work may run, else records "no GPU" for STAGE
  if [ "$DRY" = 1 ]; then
    say "no GPU: $1 not run (dry run)"
  elif [ "$HAVE_GPU" = 0 ]; then
    say "no GPU: $1 not run (torch sees no CUDA device)"
    NO_GPU=1
  else
    return 0
  fi
  record "$1" "no GPU" 0 -
  return 1
}

toolchain() {  # the error paths and alloc_host's pinning on this build (bench/toolchain.sh)
  say "toolchain: bash bench/toolchain.sh"
  if [ "$DRY" = 1 ]; then
    stage toolchain 60 bash bench/toolchain.sh
    return 0
  fi
  gpu_here toolchain || return 0
  ensure_build toolchain || return 0
  stage toolchain 150 bash bench/toolchain.sh
}

BUILD=unknown  # ok or failed once known: a failed build is not retried in the same call

build() {
  say "build: nvcc $(command -v nvcc || ls "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" 2> /dev/null ||
    echo 'not found'), MAX_JOBS=$MAX_JOBS: $PY setup.py -q build_ext --inplace"
  gpu_here build || return 0
  BUILD=failed
  stage build "${LIMIT_BUILD:-240}" "$PY" setup.py -q build_ext --inplace &&
    stage check_build 30 "$PY" -c "import kcache_ops; assert kcache_ops.built_with_cuda(), \
'kcache_ops was built without its CUDA kernels'; print('kcache_ops built with CUDA')" &&
    BUILD=ok
}

ensure_build() {  # ensure_build STAGE: build first where this machine has no CUDA build yet
  if [ "$BUILD" = unknown ]; then
    if quick "$PY" -c "import kcache_ops, sys; sys.exit(not kcache_ops.built_with_cuda())" \
      2> /dev/null; then
      BUILD=ok
    else
      say "kcache_ops has no CUDA build here: building first"
      build
    fi
  fi
  [ "$BUILD" = ok ] && return 0
  record "$1" "no build" 0 -
  FAILED=1
  return 1
}

# the CUDA test files (not the CPU emulator's), then the op tests, the default decode path's first
CUDA_TESTS=$(ls tests/test_cuda_*.py | grep -v test_cuda_emu)
OP_TESTS=$(ls tests/test_qk_topn.py tests/test_sparse_attn_v.py tests/test_lowbit_tail.py \
  tests/test_quantize_rows.py tests/test_decode_sync.py tests/test_hot_rows.py \
  tests/test_side_stream.py tests/test_cache.py tests/test_gather_rows.py \
  tests/test_reuse_rows.py tests/test_op_errors.py tests/test_alloc_host.py \
  tests/test_host_pages.py 2> /dev/null)
LONG_TESTS="test_cuda_ops test_lowbit_tail test_cuda_graph"  # LIMIT_LONG_TEST, others LIMIT_TEST
# the rest of the suite, the CMake rebuild last
SLOW_TESTS=$(ls tests/test_*.py | grep -vxF -e "$CUDA_TESTS" -e "$OP_TESTS" | grep -v cmake_build)
TIMEOUT_ARGS=()  # per-test time-outs: PER_TEST for the CUDA and op tests, 5x that for the rest
SLOW_TIMEOUT_ARGS=()
# -v: one line per test as it finishes, so a file cut off at its limit still shows what passed
PYTEST=(-m pytest -v --tb=short -rfEs -p no:cacheprovider)

tests() {
  say "tests: $(echo $CUDA_TESTS $OP_TESTS)"
  if [ "$DRY" = 1 ]; then
    stage collect_tests 60 "$PY" -m pytest -q --collect-only -p no:cacheprovider \
      $CUDA_TESTS $OP_TESTS
  fi
  gpu_here tests || return 0
  ensure_build tests || return 0
  local f name
  for f in $CUDA_TESTS $OP_TESTS; do
    name=$(basename "$f" .py)
    stage "$name" "$(grep -qw "$name" <<< "$LONG_TESTS" && echo "${LIMIT_LONG_TEST:-150}" ||
      echo "${LIMIT_TEST:-60}")" "$PY" "${PYTEST[@]}" "${TIMEOUT_ARGS[@]}" \
      --junitxml "$WORK/junit_$name.xml" "$f"
  done
}

e2e() {
  say "e2e: $PY -m kcache_ops bench --device cuda $E2E_ARGS --out $WORK/results/e2e"
  if [ "$DRY" = 1 ]; then
    stage e2e_arguments 60 "$PY" -m kcache_ops bench --help
  fi
  gpu_here e2e || return 0
  ensure_build e2e || return 0
  stage e2e "${LIMIT_E2E:-150}" "$PY" -m kcache_ops bench --device cuda $E2E_ARGS \
    --out "$WORK/results/e2e"
}

slow() {
  say "slow: $(echo $SLOW_TESTS) tests/test_cmake_build.py"
  gpu_here slow || return 0
  ensure_build slow || return 0
  stage slow_tests "${LIMIT_SLOW:-300}" "$PY" "${PYTEST[@]}" "${SLOW_TIMEOUT_ARGS[@]}" \
    --continue-on-collection-errors --junitxml "$WORK/junit_slow.xml" $SLOW_TESTS
  [ ! -f tests/test_cmake_build.py ] ||
    stage test_cmake_build "${LIMIT_CMAKE:-200}" "$PY" "${PYTEST[@]}" "${SLOW_TIMEOUT_ARGS[@]}" \
      --junitxml "$WORK/junit_cmake.xml" tests/test_cmake_build.py
}

find_ncu() {  # the ncu to run, or status 1 where there is none
  local c
  for c in "${NCU:-}" "$(command -v ncu)" "${CUDA_HOME:-}/bin/ncu" /usr/local/cuda/bin/ncu \
    "$(dirname "$(readlink -f "$(command -v nvcc)" 2> /dev/null || echo .)")/ncu" \
    $(ls -d /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | sort -rV); do
    if [ -n "$c" ] && [ -x "$c" ]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

pooled() {  # pooled POOL SINCE NAME COMMAND...: stage NAME under what is left of POOL seconds
  # counted from SINCE ($SECONDS then); "no time" under 15 s
  local left=$(($1 - (SECONDS - $2))) pool=$1 name=$3
  shift 3
  if [ "$left" -lt 15 ]; then
    record "$name" "no time" 0 "$pool"
    FAILED=1
    return 1
  fi
  stage "$name" "$left" "$@"
}

profile() {
  local ncu s v rep=$WORK/results/profile_ncu pool=${LIMIT_PROFILE:-90} since ran=""
  ncu=$(find_ncu)
  local run=("${ncu:-ncu}" --profile-from-start off --clock-control none --cache-control all
    --kernel-name "regex:$NCU_KERNELS" --launch-count 64)
  for s in $NCU_SECTIONS; do
    run+=(--section "$s")
  done
  # the select kernel's source view: one launch, per SASS instruction
  local src_cmd=("${ncu:-ncu}" --profile-from-start off --clock-control none --cache-control all
    --kernel-name qk_select_kernel --launch-count 1 --import-source yes)
  for s in $NCU_SOURCE_SECTIONS; do
    src_cmd+=(--section "$s")
  done
  say "profile: torch.profiler: $PY bench/profile_step.py --out $WORK/results"
  say "profile: ncu, the select's source view: ${src_cmd[*]} --export ${rep}_select_source \
--force-overwrite $PY bench/profile_step.py --method range --variant group_select --steps 1 \
--shape 32768x8; then ${ncu:-ncu} --import ${rep}_select_source.ncu-rep --csv --page source \
--print-source sass --log-file ${rep}_select_source.csv"
  say "profile: ncu, for each VARIANT of $PROFILE_VARIANTS: ${run[*]} --export ${rep}_VARIANT \
--force-overwrite $PY bench/profile_step.py --method range --variant VARIANT --steps 1 \
--shape 32768x8; then \
${ncu:-ncu} --import ${rep}_VARIANT.ncu-rep --csv --page details --log-file ${rep}_VARIANT.csv"
  [ -n "$ncu" ] || say "profile: ncu not found (\$NCU, PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin, \
beside nvcc, /opt/nvidia/nsight-compute/*): torch.profiler only"
  if [ "$DRY" = 1 ]; then
    stage plan_profile 60 "$PY" bench/profile_step.py --dry-run
  fi
  gpu_here profile || return 0
  ensure_build profile || return 0
  stage profile_torch "${LIMIT_PROFILE_TORCH:-40}" "$PY" bench/profile_step.py \
    --out "$WORK/results" && ran="torch.profiler"
  if [ -z "$ncu" ]; then
    record profile_ncu "no ncu" 0 -
  elif [ "$GVISOR" = 1 ]; then
    say "profile: ncu cannot read the counters on gVisor: not run (FORCE_TOOLS=1 runs it)"
    record profile_ncu "unsupported: gVisor" 0 -
  else
    since=$SECONDS
    # the source view first: the one ncu run no call has reached yet (2026-12-06's ran out of
    # time after the first two variants), and one launch, ~10 s
    pooled "$pool" "$since" profile_ncu_select_source "${src_cmd[@]}" \
      --export "${rep}_select_source" --force-overwrite "$PY" bench/profile_step.py \
      --method range --variant group_select --steps 1 --shape 32768x8 &&
      pooled "$pool" "$since" profile_ncu_select_source_csv "$ncu" \
        --import "${rep}_select_source.ncu-rep" --csv --page source --print-source sass \
        --log-file "${rep}_select_source.csv" && ran="$ran${ran:+, }ncu select source"
    for v in $PROFILE_VARIANTS; do
      pooled "$pool" "$since" "profile_ncu_$v" "${run[@]}" --export "${rep}_$v" \
        --force-overwrite "$PY" bench/profile_step.py --method range --variant "$v" --steps 1 \
        --shape 32768x8 &&
        pooled "$pool" "$since" "profile_ncu_${v}_csv" "$ncu" --import "${rep}_$v.ncu-rep" \
          --csv --page details --log-file "${rep}_$v.csv" && ran="$ran${ran:+, }ncu $v"
    done
  fi
  say "profile: ran ${ran:-nothing}"
}

sanitize() {
  say "sanitize: $(bash bench/sanitize.sh --where)"
  if [ "$DRY" = 1 ]; then
    stage collect_sanitizer_cases 60 bash bench/sanitize.sh --collect
  fi
  gpu_here sanitize || return 0
  if [ "$GVISOR" = 1 ]; then
    say "sanitize: compute-sanitizer refuses the device on gVisor: not run (FORCE_TOOLS=1 runs it)"
    record sanitize "unsupported: gVisor" 0 -
    return 0
  fi
  ensure_build sanitize || return 0
  stage sanitize_memcheck "${LIMIT_MEMCHECK:-70}" bash bench/sanitize.sh memcheck
  stage sanitize_racecheck "${LIMIT_RACECHECK:-45}" bash bench/sanitize.sh racecheck
  stage sanitize_synccheck "${LIMIT_SYNCCHECK:-35}" bash bench/sanitize.sh synccheck
}

bench() {
  say "bench: bench/gpu_decode_attn.py, gpu_qk_topn.py, gpu_gather.py --out $WORK/results"
  if [ "$DRY" = 1 ]; then  # the three plans in one interpreter (one torch import)
    stage plan_benchmarks 60 "$PY" -c "import runpy, sys
sys.path.insert(0, 'bench')
for script in sys.argv[1:]:
    sys.argv = [script, '--dry-run']
    runpy.run_path(script, run_name='__main__')" bench/gpu_decode_attn.py bench/gpu_qk_topn.py \
      bench/gpu_gather.py
  fi
  gpu_here bench || return 0
  ensure_build bench || return 0
  stage gpu_decode_attn "${LIMIT_DECODE:-110}" "$PY" bench/gpu_decode_attn.py --out "$WORK/results"
  stage gpu_qk_topn "${LIMIT_QK_TOPN:-60}" "$PY" bench/gpu_qk_topn.py --out "$WORK/results"
  stage gpu_gather "${LIMIT_GATHER:-80}" "$PY" bench/gpu_gather.py --out "$WORK/results"
}

# Wheels carried from `make gpu-wheels` (no package registry there): gguf installed aside, the
# essays wheel read in place by kcache_ops.data.
if ls .whl/*.whl > /dev/null 2>&1; then
  SITE=${TMPDIR:-/tmp}/kcache_ops_site
  quick "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
    .whl/gguf-*.whl && export PYTHONPATH=$PYTHONPATH:$SITE
  export KCACHE_OPS_CACHE=$ROOT/.whl
fi

say "# bench/run_gpu.sh $(date -u '+%Y-%m-%d %H:%M UTC'), stages: ${STAGES[*]}, budget $BUDGET s$(
  [ "$DRY" = 1 ] && echo ', dry run')"
# its own limit, not LIMIT_QUICK: a cold torch import on a loaded machine takes several seconds;
# the version line it prints goes into env.txt below
if ! TORCH=$(timeout -k 5 120 "$PY" -c \
    "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2> /dev/null)
then
  say "$PY cannot import torch (within 120 s): set PYTHON to a Python that has it" \
    "(here, after make build: PYTHON=.venv/bin/python bash bench/run_gpu.sh ...)"
  exit 2
fi
quick "$PY" -c "import gguf" 2> /dev/null ||
  say "WARNING: no gguf package here (carry .whl, from make gpu-wheels): the GGUF model tests \
will skip or fail; the kernels' tests and benchmarks do not need it"
# gVisor (its kernel reports 4.4.0): ncu and compute-sanitizer do not work there (KINDS.md)
GVISOR=0
if [ "$(uname -r)" = 4.4.0 ] && [ "${FORCE_TOOLS:-0}" != 1 ]; then
  GVISOR=1
  say "gVisor (kernel 4.4.0): the ncu runs and compute-sanitizer will be skipped"
fi
if [ "$DRY" = 1 ]; then
  HAVE_GPU=0
  say "dry run: $("$PY" --version 2>&1), nvidia-smi $(command -v nvidia-smi || echo 'not found')"
else
  { quick nvidia-smi; quick nvcc --version | tail -2
    echo "$TORCH"
  } 2>&1 | tee -a "$LOG" > "$WORK/env.txt"
  if quick "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2> /dev/null
  then
    HAVE_GPU=1
  else
    HAVE_GPU=0
  fi
  if quick "$PY" -c "import pytest_timeout" 2> /dev/null; then
    TIMEOUT_ARGS=(--timeout "$PER_TEST" --timeout-method thread)
    SLOW_TIMEOUT_ARGS=(--timeout $((5 * PER_TEST)) --timeout-method thread)
  else
    say "pytest-timeout is not installed: each test file's limit alone bounds a hanging test"
  fi
fi
pack
for s in "${STAGES[@]}"; do
  "$s"
done
say "==== stages ($((SECONDS - T0)) s of $BUDGET)"
cat "$WORK/stages.txt"
pack
if [ "$NO_GPU" = 1 ]; then
  say "no GPU was visible: nothing ran on one"
  exit 3
fi
exit $FAILED
