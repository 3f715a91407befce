"""kcache_ops.sparse_attn_v against the float32 reference: renormalize on and off, padding,
heads with no valid entry, GQA ratios, heads of a group sharing rows, strided inputs, a full decode
step, random shapes; the mean
tail (v_sum, seq_lens) over the same, L_b <= N, L_b = 0, the mass clamp and exactness when the
rows not read are all equal."""
import ctypes
import ctypes.util
import platform
import sys

import pytest
import torch
from conftest import (DEVICES, DTYPES, TOL, host_tensor, on_threads, seq_lens_tensor,
                      set_host_read_spread)
from hypothesis import given, settings
from hypothesis import strategies as st

import kcache_ops
from kcache_ops import reference as R

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest: outputs start as NaN


def make_selection(B, Hq, N, S, device, pad_fraction=0.25):
    """Random scores [B, Hq, N] float32, indices [B, Hq, N] int32 in [0, S) with about
    ``pad_fraction`` of them -1 at random places, and an lse [B, Hq] above every score."""
    scores = torch.randn(B, Hq, N, device=device) * 3
    indices = torch.randint(0, S, (B, Hq, N), device=device, dtype=torch.int32)
    indices[torch.rand(B, Hq, N, device=device) < pad_fraction] = -1
    lse = scores.logsumexp(dim=-1) + torch.rand(B, Hq, device=device)
    return scores, indices, lse


def overlapping_indices(B, Hkv, G, N, S, kind, device, lens=None):
    """Per-head index rows [B, Hkv * G, N] int32 in [0, L_b) (L_b = lens[b], else S; L_b >= 1)
    whose heads of a group overlap, as a real model's heads do (bench/head_overlap.py).

    ``"half"``: each head has the N // 2 rows common to its group in its own order and N - N // 2
    rows of its own drawn at random (which may repeat a row); ``"same"``: every head of a group has
    the same N distinct rows (N <= L_b), head h rotated by h places: never all in one order, which
    would be group_select's shared index row.
    """
    indices = torch.empty(B, Hkv, G, N, dtype=torch.int32)
    for b in range(B):
        L = S if lens is None else lens[b]
        for kvh in range(Hkv):
            if kind == "same":
                rows = torch.randperm(L)[:N]
                for h in range(G):
                    indices[b, kvh, h] = rows.roll(h)
            else:
                common = torch.randperm(L)[:N // 2]
                for h in range(G):
                    own = torch.randint(0, L, (N - N // 2,))
                    indices[b, kvh, h] = torch.cat([common, own])[torch.randperm(N)]
    return indices.view(B, Hkv * G, N).to(device)


def assert_rounded_close(out, ref):
    """out (float32, float16 or bfloat16) against the float32 reference ref: within float32's
    tolerance, or for a 16-bit out, ref rounded to that dtype within one unit in its last place
    (the ops sum in float32 and round once; a float32 difference of a few 1e-7 may round the other
    way). The 16-bit dtype's own tolerance let a dropped entry of weight 0.005 pass."""
    tol = TOL[torch.float32]
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)
    else:
        torch.testing.assert_close(out.cpu().float(), ref.to(out.dtype).float(), atol=tol,
                                   rtol=torch.finfo(out.dtype).eps)


def check_attn(scores, indices, v_cache, lse, renormalize, out):
    """out [B, Hq, D] in v's dtype, no NaN, the reference's (:func:`assert_rounded_close`)."""
    assert out.dtype == v_cache.dtype and out.device == scores.device
    assert out.shape == (*scores.shape[:2], v_cache.shape[-1])
    ref = R.sparse_attn_v(scores.cpu(), indices.cpu(), v_cache.float(),
                          None if lse is None else lse.cpu(), renormalize)  # [B, Hq, D] float32
    assert not out.isnan().any()
    assert_rounded_close(out, ref)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full_softmax"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 3, 4, 7, 8])
def test_matches_reference(device, dtype, G, D, renormalize):
    B, Hkv, S, N = 2, 2, 1025, 64
    scores, indices, lse = make_selection(B, Hkv * G, N, S, device)
    v = host_tensor(torch.randn(B, Hkv, S, D).to(dtype), device)
    out = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize)
    check_attn(scores, indices, v, lse, renormalize, out)


@pytest.mark.parametrize("kind", ["half", "same"])
@pytest.mark.parametrize("G", [3, 8])
def test_heads_sharing_rows(device, dtype, G, kind):
    """Per-head selections that overlap within a group (on CUDA each distinct row is read once for
    the heads that chose it), with padding."""
    B, Hkv, S, D, N = 2, 2, 300, 128, 64
    scores, _, lse = make_selection(B, Hkv * G, N, S, device)
    indices = overlapping_indices(B, Hkv, G, N, S, kind, device)
    indices[torch.rand(indices.shape, device=device) < 0.1] = -1
    v = host_tensor(torch.randn(B, Hkv, S, D).to(dtype), device)
    for renormalize in (True, False):
        out = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize)
        check_attn(scores, indices, v, lse, renormalize, out)


