"""Devices, dtypes, tolerances and input helpers shared by the op tests."""
import os
import re
import subprocess
import sys
import zlib

import pytest
import torch
from hypothesis import settings

import kcache_ops

# The devices each op is tested on; KCACHE_OPS_TEST_DEVICES (comma-separated, e.g. "cuda") narrows
# them, as bench/run_gpu.sh does on a lent GPU, where CI has already run the CPU paths.
DEVICES = [d for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
           if d in os.environ.get("KCACHE_OPS_TEST_DEVICES", "cpu,cuda").split(",")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# absolute/relative tolerance of an op's float32-accumulated output against the float32 reference
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# KCACHE_OPS_TEST_SEED (an integer in [0, 2^32); 0, the default, is what CI runs): another value
# draws every test's random inputs, Hypothesis's examples and the CPU emulator's schedule seeds
# (cuda_emu/emu.py) from it, to run the suite on inputs it has not seen; a failure replays from
# the test id and that number.
_SEED = os.environ.get("KCACHE_OPS_TEST_SEED", "0")
if not re.fullmatch(r"[0-9]{1,10}", _SEED) or int(_SEED) >= 2 ** 32:
    raise pytest.UsageError(f"KCACHE_OPS_TEST_SEED must be an integer in [0, 2^32), got {_SEED!r}")
TEST_SEED = int(_SEED)


def seed_of(name):
    """The seed of the test or function ``name`` under TEST_SEED (CI's: the CRC-32 of the name)."""
    return zlib.crc32((f"{name} seed {TEST_SEED}" if TEST_SEED else name).encode())


# Hypothesis draws the same shapes in every run (from each test's name; under another
# TEST_SEED, from the test's file and name and it), as the torch inputs are seeded from its id
settings.register_profile("kcache_ops", derandomize=True)
settings.load_profile("kcache_ops")


def pytest_collection_modifyitems(items):
    """Under a TEST_SEED other than 0, each Hypothesis test's examples from it and the test's
    file::name (its parametrized cases share one function, so one seed)."""
    if not TEST_SEED:
        return
    from hypothesis import seed as hypothesis_seed  # in every Hypothesis 6; CI's never needs it
    for item in items:
        obj = getattr(item, "obj", None)
        fn = getattr(obj, "__func__", obj)  # a method's function
        if getattr(fn, "is_hypothesis_test", False):  # set by @given
            hypothesis_seed(seed_of(item.nodeid.split("[")[0]))(fn)


def run_pytest(*args, env=None, cwd=None, timeout=900):
    """A nested pytest run of ``args`` (quiet, no cache; in ``cwd``, with ``env``) -> its
    CompletedProcess, the output captured as text."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs in every case, reproducible from the test's id."""
    torch.manual_seed(seed_of(request.node.nodeid))


@pytest.fixture(autouse=True)
def _threads():
    """Torch's CPU thread count back to what it was after each test: a bench script run with
    --threads sets it for the whole process."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def host_tensor(t, device):
    """``t`` where the op reads it from host memory (v_cache, src): on the CUDA path a pinned,
    device-mapped copy made by kcache_ops.alloc_host, on the CPU path ``t`` on the CPU."""
    t = t.cpu()
    if device == "cpu":
        return t
    return kcache_ops.alloc_host(t.shape, t.dtype).copy_(t)


def set_host_read_spread(monkeypatch, value):
    """KCACHE_OPS_HOST_READ_SPREAD set to ``value`` ("0" or "1") for the test, or unset where it
    is None: each op's default (gather_rows spreads its small host reads over the
    multiprocessors, sparse_attn_v does not; csrc/cuda/launch_grid.h)."""
    if value is None:
        monkeypatch.delenv("KCACHE_OPS_HOST_READ_SPREAD", raising=False)
    else:
        monkeypatch.setenv("KCACHE_OPS_HOST_READ_SPREAD", value)


@pytest.fixture
def poisoned_outputs():
    """Every tensor allocated while the test runs (an op's outputs among them) starts as NaN
    (integers as their largest value), so an element an op fails to write reads back as poison
    (torch's deterministic mode fills uninitialised memory; warn_only: ops without a
    deterministic version still run)."""
    import torch.utils.deterministic
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    torch.utils.deterministic.fill_uninitialized_memory = was[2]


def on_threads(threads, fn):
    """fn() with torch's CPU ops on ``threads`` threads (the CPU ops split rows across threads
    where the groups do not spread evenly over them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def seq_lens_tensor(lens, device):
    """[B] int32 per-sequence lengths on ``device``."""
    return torch.tensor(lens, dtype=torch.int32, device=device)
