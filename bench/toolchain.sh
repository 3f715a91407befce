#!/usr/bin/env bash
# Does the built extension raise its errors, or does the process die? A smoke test of the error
# paths (messages that format integers and shapes, as most argument checks do) and of alloc_host's
# pinned memory, with the toolchain written beside it: the compiler the build used, the one torch
# was built with, the C++ runtime the extension loads. Where the smoke test dies, cuda-gdb's
# backtrace of it (no gdb on the lent GPU machines).
#
#     bash bench/toolchain.sh          exit 0 when the smoke test passes
#
# Run by bench/run_gpu.sh's toolchain stage right after the build; works on any machine with a
# build of kcache_ops (on one without a GPU the pinned-memory check is skipped).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE='
import torch, kcache_ops
checks = [
    ("alloc_host((3, -1))", lambda: kcache_ops.alloc_host((3, -1), torch.float32)),
    ("qk_topn(q [4, 64])", lambda: kcache_ops.qk_topn(
        torch.randn(4, 64), torch.randn(2, 2, 16, 64), torch.tensor([16, 3], dtype=torch.int32),
        4)),
]
for name, call in checks:
    try:
        call()
        raise SystemExit(f"{name}: no error raised")
    except RuntimeError as e:
        print(f"{name}: raised: {str(e).splitlines()[0]}")
if torch.cuda.is_available():
    t = kcache_ops.alloc_host((2, 3), torch.float32)
    print("alloc_host before any other CUDA call: is_pinned", t.is_pinned())
    assert t.is_pinned(), "alloc_host memory not reported pinned"
print("smoke test passed")
'
so=$(ls kcache_ops/_C*.so 2> /dev/null | head -1)
echo "CC=${CC:-} CXX=${CXX:-}; c++ is $(command -v c++ || echo none)," \
  "g++ is $(command -v g++ || echo none)"
"${CXX:-c++}" --version 2>&1 | head -1
"${CXX:-c++}" -v 2>&1 | grep -o -e '--with-default-libstdcxx-abi=[a-z0-9-]*' -e '^gcc version.*'
"$PY" -c "import re, torch; c = torch.__config__.show(); print('torch', torch.__version__,
'built with', *re.findall(r'GCC [0-9.]+|CXX_COMPILER=[^,]*', c))"
if [ -n "$so" ]; then
  echo "$so links:"
  ldd "$so" | grep -e stdc -e gcc_s -e gomp
  readelf -d "$so" | grep -e RUNPATH -e RPATH
  echo "std:: symbols defined in it (a static C++ runtime defines thousands):" \
    "$(nm -DC --defined-only "$so" | grep -c ' std::')"
fi
"$PY" -c "$SMOKE"
rc=$?
if [ $rc -gt 128 ]; then  # killed by a signal
  echo "smoke test died (status $rc): its backtrace"
  gdb=$(command -v cuda-gdb || ls /usr/local/cuda/bin/cuda-gdb 2> /dev/null)
  if [ -n "$gdb" ]; then
    timeout 120 "$gdb" -q -batch -ex run -ex bt -ex 'info sharedlibrary' --args "$PY" -c "$SMOKE" \
      2>&1 | grep -v -e '^\[New Thread' -e '^\[Thread .* exited' | tail -80
  else
    echo "no cuda-gdb"
  fi
fi
exit $rc