@pytest.mark.skipif(platform.machine() != "x86_64" or not sys.platform.startswith("linux"),
                    reason="glibc's fesetround constants on x86-64")
def test_the_callers_rounding_mode_on_every_thread():
    """The CPU ops run each chunk of their parallel loops in the caller's floating-point mode,
    rounding included (fesetround sets the calling thread's alone): rounding toward zero, the
    output on 2 threads is the one on 1 (a worker rounded its rows to nearest: helper 158's
    review), and differs from the output rounded to nearest, so the mode reached the sums."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    to_nearest, toward_zero = 0x000, 0xC00  # FE_TONEAREST, FE_TOWARDZERO
    torch.manual_seed(4)
    scores, indices, lse = make_selection(4, 16, 64, 500, "cpu")  # [B, Hq, N], ..., [B, Hq]
    v = torch.randn(4, 4, 500, 128)  # [B, Hkv, S, D]: 16 groups over the threads

    def attend():
        return kcache_ops.sparse_attn_v(scores, indices, v, lse)  # [B, Hq, D]
    nearest = on_threads(2, attend)  # the pool's threads exist before the mode is set
    assert libm.fesetround(toward_zero) == 0
    try:
        out = [on_threads(threads, attend) for threads in (1, 2)]
    finally:
        libm.fesetround(to_nearest)
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], nearest)


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
    check_attn(scores, indices, v, lse, renormalize, out)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full_softmax"])
def test_empty_cache_gives_zeros(device, renormalize):
    """A cache of no rows (S = 0, every index -1): zeros, as the reference gives."""
    scores = torch.full((2, 4, 3), float("-inf"), device=device)  # [B, Hq, N]
    indices = torch.full((2, 4, 3), -1, dtype=torch.int32, device=device)  # [B, Hq, N]
    lse = torch.full((2, 4), float("-inf"), device=device)  # [B, Hq]
    v = host_tensor(torch.randn(2, 2, 0, 64), device)  # [B, Hkv, 0, D]
    out = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize)
    assert torch.equal(out.cpu(), torch.zeros(2, 4, 64))
    check_attn(scores, indices, v, lse, renormalize, out)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full_softmax"])
def test_rows_near_the_float_range_stay_finite(device, renormalize):
    """Finite rows of magnitude up to 3e38: the weights are normalised before they meet V, so the
    output, a convex combination of the rows, stays finite (summed first and divided at the end,
    it overflowed to inf)."""
    scores, indices, lse = make_selection(2, 4, 8, 50, device, pad_fraction=0.0)
    scores[0, 0] = 0.0  # equal weights: 8 rows of 2e38 sum to 1.6e39 before the division
    lse[0, 0] = torch.tensor(8.0).log()  # their full-softmax weights 1/8
    v = torch.rand(2, 2, 50, 64) * 2e38 + 1e38  # [B, Hkv, S, D] in [1e38, 3e38]: no cancellation
    v[0, 0] = 2e38
    v = host_tensor(v, device)
    out = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize)
    assert out.isfinite().all()
    check_attn(scores, indices, v, lse, renormalize, out)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full_softmax"])
def test_nan_and_inf_weights_count_zero(device, renormalize):
    """As the reference (nan_to_num): a NaN weight counts 0 — a valid NaN score (its entry; with
    renormalize the whole softmax of its head), a NaN lse (the whole head), a +inf score with the
    +inf lse that qk_topn gives it (its entry; with renormalize its head); the other heads are
    unaffected and nothing comes out NaN."""
    scores, indices, lse = make_selection(2, 6, 8, 50, device, pad_fraction=0.0)
    scores[0, 0, 3] = float("nan")
    lse[0, 2] = float("nan")
    scores[1, 4, 5] = float("inf")
    lse[1, 4] = float("inf")
    v = host_tensor(torch.randn(2, 2, 50, 64), device)
    out = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize)
    check_attn(scores, indices, v, lse, renormalize, out)
    if renormalize:
        assert torch.equal(out[0, 0].cpu(), torch.zeros(64))
        assert torch.equal(out[1, 4].cpu(), torch.zeros(64))
    else:
        assert torch.equal(out[0, 2].cpu(), torch.zeros(64))


@pytest.mark.parametrize("pad_score", [float("nan"), float("inf"), 1e4], ids=["nan", "inf", "1e4"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full_softmax"])
def test_scores_at_padding_are_never_read(device, renormalize, pad_score):
    """A padding entry's score enters neither the softmax's max nor its sum (DESIGN §3: padding
    entries are ignored): NaN, +inf or 1e4 there gives the output of -inf there, the reference's.
    qk_topn writes -inf at padding, and make_selection finite scores, which a max over every
    entry does not change (helper 165's mutant: a NaN or huge max zeroed every weight)."""
    scores, indices, lse = make_selection(2, 6, 8, 50, device, pad_fraction=0.0)
    indices[..., -2:] = -1  # [B, Hq, N]: two padding entries a head
    clean = scores.clone()
    clean[..., -2:] = float("-inf")
    scores[..., -2:] = pad_score
    v = host_tensor(torch.randn(2, 2, 50, 64), device)  # [B, Hkv, S, D]
    out = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize)  # [B, Hq, D]
    assert torch.equal(out, kcache_ops.sparse_attn_v(clean, indices, v, lse, renormalize))
    check_attn(clean, indices, v, lse, renormalize, out)


