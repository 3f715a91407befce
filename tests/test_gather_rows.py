"""kcache_ops.gather_rows is an exact row copy: torch.equal with the reference over dtypes, GQA
ratios, padding rows, strided sources and random shapes."""
import pytest
import torch
from conftest import DEVICES, DTYPES, host_tensor, set_host_read_spread
from hypothesis import given, settings
from hypothesis import strategies as st

import kcache_ops
from kcache_ops import reference as R

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest: outputs start as NaN


def make_indices(B, H, N, S, device, pad_fraction=0.25):
    """[B, H, N] int32 in [0, S), about ``pad_fraction`` of them -1."""
    indices = torch.randint(0, S, (B, H, N), dtype=torch.int32, device=device)
    indices[torch.rand(B, H, N, device=device) < pad_fraction] = -1
    return indices


def check_gather(src, indices):
    dst = kcache_ops.gather_rows(src, indices)  # [B, H, N, D]
    assert dst.device == indices.device and dst.dtype == src.dtype
    assert torch.equal(dst.cpu(), R.gather_rows(src.cpu(), indices.cpu()))


@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_matches_reference(device, dtype, G, D):
    src = host_tensor(torch.randn(2, 2, 1025, D).to(dtype), device)
    check_gather(src, make_indices(2, 2 * G, 97, 1025, device))


@pytest.mark.parametrize("S", [10, 0], ids=["rows", "empty_cache"])
def test_all_padding_gives_zeros(device, S):
    """Indices all -1 give zero rows, also from a cache of no rows (the reference too)."""
    src = host_tensor(torch.randn(1, 2, S, 64), device)
    indices = torch.full((1, 4, 5), -1, dtype=torch.int32, device=device)
    assert torch.equal(kcache_ops.gather_rows(src, indices).cpu(), torch.zeros(1, 4, 5, 64))
    check_gather(src, indices)


@pytest.mark.parametrize("shape", [(1, 1, 4, 0), (0, 1, 4, 64)], ids=["rows_of_no_bytes", "B0"])
def test_nothing_to_copy_on_cpu(shape):
    """Rows of D = 0 elements, or no sequence: an empty [B, H, N, D] out, no copy made (the CPU
    op passed a null destination to memcpy and memset, undefined even for 0 bytes; UBSan
    reported it)."""
    B, Hs, S, D = shape
    src = torch.randn(B, Hs, S, D)  # [B, Hs, S, D]
    indices = torch.tensor([[[0, -1, 3]]] * B, dtype=torch.int32).reshape(B, 1, 3)  # [B, 1, 3]
    dst = kcache_ops.gather_rows(src, indices)
    assert dst.shape == (B, 1, 3, D) and dst.dtype == src.dtype


def test_strided_inputs(device, dtype):
    """src sliced on heads and S, indices a transposed view."""
    src = host_tensor(torch.randn(2, 4, 120, 128).to(dtype), device)[:, ::2, 7:104]
    indices = make_indices(6, 2, 33, 97, device).transpose(0, 1)
    check_gather(src, indices)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), Hs=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4, 8]),
       S=st.integers(1, 300), N=st.integers(1, 70), D=st.sampled_from([64, 128]),
       dtype=st.sampled_from(DTYPES), pad_fraction=st.sampled_from([0.0, 0.5, 1.0]))
def test_random_shapes(B, Hs, G, S, N, D, dtype, pad_fraction):
    for device in DEVICES:
        src = host_tensor(torch.randn(B, Hs, S, D).to(dtype), device)
        check_gather(src, make_indices(B, Hs * G, N, S, device, pad_fraction))


@pytest.mark.parametrize("spread", [None, "1", "0"], ids=["default", "spread", "unspread"])
def test_plans_with_and_without_the_host_read_spread(device, spread, monkeypatch):
    """The CUDA op's plan spreads a small read over the multiprocessors (fewer pieces a thread,
    gather_rows_launch.h) by default and with KCACHE_OPS_HOST_READ_SPREAD=1, or not with 0 (8 a
    thread): each copies every row (3 heads of 97 rows of 1 KiB: 18 624 pieces, 1 a thread on a
    132-multiprocessor GPU, 8 unspread)."""
    set_host_read_spread(monkeypatch, spread)
    check_gather(host_tensor(torch.randn(1, 3, 200, 512).to(torch.bfloat16), device),
                 make_indices(1, 3, 97, 200, device))
