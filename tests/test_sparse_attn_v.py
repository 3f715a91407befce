"""kcache_ops.sparse_attn_v against the float32 reference: renormalize on and off, padding,
heads with no valid entry, GQA ratios, strided inputs, a full decode step, random shapes."""
import pytest
import torch
from conftest import DEVICES, DTYPES, TOL, host_tensor, poison_allocator, seq_lens_tensor
from hypothesis import given, settings
from hypothesis import strategies as st

import kcache_ops
from kcache_ops import reference as R


def make_selection(B, Hq, N, S, device, pad_fraction=0.25):
    """Random scores [B, Hq, N] float32, indices [B, Hq, N] int32 in [0, S) with about
    ``pad_fraction`` of them -1 at random places, and an lse [B, Hq] above every score."""
    scores = torch.randn(B, Hq, N, device=device) * 3
    indices = torch.randint(0, S, (B, Hq, N), device=device, dtype=torch.int32)
    indices[torch.rand(B, Hq, N, device=device) < pad_fraction] = -1
    lse = scores.logsumexp(dim=-1) + torch.rand(B, Hq, device=device)
    return scores, indices, lse


def check_attn(scores, indices, v_cache, lse, renormalize, out, tol):
    """out [B, Hq, D] in v's dtype, close to the float32 reference, no NaN."""
    assert out.dtype == v_cache.dtype and out.device == scores.device
    assert out.shape == (*scores.shape[:2], v_cache.shape[-1])
    ref = R.sparse_attn_v(scores.cpu(), indices.cpu(), v_cache.float(),
                          None if lse is None else lse.cpu(), renormalize)
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu().float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full_softmax"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_matches_reference(device, dtype, G, D, renormalize):
    B, Hkv, S, N = 2, 2, 1025, 64
    scores, indices, lse = make_selection(B, Hkv * G, N, S, device)
    v = host_tensor(torch.randn(B, Hkv, S, D).to(dtype), device)
    poison_allocator(device, (B, Hkv * G, D), dtype)
    out = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize)
    check_attn(scores, indices, v, lse, renormalize, out, TOL[dtype])


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full_softmax"])
def test_no_valid_entry_gives_zeros(device, renormalize):
    """A head whose indices are all -1 (L_b = 0) yields exact zeros; others are unaffected."""
    scores, indices, lse = make_selection(2, 4, 8, 50, device, pad_fraction=0.0)
    indices[0, 1] = -1
    scores[0, 1] = float("-inf")
    lse[0, 1] = float("-inf")
    v = host_tensor(torch.randn(2, 2, 50, 64), device)
    out = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize)
    assert torch.equal(out[0, 1].cpu(), torch.zeros(64))
    check_attn(scores, indices, v, lse, renormalize, out, TOL[torch.float32])


def test_lse_ignored_when_renormalizing(device):
    scores, indices, lse = make_selection(2, 4, 8, 50, device)
    v = host_tensor(torch.randn(2, 4, 50, 128), device)
    with_lse = kcache_ops.sparse_attn_v(scores, indices, v, lse, True)
    assert torch.equal(with_lse, kcache_ops.sparse_attn_v(scores, indices, v, None, True))


def test_strided_inputs(device, dtype):
    """v_cache sliced on S and heads, scores/indices/lse transposed views."""
    B, Hkv, G, S, D, N = 2, 2, 4, 97, 64, 16
    scores, indices, lse = make_selection(Hkv * G, B, N, S, device)
    scores, indices, lse = scores.transpose(0, 1), indices.transpose(0, 1), lse.t()
    v = host_tensor(torch.randn(B, 2 * Hkv, S + 9, D).to(dtype), device)[:, 1::2, 3:S + 3]
    for renormalize in (True, False):
        out = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize)
        check_attn(scores, indices, v, lse, renormalize, out, TOL[dtype])


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_decode_step(device, dtype, group_select):
    """qk_topn then sparse_attn_v equals the reference decode step; N >= L keeps full attention."""
    B, Hkv, G, S, D = 3, 2, 4, 300, 128
    q = torch.randn(B, Hkv * G, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, S, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, S, D).to(dtype)
    lens = seq_lens_tensor([300, 97, 1], device)
    for n in (32, S):
        scores, indices, lse = kcache_ops.qk_topn(q, k, lens, n, None, group_select)
        out = kcache_ops.sparse_attn_v(scores, indices, host_tensor(v, device), lse)
        check_attn(scores, indices, v, lse, True, out, TOL[dtype])
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.cpu().float()[:, :, None], k.cpu().float().repeat_interleave(G, 1),
        v.float().repeat_interleave(G, 1))[:, :, 0]  # [B, Hq, D]; sequence 0 is full length
    torch.testing.assert_close(out[0].cpu().float(), dense[0], atol=TOL[dtype], rtol=TOL[dtype])


def test_check_values_off(device):
    """check_values=False (no index read-back on CUDA) changes no output and passes opcheck."""
    scores, indices, lse = make_selection(2, 8, 16, 97, device)
    v = host_tensor(torch.randn(2, 2, 97, 64), device)
    for renormalize in (True, False):
        want = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize)
        got = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize, check_values=False)
        assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.kcache_ops.sparse_attn_v.default,
                          (scores, indices, v, lse, False, False))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4, 8]),
       S=st.integers(1, 400), N=st.integers(1, 80), D=st.sampled_from([64, 128]),
       dtype=st.sampled_from(DTYPES), renormalize=st.booleans(),
       pad_fraction=st.sampled_from([0.0, 0.5, 1.0]))
def test_random_shapes(B, Hkv, G, S, N, D, dtype, renormalize, pad_fraction):
    for device in DEVICES:
        scores, indices, lse = make_selection(B, Hkv * G, N, S, device, pad_fraction)
        v = host_tensor(torch.randn(B, Hkv, S, D).to(dtype), device)
        out = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize)
        check_attn(scores, indices, v, lse, renormalize, out, TOL[dtype])