@pytest.mark.parametrize("mean_tail", [False, True], ids=["no_tail", "mean_tail"])
def test_lse_minus_inf_with_finite_scores(device, mean_tail):
    """An lse of -inf beside finite scores (inconsistent, but the op takes it): each weight
    exp(s - lse) = +inf counts as the largest float, as the reference's nan_to_num, and the mean
    tail's mass clamps to 0; CPU and CUDA as the reference."""
    scores, indices, lse, v, v_sum, lens = make_tail_case(1, 1, 2, 2, 50, [50], torch.float32,
                                                          device, pad_fraction=0.0)
    lse[0, 1] = float("-inf")
    v = v * 1e-30  # the largest float times a row stays finite
    kw = dict(v_sum=v_sum * 1e-30, seq_lens=lens) if mean_tail else {}
    out = kcache_ops.sparse_attn_v(scores, indices, host_tensor(v, device), lse, False, **kw)
    ref = R.sparse_attn_v(scores.cpu(), indices.cpu(), v.float(), lse.cpu(), False,
                          *((v_sum.cpu() * 1e-30, lens.cpu()) if mean_tail else ()))
    assert ref.isfinite().all() and ref[0, 1].abs().max() > 1e6
    # each head at the scale of its terms, a weight times 1e-30 (the rows are randn · 1e-30): the
    # weights are at most 1 at head 0, the largest float (3.4e38) at head 1, whose two terms may
    # cancel to far less (KCACHE_OPS_TEST_SEED=8: to 2.8e6, the op and the reference one float32
    # unit of a term apart, 1.1e-5 of the sum). A wrong finite tail mass at head 1 (it clamps to
    # 0) weighs ~1e-30 against its ~3e8 terms: no output shows it (the mean tail's tests check
    # the mass where the weights are finite).
    scale = torch.tensor([1e-30, torch.finfo(torch.float32).max * 1e-30]).view(1, 2, 1)
    torch.testing.assert_close(out.cpu() / scale, ref / scale, atol=TOL[torch.float32],
                               rtol=TOL[torch.float32])


