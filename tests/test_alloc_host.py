"""kcache_ops.alloc_host: pinned, device-mapped host memory where a GPU is present (an ordinary CPU
tensor otherwise), usable as v_cache/src, and clear errors for impossible requests."""
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import DTYPES

import kcache_ops


@pytest.mark.parametrize("shape", [(2, 3, 97, 64), (5,), (0, 4)])
def test_shape_dtype_and_placement(dtype, shape):
    t = kcache_ops.alloc_host(shape, dtype)  # [*shape]
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu"
    assert t.is_contiguous()
    if torch.cuda.is_available():
        assert t.is_pinned()


def test_round_trip(dtype):
    src = torch.randn(3, 2, 50, 128).to(dtype)  # [B, H, S, D]
    t = kcache_ops.alloc_host(src.shape, dtype).copy_(src)
    assert torch.equal(t, src)


def test_memory_lives_with_the_tensor():
    views = [kcache_ops.alloc_host((1024, 1024), torch.float32).fill_(i)[i] for i in range(4)]
    for i, row in enumerate(views):
        assert (row == i).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_kernel_reads_it_zero_copy():
    src = kcache_ops.alloc_host((1, 1, 8, 64), torch.float32).copy_(torch.randn(1, 1, 8, 64))
    indices = torch.tensor([[[7, -1, 0]]], dtype=torch.int32, device="cuda")
    dst = kcache_ops.gather_rows(src, indices)  # [1, 1, 3, 64] on cuda
    assert torch.equal(dst[0, 0, 0].cpu(), src[0, 0, 7])


def test_negative_size():
    with pytest.raises(RuntimeError, match="alloc_host: shape must have no negative size"):
        kcache_ops.alloc_host((3, -1), torch.float32)


def test_size_overflowing_int64_says_so():
    with pytest.raises(RuntimeError, match=r"alloc_host: shape \[4611686018427387904, 4\] of "
                                           r"float64 needs more than 9223372036854775807 bytes"):
        kcache_ops.alloc_host((1 << 62, 4), torch.float64)
    assert kcache_ops.alloc_host((1 << 62, 0), torch.float32).shape == (1 << 62, 0)


def test_empty_shape_with_overflowing_strides_says_so():
    """No bytes, but torch's product of the sizes (in order, before the 0) or its contiguous
    strides would overflow: an error naming it, not "could not allocate 0 bytes"."""
    for shape in ((0, 1 << 62, 1 << 62), (1 << 62, 4, 0), (1 << 40, 1 << 30, 0)):
        with pytest.raises(RuntimeError, match=r"alloc_host: shape \[.*\] has sizes or strides "
                                               r"whose product overflows"):
            kcache_ops.alloc_host(shape, torch.float32)


def test_quantized_dtype_is_refused():
    with pytest.raises(RuntimeError, match="alloc_host: dtype must be a plain .* got QUInt8"):
        kcache_ops.alloc_host((2, 3), torch.quint8)


def test_an_int_shape():
    """One size of any integer type, as torch.empty takes it; a shape as a 1-d array."""
    import numpy as np
    for size in (5, np.int64(5), torch.tensor(5)):
        assert kcache_ops.alloc_host(size, torch.float32).shape == (5,)
    for shape in (np.array([2, 3]), torch.tensor([2, 3]), torch.Size([2, 3])):
        assert kcache_ops.alloc_host(shape, torch.float32).shape == (2, 3)


def test_impossible_size_names_the_bytes():
    with pytest.raises(RuntimeError, match=r"alloc_host: shape \[1125899906842624\] of float32 "
                                           r"needs 4503599627370496 bytes of host memory, more "
                                           r"than the \d+ bytes the machine reports available"):
        kcache_ops.alloc_host((1 << 50,), torch.float32)


def test_more_than_available_is_refused_not_over_committed():
    """Linux would hand out a request past MemAvailable lazily and kill the process (or swap V)
    once it is written: refused up front instead, naming both numbers."""
    available = kcache_ops.host_bytes_available()
    if available is None:
        pytest.skip("this machine does not report MemAvailable")
    rows = 2 * available // 4096 + 1  # [rows, 1024] float32: twice what is free (it moves)
    with pytest.raises(RuntimeError, match=rf"needs {rows * 4096} bytes of host memory, more than "
                                           r"the \d+ bytes the machine reports available"):
        kcache_ops.alloc_host((rows, 1024), torch.float32)


_WITHOUT_MEMINFO = """
import torch, kcache_ops
assert kcache_ops.host_bytes_available() is None
assert kcache_ops.alloc_host((4, 64), torch.float32).shape == (4, 64)
try:
    kcache_ops.alloc_host((1 << 50,), torch.float32)
except RuntimeError as e:
    print(str(e).splitlines()[0])
"""


def test_a_machine_without_meminfo_is_said_so():
    """Where /proc/meminfo has no MemAvailable (here: an empty file mounted over it, in a user and
    mount namespace of its own), host_bytes_available is None, small requests still succeed and
    an impossible one says the machine does not report its memory (not "-1 bytes available")."""
    with tempfile.NamedTemporaryFile() as empty:
        mount = ["unshare", "-rm", "sh", "-c", f"mount --bind {empty.name} /proc/meminfo && "
                                               f"exec \"$@\"", "sh"]
        try:
            probe = subprocess.run(mount + ["true"], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            pytest.skip("no unshare(1) on this machine")
        if probe.returncode != 0:
            pytest.skip(f"no user and mount namespaces here: {probe.stderr.strip()}")
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(kcache_ops.__file__)))
        run = subprocess.run(mount + [sys.executable, "-c", _WITHOUT_MEMINFO], env=env,
                             capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "could not allocate 4503599627370496 bytes" in run.stdout
    assert "the machine does not report its available memory" in run.stdout


def test_every_dtype_is_accepted():
    for dtype in DTYPES + [torch.int32, torch.uint8]:
        assert kcache_ops.alloc_host((4,), dtype).dtype == dtype


def test_host_bytes_available_reads_the_machine():
    available = kcache_ops.host_bytes_available()  # bytes, or None where not reported
    if available is None:
        pytest.skip("this machine does not report MemAvailable")
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    # both read at nearly the same moment: within 10% of each other
    assert abs(available - kib * 1024) <= 0.1 * kib * 1024
