"""V exists only in host RAM: sparse_attn_v and gather_rows read pinned, device-mapped memory in
place (no device copy), and memory that is not pinned gets a clear error instead of a silent copy.
sparse_attn_v also reads V rows already in device memory (KCache's reused rows)."""
import pytest
import torch

import kcache_ops
from kcache_ops import reference
from conftest import set_host_read_spread
from cuda_checks import host_random, requires_cuda
from test_sparse_attn_v import assert_rounded_close

# conftest: outputs start as NaN (device memory the ops allocate is filled in place: the memory
# measured below does not grow; alloc_host's pinned memory is not torch's and is not filled)
pytestmark = [requires_cuda, pytest.mark.usefixtures("poisoned_outputs")]


def test_alloc_host_is_pinned_and_mapped():
    v = kcache_ops.alloc_host((2, 3, 5, 64), torch.float16)
    assert v.device.type == "cpu" and v.is_pinned() and v.shape == (2, 3, 5, 64)


def test_v_only_in_host_ram():
    """1 GiB of V in host RAM; the device's free memory does not drop by anything near that."""
    B, Hq, Hkv, S, D, n = 8, 32, 8, 32768, 128, 64
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    v = host_random((B, Hkv, S, D), torch.bfloat16)  # 1 GiB
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((B,), S, device="cuda", dtype=torch.int32)
    scores, idx, lse = kcache_ops.qk_topn(q, k, lens, n)
    out = kcache_ops.sparse_attn_v(scores, idx, v, lse)
    rows = kcache_ops.gather_rows(v, idx)
    torch.cuda.synchronize()
    grown = free_before - torch.cuda.mem_get_info()[0]
    k_bytes = k.numel() * k.element_size()
    # K, the score scratch ([B, Hq, S] float32, cached) and small outputs: far below K + V
    assert grown < k_bytes + B * Hq * S * 4 + (256 << 20), f"device memory grew by {grown} bytes"
    want = reference.sparse_attn_v(scores.cpu(), idx.cpu(), v, lse.cpu())
    assert_rounded_close(out, want.float())  # test_cuda_ops.py says why this bound holds
    assert torch.equal(rows.cpu(), reference.gather_rows(v, idx.cpu()))


def test_pageable_memory_is_refused():
    v = torch.randn(1, 2, 100, 64)  # ordinary CPU memory
    idx = torch.zeros(1, 4, 8, device="cuda", dtype=torch.int32)
    scores = torch.randn(1, 4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="kcache_ops.alloc_host"):
        kcache_ops.sparse_attn_v(scores, idx, v)
    with pytest.raises(RuntimeError, match="kcache_ops.alloc_host"):
        kcache_ops.gather_rows(v, idx)
    with pytest.raises(RuntimeError, match="CPU tensor in pinned"):
        kcache_ops.gather_rows(v.cuda(), idx)


@pytest.mark.parametrize("spread", [None, "0"], ids=["default", "unspread"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_attn_v_reads_device_memory(dtype, spread, monkeypatch):
    """v_cache on the device of the scores: the output of the same rows in host memory (the same
    kernel and plan, other addresses), by default and with KCACHE_OPS_HOST_READ_SPREAD=0. With 1
    this batch's 4 blocks split each row list over the multiprocessors where V is in host memory,
    and the parts' sums, added in another order, moved float32 outputs in their last bits (an
    H100, 2026-12-06, when that was the default); test_sparse_attn_v.py checks that plan against
    the reference."""
    set_host_read_spread(monkeypatch, spread)
    B, Hq, Hkv, S, D, n = 2, 8, 2, 300, 128, 16
    v = host_random((B, Hkv, S, D), dtype)
    scores = torch.randn(B, Hq, n, device="cuda")
    idx = torch.randint(-1, S, (B, Hq, n), device="cuda", dtype=torch.int32)
    lse = torch.logsumexp(scores, -1) + 1  # [B, Hq]
    for renormalize in (True, False):
        host = kcache_ops.sparse_attn_v(scores, idx, v, lse, renormalize)
        device = kcache_ops.sparse_attn_v(scores, idx, v.cuda(), lse, renormalize)
        assert torch.equal(device, host)


def test_host_read_spread_of_another_value_is_refused(monkeypatch):
    """KCACHE_OPS_HOST_READ_SPREAD is 0, 1, empty or unset: another value is an error that names
    it, in both ops that read host memory (not a silent default)."""
    monkeypatch.setenv("KCACHE_OPS_HOST_READ_SPREAD", "yes")
    v = host_random((1, 2, 100, 64), torch.float32)
    idx = torch.randint(-1, 100, (1, 4, 8), device="cuda", dtype=torch.int32)
    scores = torch.randn(1, 4, 8, device="cuda")
    message = "KCACHE_OPS_HOST_READ_SPREAD must be 0, 1, empty or unset, got 'yes'"
    with pytest.raises(RuntimeError, match=message):
        kcache_ops.gather_rows(v, idx)
    with pytest.raises(RuntimeError, match=message):
        kcache_ops.sparse_attn_v(scores, idx, v)


def test_torch_pinned_memory_is_mapped():
    """torch's pin_memory() is cudaHostAlloc memory, mapped under unified addressing: accepted."""
    v = torch.randn(1, 2, 100, 64).pin_memory()
    idx = torch.randint(-1, 100, (1, 4, 8), device="cuda", dtype=torch.int32)
    assert torch.equal(kcache_ops.gather_rows(v, idx).cpu(), reference.gather_rows(v, idx.cpu()))


def test_write_combined_allocation(monkeypatch):
    monkeypatch.setenv("KCACHE_OPS_HOST_ALLOC_WC", "1")
    src = torch.randn(2, 2, 300, 128)
    v = kcache_ops.alloc_host(src.shape, src.dtype)
    v.copy_(src)
    idx = torch.randint(-1, 300, (2, 4, 50), device="cuda", dtype=torch.int32)
    assert torch.equal(kcache_ops.gather_rows(v, idx).cpu(), reference.gather_rows(src, idx.cpu()))


def test_interior_and_strided_host_views():
    """A slice of a larger host allocation (interior pointer, strided dims) is read in place."""
    big = kcache_ops.alloc_host((3, 4, 700, 64), torch.bfloat16)
    big.copy_(torch.randn(big.shape))
    v = big[1:, :, 50:650]  # [2, 4, 600, 64], offset and strided
    idx = torch.randint(-1, 600, (2, 8, 40), device="cuda", dtype=torch.int32)
    scores = torch.randn(2, 8, 40, device="cuda")
    assert torch.equal(kcache_ops.gather_rows(v, idx).cpu(), reference.gather_rows(v, idx.cpu()))
    want = reference.sparse_attn_v(scores.cpu(), idx.cpu(), v)
    assert_rounded_close(kcache_ops.sparse_attn_v(scores, idx, v), want.float())