def test_mean_tail_nan_weight_counts_zero(device):
    """The mean tail's mass leaves a NaN weight out, as the reference does."""
    scores, indices, lse, v, v_sum, lens = make_tail_case(2, 2, 2, 8, 50, [50, 40], torch.float32,
                                                          device, pad_fraction=0.0)
    scores[1, 3, 2] = float("nan")
    out = kcache_ops.sparse_attn_v(scores, indices, host_tensor(v, device), lse, False,
                                   v_sum=v_sum, seq_lens=lens)
    check_tail(scores, indices, v, lse, v_sum, lens, out)


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
        check_attn(scores, indices, v, lse, renormalize, out)


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
        check_attn(scores, indices, v, lse, True, out)
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
    # V on the device: opcheck copies its inputs, and torch before PR 185047 copies pinned memory
    # into pageable memory, which the CUDA op refuses
    torch.library.opcheck(torch.ops.kcache_ops.sparse_attn_v.default,
                          (scores, indices, v.to(device), lse, False, False))


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
        check_attn(scores, indices, v, lse, renormalize, out)


# ---- the mean tail ------------------------------------------------------------------------------

def make_tail_case(B, Hkv, G, N, S, lens, dtype, device, pad_fraction=0.25, D=64):
    """A selection as qk_topn makes it, with the mean tail's inputs.

    -> scores [B, Hq, N] float32, indices [B, Hq, N] int32 (distinct rows j < L_b per head,
    ``-1`` at about ``pad_fraction`` of the places and past L_b), lse [B, Hq] above every score,
    v [B, Hkv, S, D] on the CPU (rows j >= L_b NaN: never to be read into the output),
    v_sum [B, Hkv, D] float32 (sum of the rows j < L_b) and seq_lens [B] int32, on ``device``.
    """
    Hq = Hkv * G
    scores, _, lse = make_selection(B, Hq, N, S, device)
    indices = torch.full((B, Hq, N), -1, dtype=torch.int32)
    for b, L in enumerate(lens):
        for h in range(Hq):
            rows = torch.randperm(L)[:N].to(torch.int32)
            indices[b, h, :len(rows)] = rows
    indices[torch.rand(B, Hq, N) < pad_fraction] = -1
    indices = indices.to(device)
    v = torch.randn(B, Hkv, S, D).to(dtype)
    v_sum = torch.empty(B, Hkv, D)  # [B, Hkv, D]
    for b, L in enumerate(lens):
        v_sum[b] = v[b, :, :L].float().sum(1)
        v[b, :, L:] = float("nan")
    return scores, indices, lse, v, v_sum.to(device), seq_lens_tensor(lens, device)


def check_tail(scores, indices, v_cache, lse, v_sum, seq_lens, out):
    """out [B, Hq, D] in v's dtype, the reference's with the mean tail (as check_attn)."""
    assert out.dtype == v_cache.dtype and out.device == scores.device
    assert out.shape == (*scores.shape[:2], v_cache.shape[-1])
    v = v_cache.float().nan_to_num(0.0)  # rows past L_b: the reference multiplies them by 0
    ref = R.sparse_attn_v(scores.cpu(), indices.cpu(), v, lse.cpu(), False, v_sum.cpu(),
                          seq_lens.cpu())
    assert not out.isnan().any()
    assert_rounded_close(out, ref)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 2, 3, 4, 8])
def test_mean_tail_matches_reference(device, dtype, G, D):
    """Sequences with L_b > N, L_b <= N (no tail: every row selected or padding) and L_b = 0."""
    B, Hkv, S, N = 4, 2, 301, 32
    lens = [301, 97, 20, 0]
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(B, Hkv, G, N, S, lens, dtype,
                                                              device, D=D)
    v = host_tensor(v, device)
    out = kcache_ops.sparse_attn_v(scores, indices, v, lse, False, v_sum=v_sum,
                                   seq_lens=seq_lens)
    check_tail(scores, indices, v, lse, v_sum, seq_lens, out)
    assert torch.equal(out[3].cpu(), torch.zeros(Hkv * G, D, dtype=dtype))  # L_b = 0


def test_mean_tail_mass_clamped(device):
    """An lse below the selected scores' log-sum-exp (sum p > 1): no tail, not a negative one."""
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(2, 2, 3, 16, 90, [90, 50],
                                                              torch.float32, device)
    lse = scores.masked_fill(indices < 0, float("-inf")).logsumexp(-1) - 0.05
    v = host_tensor(v, device)
    out = kcache_ops.sparse_attn_v(scores, indices, v, lse, False, v_sum=v_sum,
                                   seq_lens=seq_lens)
    check_tail(scores, indices, v, lse, v_sum, seq_lens, out)
    plain = kcache_ops.sparse_attn_v(scores, indices, v, lse, False)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)


