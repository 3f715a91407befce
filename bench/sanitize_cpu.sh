#!/usr/bin/env bash
# The CPU ops under AddressSanitizer and UndefinedBehaviorSanitizer (out-of-bounds reads and
# writes, use after free, signed overflow, misaligned loads, float-to-int overflow), no GPU needed:
#
#     bash bench/sanitize_cpu.sh [pytest arguments]   (default: the op test files below)
#
# Builds the committed checkout (HEAD, cloned into $SAN_DIR, default $TMPDIR/kcache_ops_san: the
# checkout's own build is left alone) CPU-only with -fsanitize=address,undefined,float-cast-overflow
# (any error stops the run), then runs the tests there with the sanitizer runtimes preloaded into
# Python (which is not instrumented). The ops run at the CPU's best instruction set (AVX-512 where
# it has one); test_cpu_isa.py reruns the op tests capped at avx2 and at generic in child
# processes, which inherit the sanitizers. On 2 cores: about 5 minutes to build, 4 to test.
# Exit status: non-zero if the build fails, a sanitizer reports or a test fails.
#
# One test cannot pass here: test_qk_topn.py's test_scratch_beyond_host_memory_says_how_many_bytes
# runs qk_topn under a 2 GiB address-space limit, which AddressSanitizer's own reservations do not
# fit (it stops with "allocator is out of memory"); it is left out.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${SAN_DIR:-${TMPDIR:-/tmp}/kcache_ops_san}
FLAGS="-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all"
rm -rf "$DIR"
git clone -q . "$DIR"
echo "# building $(git rev-parse --short HEAD) with $FLAGS in $DIR"
(cd "$DIR" && KCACHE_OPS_CUDA=0 CFLAGS="$FLAGS -fno-omit-frame-pointer -g" LDFLAGS="$FLAGS" \
  "$PY" setup.py -q build_ext --inplace > build.log 2>&1) || { tail -30 "$DIR/build.log"; exit 1; }
if [ $# -eq 0 ]; then
  set -- test_qk_topn.py test_sparse_attn_v.py test_gather_rows.py test_reuse_rows.py \
    test_lowbit_tail.py test_quantize_rows.py test_op_errors.py test_cpu_isa.py test_alloc_host.py \
    test_cache.py test_hot_rows.py test_reuse.py \
    -k "not test_scratch_beyond_host_memory_says_how_many_bytes"
fi
cd "$DIR/tests"
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
  ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1 \
  PYTHONPATH="$DIR" "$PY" -m pytest -q -p no:cacheprovider "$@"
