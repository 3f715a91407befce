"""The portable CPU loops (GenericIsa) pass the same checks as the AVX2 ones that this machine
picks: the op tests rerun in a process with KCACHE_OPS_CPU_ISA=generic."""
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_generic_loops_match_reference():
    env = dict(os.environ, KCACHE_OPS_CPU_ISA="generic")
    files = [os.path.join(TESTS, f) for f in ("test_qk_topn.py", "test_sparse_attn_v.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-k", "cpu and not random", *files],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