def test_mean_tail_selected_row_of_score_minus_inf(device, dtype):
    """A selected row whose score is -inf (weight 0) at a valid index is still selected: it adds
    nothing, and the mean tail leaves it out of the rows not selected (not taken as padding)."""
    B, Hkv, G, S, N = 2, 2, 3, 90, 16
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(B, Hkv, G, N, S, [90, 50], dtype,
                                                              device, pad_fraction=0.0)
    ninf = torch.rand(scores.shape, device=scores.device) < 0.3
    ninf[:, :, 0] = True  # one at least per head, besides the random ones
    scores = scores.masked_fill(ninf & (indices >= 0), float("-inf"))
    v = host_tensor(v, device)
    out = kcache_ops.sparse_attn_v(scores, indices, v, lse, False, v_sum=v_sum,
                                   seq_lens=seq_lens)
    check_tail(scores, indices, v, lse, v_sum, seq_lens, out)


def test_mean_tail_strided_inputs(device, dtype):
    """v_cache a [:, :, :T] slice of a larger buffer, v_sum and seq_lens strided, scores /
    indices / lse transposed views."""
    B, Hkv, G, S, N = 3, 2, 4, 97, 16
    lens = [97, 40, 9]
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(B, Hkv, G, N, S, lens, dtype,
                                                              device)
    buf = torch.randn(B, Hkv, S + 31, 64).to(dtype)
    buf[:, :, :S] = v
    v = host_tensor(buf, device)[:, :, :S]
    scores, indices = scores.transpose(0, 1).contiguous().transpose(0, 1), \
        indices.transpose(0, 1).contiguous().transpose(0, 1)
    lse = lse.t().contiguous().t()
    v_sum = torch.stack([v_sum, torch.randn_like(v_sum)], 1)[:, 0]  # [B, Hkv, D], batch stride x2
    # every other element, beside lengths outside [0, S]: read, they fail the check
    seq_lens = torch.stack([seq_lens, torch.tensor([S + 1, -1, S + 9], dtype=torch.int32,
                                                   device=device)], 1)[:, 0]  # [B], stride 2
    out = kcache_ops.sparse_attn_v(scores, indices, v, lse, False, v_sum=v_sum,
                                   seq_lens=seq_lens)
    check_tail(scores, indices, v, lse, v_sum, seq_lens, out)


def test_mean_tail_empty(device):
    """B = 0 gives an empty output; N = 0 gives the mean of all L_b rows times the whole mass."""
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(0, 2, 2, 8, 30, [], torch.float32,
                                                              device)
    out = kcache_ops.sparse_attn_v(scores, indices, host_tensor(v, device), lse, False,
                                   v_sum=v_sum, seq_lens=seq_lens)
    assert out.shape == (0, 4, 64)
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(2, 2, 2, 0, 30, [30, 7],
                                                              torch.float32, device)
    out = kcache_ops.sparse_attn_v(scores, indices, host_tensor(v, device), lse, False,
                                   v_sum=v_sum, seq_lens=seq_lens)
    want = (v_sum / seq_lens[:, None, None]).repeat_interleave(2, 1)  # [B, Hq, D]
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_mean_tail_decode_step(device, dtype, group_select):
    """qk_topn then sparse_attn_v with the tail, as the cache calls them (check_values=False):
    equal to the reference; N >= L_b gives exact attention, and with group selection so does a
    V whose rows not selected are all equal (the mean is then exact)."""
    B, Hkv, G, S, D, n = 3, 2, 3, 300, 64, 32
    q = torch.randn(B, Hkv * G, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, S, D, device=device).to(dtype)
    lens = seq_lens_tensor([300, 97, 20], device)
    v = torch.randn(B, Hkv, S, D).to(dtype)
    scores, indices, lse = kcache_ops.qk_topn(q, k, lens, n, None, group_select,
                                              check_values=False)
    if group_select:  # every row not selected of (b, kv head) gets one common value
        chosen = torch.zeros(B, Hkv, S + 1, dtype=torch.bool)
        idx = indices.cpu().view(B, Hkv, G, n)[:, :, 0].long()
        chosen.scatter_(-1, torch.where(idx >= 0, idx, S), True)
        v = torch.where(chosen[..., :S, None], v, torch.randn(B, Hkv, 1, D).to(dtype))
    v_sum = torch.stack([v[b, :, :L].float().sum(1) for b, L in enumerate(lens.tolist())])
    v_sum = v_sum.to(device)
    out = kcache_ops.sparse_attn_v(scores, indices, host_tensor(v, device), lse, False,
                                   check_values=False, v_sum=v_sum, seq_lens=lens)
    check_tail(scores, indices, v, lse, v_sum, lens, out)
    mask = torch.arange(S)[None, :] < lens.cpu()[:, None]  # [B, S]
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.cpu().float()[:, :, None], k.cpu().float().repeat_interleave(G, 1),
        v.float().repeat_interleave(G, 1), attn_mask=mask[:, None, None])[:, :, 0]  # [B, Hq, D]
    exact = [2] + ([0, 1] if group_select else [])  # L_b <= n; equal rows outside the top n
    torch.testing.assert_close(out[exact].cpu().float(), dense[exact], atol=2 * TOL[dtype],
                               rtol=2 * TOL[dtype])


