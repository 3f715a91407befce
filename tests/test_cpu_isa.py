"""How the CPU ops are built: every level of the inner loops passes the op tests (this machine
picks its best level, AVX-512, AVX2 or the portable loops, csrc/cpu/isa.h; the tests rerun in
processes with KCACHE_OPS_CPU_ISA capping it at avx2 and at generic), and the parallel loops
are compiled with OpenMP."""
import os
import subprocess
import sys

import pytest

import kcache_ops

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("level", ["avx2", "generic"])
def test_capped_level_matches_reference(level):
    # the CPU cases whatever devices this run tests (bench/run_gpu.sh narrows them to cuda), and
    # the tests of rows split across threads, CPU-only
    env = dict(os.environ, KCACHE_OPS_CPU_ISA=level, KCACHE_OPS_TEST_DEVICES="cpu")
    files = [os.path.join(TESTS, f)
             for f in ("test_qk_topn.py", "test_sparse_attn_v.py", "test_lowbit_tail.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-k", "(cpu or across_threads) and not random", *files],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_unknown_level_is_an_error():
    code = ("import torch, kcache_ops; q = torch.randn(1, 1, 64); "
            "kcache_ops.qk_topn(q, q[:, :, None], torch.ones(1, dtype=torch.int32), 1)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, KCACHE_OPS_CPU_ISA="bogus"))
    assert run.returncode != 0
    assert 'KCACHE_OPS_CPU_ISA must be generic, avx2 or avx512, got "bogus"' in run.stderr


def test_parallel_for_is_built_with_openmp():
    """at::parallel_for is inline: compiled without -fopenmp the CPU ops would run on one thread."""
    with open(kcache_ops._C.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read()