def test_mean_tail_check_values_off(device):
    """check_values=False changes no output; opcheck with the tail's arguments."""
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(2, 2, 4, 16, 97, [97, 30],
                                                              torch.float32, device)
    v = host_tensor(v, device)
    want = kcache_ops.sparse_attn_v(scores, indices, v, lse, False, v_sum=v_sum,
                                    seq_lens=seq_lens)
    got = kcache_ops.sparse_attn_v(scores, indices, v, lse, False, check_values=False,
                                   v_sum=v_sum, seq_lens=seq_lens)
    assert torch.equal(got, want)
    # V on the device: opcheck copies its inputs, and torch before PR 185047 copies pinned memory
    # into pageable memory, which the CUDA op refuses
    torch.library.opcheck(torch.ops.kcache_ops.sparse_attn_v.default,
                          (scores, indices, v.to(device), lse, False, False, v_sum, seq_lens))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4, 8]),
       S=st.integers(1, 300), N=st.integers(1, 80), dtype=st.sampled_from(DTYPES),
       pad_fraction=st.sampled_from([0.0, 0.5, 1.0]), data=st.data())
def test_mean_tail_random_shapes(B, Hkv, G, S, N, dtype, pad_fraction, data):
    lens = data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    for device in DEVICES:
        scores, indices, lse, v, v_sum, seq_lens = make_tail_case(B, Hkv, G, N, S, lens, dtype,
                                                                  device, pad_fraction)
        v = host_tensor(v, device)
        out = kcache_ops.sparse_attn_v(scores, indices, v, lse, False, v_sum=v_sum,
                                       seq_lens=seq_lens)
        check_tail(scores, indices, v, lse, v_sum, seq_lens, out)


@pytest.mark.parametrize("v_memory", ["host", "device"])
@pytest.mark.parametrize("spread", [None, "1", "0"], ids=["default", "spread", "unspread"])
def test_plans_with_and_without_the_host_read_spread(device, spread, v_memory, monkeypatch):
    """At batch 1 the CUDA op splits each slice's rows over several blocks when V is in host
    memory and KCACHE_OPS_HOST_READ_SPREAD=1 (sparse_attn_v_launch.h), and keeps one block a
    slice by default, with 0, or with V in device memory: each plan the reference's, per head
    (the row union), with group rows and with the mean tail."""
    set_host_read_spread(monkeypatch, spread)
    B, Hkv, G, N, S = 1, 2, 4, 64, 400
    scores, indices, lse, v, v_sum, lens = make_tail_case(B, Hkv, G, N, S, [S], torch.bfloat16,
                                                          device, D=128)
    v_read = host_tensor(v, device) if v_memory == "host" else v.to(device)
    group = indices[:, ::G].repeat_interleave(G, dim=1)  # [B, Hq, N] one row per group
    for ix in (indices, group):
        for renormalize in (True, False):
            out = kcache_ops.sparse_attn_v(scores, ix, v_read, lse, renormalize)
            check_attn(scores, ix, v, lse, renormalize, out)
        out = kcache_ops.sparse_attn_v(scores, ix, v_read, lse, False, v_sum=v_sum,
                                       seq_lens=lens)
        check_tail(scores, ix, v, lse, v_sum, lens, out)
