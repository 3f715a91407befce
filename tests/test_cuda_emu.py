"""The CUDA kernels of csrc/cuda/*_kernel.cuh, compiled unmodified with the system g++ and run on
the CPU by the fiber emulator of tests/cuda_emu (README.md there), against the float32 reference.

Every case runs under three schedule seeds (uniform random, random with switches at shared-memory
accesses, run-ahead) whose outputs must agree bit for bit, with a shared-memory race check; a subset
runs again under AddressSanitizer + UBSan. The emulator's own checks (a shuffle by part of a warp, a
barrier after an exit, divergent barriers, races, stale shared memory, an output written twice)
and its power to find a missing barrier are tested here too; tests/cuda_emu/mutants.py measures
that power per barrier."""
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DTYPES, TOL, run_pytest, seq_lens_tensor
from cuda_emu import emu
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gather_rows import make_indices
from test_lowbit_tail import check_tail as check_lowbit_tail
from test_lowbit_tail import hot_rows_case, keys_apart
from test_lowbit_tail import check_nan_row_left_out
from test_lowbit_tail import TF32_SUBNORMAL_FLOOR, check_float_limit_weights
from test_lowbit_tail import float_limit_weights_case
from test_lowbit_tail import make_case as make_lowbit_case
from test_lowbit_tail import reference_scores as lowbit_reference_scores
from test_lowbit_tail import selection as lowbit_selection
from test_lowbit_tail import skipped_case as skipped_lowbit_case
from test_lowbit_tail import v_near_the_float_range
from test_qk_topn import SCORE_TOL, check_top_p, check_topn, make_qk
from test_quantize_rows import extreme_rows, make_rows, signed_zero_rows
from test_reuse_rows import selection as reuse_selection
from test_sparse_attn_v import check_attn, make_selection, make_tail_case, overlapping_indices
from test_sparse_attn_v import check_tail as check_mean_tail

import kcache_ops
from kcache_ops import reference as R

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or not sys.platform.startswith("linux"),
                                reason="needs Linux (ELF link script) and the system g++")

SEEDS = (1, 2, 3)  # one seed of each schedule kind (runtime.cpp set_schedule)
SMS = 132  # the multiprocessor count the launch arithmetic is given (H100 SXM)


@pytest.fixture(scope="session")
def race_exe():
    """The harness with the shared-memory race check (compiled once per source digest)."""
    return emu.build("race")


@pytest.fixture(scope="session")
def asan_exe():
    """The harness under AddressSanitizer + UBSan."""
    return emu.build("asan")


def run_qk_topn(exe, q, k, seq_lens, n, scale, group_select, sms=SMS, seeds=SEEDS,
                return_scores=False, skip_first=0, skip_last=0, top_p=1.0, slices=None,
                staged=None):
    """qk_topn on the emulator: q [B, Hq, D], k [B, Hkv, S, D], seq_lens [B] int32 (any strides)
    -> scores [B, Hq, n] float32, indices [B, Hq, n] int32, lse [B, Hq] float32, and with
    return_scores the score scratch as the launcher returns it, [B, Hq, S] float32. sms: the
    multiprocessor count the chunk sizing is given; slices, staged: the select blocks per ranked
    row and whether their keys fit in shared memory, as the case is written for, checked against
    the plan's."""
    out = emu.run(exe, "qk_topn", dict(n=n, scale=scale, group_select=int(group_select), sms=sms,
                                       skip_first=skip_first, skip_last=skip_last, top_p=top_p),
                  dict(q=q, k_cache=k, seq_lens=seq_lens), seeds=seeds)
    if slices is not None:
        assert out["select_slices"].item() == slices, "the plan splits rows otherwise"
    if staged is not None:
        assert out["select_staged"].item() == staged, "the plan stages slices otherwise"
    picked = out["scores"], out["indices"], out["lse"]  # [B, Hq, n], [B, Hq, n], [B, Hq]
    if not return_scores:
        return picked
    B, Hq, S = q.shape[0], q.shape[1], k.shape[2]
    return (*picked, out["scratch"].view(B, Hq, -1)[..., :S])


def run_sparse_attn_v(exe, scores, indices, v, lse, renormalize, seeds=SEEDS, v_sum=None,
                      seq_lens=None, sms=SMS, parts=None):
    """sparse_attn_v on the emulator: scores [B, Hq, N] float32, indices [B, Hq, N] int32,
    v [B, Hkv, S, D], lse [B, Hq] float32 or None, the mean tail's v_sum [B, Hkv, D] float32 and
    seq_lens [B] int32 or None -> out [B, Hq, D] in v's dtype. sms: the multiprocessor count the
    plan is given; parts: the parts of a slice's row list it must choose (checked when given)."""
    tensors = dict(scores=scores, indices=indices, v_cache=v)
    if lse is not None:
        tensors["lse"] = lse
    if v_sum is not None:
        tensors.update(v_sum=v_sum, seq_lens=seq_lens)
    out = emu.run(exe, "sparse_attn_v", dict(renormalize=int(renormalize), sms=sms), tensors,
                  seeds=seeds)
    if parts is not None:
        assert int(out["parts"]) == parts
    return out["out"]  # [B, Hq, D]


def run_gather_rows(exe, src, indices, seeds=SEEDS, sms=SMS, per_thread=None):
    """gather_rows on the emulator: src [B, Hs, S, D], indices [B, H, N] int32 -> [B, H, N, D].
    sms: the multiprocessor count the plan is given; per_thread: the pieces per thread the plan
    must choose for it (checked when given)."""
    out = emu.run(exe, "gather_rows", dict(sms=sms), dict(src=src, indices=indices), seeds=seeds)
    if per_thread is not None:
        assert int(out["per_thread"]) == per_thread
    return out["dst"]


# ---- qk_topn ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,D,G,group_select", [
    (torch.float32, 64, 1, False),
    (torch.float16, 128, 3, True),
    (torch.bfloat16, 64, 4, False),
    (torch.float32, 128, 8, True),
    (torch.bfloat16, 128, 3, False),
    (torch.float16, 64, 8, False),
    (torch.bfloat16, 64, 4, True),
    (torch.float32, 64, 12, True),
    (torch.float16, 128, 12, False),
    (torch.bfloat16, 128, 16, True),
    (torch.bfloat16, 128, 7, True),
    (torch.float16, 64, 7, False),
    (torch.bfloat16, 64, 8, True),
], ids=lambda v: str(v).removeprefix("torch."))
def test_qk_topn_matches_reference(race_exe, dtype, D, G, group_select):
    """Several score chunks (S > 512), L = S, L < S and L = 1 in one batch; G = 12 takes two
    score blocks per KV head (a slice of 8 query heads and one of 4), G = 16 two of 8, whose
    group mass adds the lse of heads that two blocks scored; G = 7 (Qwen2.5-7B's 28 / 4 heads)
    a slice of 8 with one head empty."""
    Hkv, S, n = 1 if G >= 8 else 2, 1100, 64
    q, k = make_qk(3, Hkv * G, Hkv, S, D, dtype, "cpu")
    lens = seq_lens_tensor([S, 97, 1], "cpu")
    out = run_qk_topn(race_exe, q, k, lens, n, 1 / math.sqrt(D), group_select)
    check_topn(q, k, lens, n, 1 / math.sqrt(D), group_select, out)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("n", [1, 97])
def test_qk_topn_lengths_and_padding(race_exe, n, group_select):
    """L = 0, 1, n - 1, n, n + 1 and S in one batch; N = 1 and N >= L."""
    S = 600
    lens = seq_lens_tensor([0, 1, max(n - 1, 0), n, n + 1, S], "cpu")
    q, k = make_qk(6, 4, 2, S, 64, torch.float32, "cpu")
    out = run_qk_topn(race_exe, q, k, lens, n, 0.3, group_select)
    check_topn(q, k, lens, n, 0.3, group_select, out)
    assert out[2][0].isneginf().all(), "L = 0 gives lse = -inf"


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_out_of_range_lengths_are_clamped(race_exe, group_select):
    """seq_lens beyond S or negative (which the launcher rejects outside graph capture) are
    clamped to [0, S] by the kernels, never read out of bounds."""
    S, n = 300, 16
    q, k = make_qk(3, 6, 2, S, 64, torch.float32, "cpu")
    out = run_qk_topn(race_exe, q, k, seq_lens_tensor([S + 50, -7, 40], "cpu"), n, 0.2,
                      group_select)
    clamped = seq_lens_tensor([S, 0, 40], "cpu")
    check_topn(q, k, clamped, n, 0.2, group_select, out)


def test_qk_topn_empty_cache(race_exe):
    """S = 0: no score blocks at all; everything is padding and lse = -inf."""
    q, k = make_qk(2, 4, 2, 0, 64, torch.float32, "cpu")
    scores, idx, lse = run_qk_topn(race_exe, q, k, seq_lens_tensor([0, 0], "cpu"), 5, 0.1, False)
    assert (idx == -1).all() and scores.isneginf().all() and lse.isneginf().all()


@pytest.mark.parametrize("skip_first, skip_last", [(0, 0), (5, 61)])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_ties_exact(race_exe, group_select, skip_first, skip_last):
    """Integer-valued q and k with scale 1 tie exactly: indices and scores equal the reference's
    (ties to the lower index), with and without skipped keys. In group mode the heads of a group
    share q."""
    B, Hkv, G, S, D, n = 2, 1, 4, 1300, 64, 40
    q = torch.randint(-2, 3, (B, Hkv, 1 if group_select else G, D)).float()
    q = q.expand(B, Hkv, G, D).reshape(B, Hkv * G, D)
    k = torch.randint(-2, 3, (B, Hkv, S, D)).float()
    lens = seq_lens_tensor([S, 777], "cpu")
    scores, idx, lse = run_qk_topn(race_exe, q, k, lens, n, 1.0, group_select,
                                   skip_first=skip_first, skip_last=skip_last)
    ref_scores, ref_idx, ref_lse = R.qk_topn(q, k, lens, n, 1.0, group_select, skip_first,
                                             skip_last)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores, ref_scores)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("where", ["q", "k"])
def test_qk_topn_nan_as_reference(race_exe, where, group_select, top_p):
    """NaN in, NaN out, as the reference (test_qk_topn.test_nan_as_reference), with the NaN key in
    the second of three score chunks so that it crosses the merge of the chunks' partials; with
    top_p < 1 too, where a NaN term of the mass counts 0."""
    B, Hkv, G, S, D, n = 2, 2, 4, 1100, 64, 40
    q = torch.randint(-2, 3, (B, Hkv, 1, D)).float().expand(B, Hkv, G, D).reshape(B, Hkv * G, D)
    q = q.clone()  # [B, Hq, D]
    k = torch.randint(-2, 3, (B, Hkv, S, D)).float()  # [B, Hkv, S, D]
    lens = seq_lens_tensor([S, 901], "cpu")
    if where == "q":
        q[0, 1, 5] = float("nan")  # query head 1 of sequence 0
    else:
        k[1, 1, 700, 3] = float("nan")  # a valid key of KV head 1 of sequence 1
    k[1, 0, 950, 0] = float("nan")  # past L_1 = 901: never read
    scores, idx, lse = run_qk_topn(race_exe, q, k, lens, n, 1.0, group_select, top_p=top_p)
    ref_scores, ref_idx, ref_lse = R.qk_topn(q, k, lens, n, 1.0, group_select, top_p=top_p)
    assert lse.isnan().sum() == (1 if where == "q" else G)
    torch.testing.assert_close(lse, ref_lse, equal_nan=True)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_overflowing_scores_as_reference(race_exe, group_select):
    """Finite q and K whose dots overflow float32 (test_qk_topn.test_overflowing_scores_as_
    reference): lse -inf where every score is -inf, +inf where several are +inf, in one lane's
    run, across lanes and across the three chunks' partials; never NaN."""
    B, Hkv, G, S, D, n = 2, 2, 2, 1100, 64, 8
    q, k = torch.randn(B, Hkv * G, D), torch.randn(B, Hkv, S, D)
    q[0, :G], k[0, 0] = 1e20, -1e20  # KV head 0 of sequence 0: every score -inf
    q[1, G:] = 1e20  # KV head 1 of sequence 1: +inf at 5 keys
    k[1, 1, [3, 4, 11, 650, 1000]] = 1e20
    lens = seq_lens_tensor([S, S], "cpu")
    scores, idx, lse = run_qk_topn(race_exe, q, k, lens, n, 1.0, group_select)
    ref_scores, ref_idx, ref_lse = R.qk_topn(q, k, lens, n, 1.0, group_select)
    assert (lse[0, :G] == float("-inf")).all() and (lse[1, G:] == float("inf")).all()
    assert not lse.isnan().any()
    torch.testing.assert_close(lse, ref_lse)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=0)  # dots of about 1e40


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("n, S, slices, staged", [(4096, 5000, 1, False), (2048, 8200, 2, True)],
                         ids=["4096", "2048_split"])
def test_qk_topn_n_up_to_the_cuda_limit(race_exe, group_select, n, S, slices, staged):
    """N = 4096 (kMaxTopN) on a whole row and 2048 on rows split over two staged slices: bitonic
    sorts of 4096 and 2048 keys (several pairs a thread) and the merge of two 2048-entry lists
    at capacity. Integer keys tie exactly (in group mode the heads share q): the reference's
    indices and scores (test_cuda_ops.py's exact ties at N = 4096, on a GPU)."""
    Hkv, G, D = 2, 2, 64
    q = torch.randint(-2, 3, (1, Hkv, 1 if group_select else G, D)).float()
    q = q.expand(1, Hkv, G, D).reshape(1, Hkv * G, D)  # [B, Hq, D]
    k = torch.randint(-2, 3, (1, Hkv, S, D)).float()  # [B, Hkv, S, D]
    lens = seq_lens_tensor([S], "cpu")
    scores, idx, _ = run_qk_topn(race_exe, q, k, lens, n, 1.0, group_select, slices=slices,
                                 staged=staged)
    ref_scores, ref_idx, _ = R.qk_topn(q, k, lens, n, 1.0, group_select)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores, ref_scores)


@pytest.mark.parametrize("dims, want", [((0, 1), "inf"), ((1, 0), "-inf"), ((0, 8), "nan")],
                         ids=["one_piece", "one_piece_negative_first", "two_pieces"])
def test_qk_topn_opposite_products_past_the_float_range(race_exe, dims, want):
    """bfloat16 q and K whose products are 1e40 at dims[0] and -1e40 at dims[1] (test_qk_topn.py's
    bfloat16 overflow case): the reference and the CPU round each product and add them, NaN.
    Within a lane's 16-byte piece (8 values) the kernel's fmaf chain rounds the first product
    and adds the next exactly: inf, or -inf where the negative one comes first; pieces' sums,
    rounded, add as the reference's do: NaN. The other key scores as the reference's."""
    q, k = torch.zeros(1, 1, 64), torch.zeros(1, 1, 2, 64)  # [B, Hq, D], [B, Hkv, S, D]
    q[0, 0, list(dims)] = 1e20
    k[0, 0, 0, dims[0]], k[0, 0, 0, dims[1]] = 1e20, -1e20
    k[0, 0, 1, 0] = 1.0
    q, k = q.bfloat16(), k.bfloat16()
    lens = seq_lens_tensor([2], "cpu")
    scores, idx, lse = run_qk_topn(race_exe, q, k, lens, 2, 0.125, False)
    ref_scores, ref_idx, _ = R.qk_topn(q, k, lens, 2, 0.125)
    assert ref_scores[0, 0, 0].isnan()
    got = scores[idx == 0]  # [1] key 0's score, wherever it ranks
    torch.testing.assert_close(got, torch.tensor([float(want)]), equal_nan=True)
    s1 = ref_scores[ref_idx == 1]  # [1] the other key's score
    assert torch.equal(scores[idx == 1], s1)
    want_lse = s1 if want == "-inf" else torch.tensor([float(want)])  # [1]
    torch.testing.assert_close(lse.flatten(), want_lse, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_n_1024(race_exe, group_select):
    """N = 1024 < L: the radix select and a 1024-entry bitonic sort."""
    q, k = make_qk(1, 4, 2, 1500, 64, torch.bfloat16, "cpu")
    lens = seq_lens_tensor([1500], "cpu")
    out = run_qk_topn(race_exe, q, k, lens, 1024, 1 / 8, group_select)
    check_topn(q, k, lens, 1024, 1 / 8, group_select, out)


@pytest.mark.parametrize("sms", [1, 16])
def test_qk_topn_chunking(race_exe, sms):
    """One long chunk per block (few multiprocessors) and many short ones."""
    q, k = make_qk(1, 3, 1, 2100, 128, torch.float16, "cpu")
    lens = seq_lens_tensor([2051], "cpu")
    out = run_qk_topn(race_exe, q, k, lens, 30, 1 / math.sqrt(128), False, sms=sms)
    check_topn(q, k, lens, 30, 1 / math.sqrt(128), False, out)


def test_qk_topn_group_mass_slices(race_exe):
    """Group mode with rows split in slices of 2252 keys (4 rows on 4 multiprocessors, 4 blocks
    per multiprocessor wanted: 2 slices per row, S / 2048 at most), each block writing its slice's
    group mass before ranking it: one row ends inside its second slice, the other inside its first,
    so that row's second slice is empty (n padding picks)."""
    q, k = make_qk(2, 8, 2, 4500, 64, torch.bfloat16, "cpu")
    lens = seq_lens_tensor([4500, 2051], "cpu")
    out = run_qk_topn(race_exe, q, k, lens, 40, 1 / 8, True, sms=4)
    check_topn(q, k, lens, 40, 1 / 8, True, out)


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_split_select(race_exe, group_select, ties):
    """Few rows on 8 multiprocessors: each row's select split over 8 slices of 2052 keys
    (qk_select_kernel), their sorted picks merged by the row's last block to finish, one row
    shorter than S, so that its last three slices are empty;
    small-integer inputs give many equal scores (the index-order path within a slice, and equal
    keys across slices ordered by the merge)."""
    B, Hkv, G, S, D, n = 2, 1, 2, 16400, 64, 60
    if ties:
        q = torch.randint(-2, 3, (B, Hkv * G, D)).float()  # [B, Hq, D]
        k = torch.randint(-2, 3, (B, Hkv, S, D)).float()  # [B, Hkv, S, D]
    else:
        q, k = make_qk(B, Hkv * G, Hkv, S, D, torch.float32, "cpu")
    lens = seq_lens_tensor([S, 10001], "cpu")
    out = run_qk_topn(race_exe, q, k, lens, n, 1 / 8, group_select, sms=8)
    check_topn(q, k, lens, n, 1 / 8, group_select, out)


@pytest.mark.parametrize("S, slices", [(6200, 3), (10300, 5)])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_split_select_odd_slices(race_exe, group_select, S, slices):
    """3 and 5 slices of a row (at least 2048 keys each: qk_select_slices), so that a list of
    picks waits a level of the merge tree for a partner; n = 60 pads each slice's list to 64;
    the second sequence ends in an inner slice."""
    q, k = make_qk(2, 4, 2, S, 64, torch.float32, "cpu")
    lens = seq_lens_tensor([S, S - 2500], "cpu")
    out = run_qk_topn(race_exe, q, k, lens, 60, 1 / 8, group_select, sms=132, slices=slices)
    check_topn(q, k, lens, 60, 1 / 8, group_select, out)


@pytest.mark.parametrize("dtype, D, G", [(torch.bfloat16, 128, 4), (torch.float16, 64, 8)],
                         ids=["bfloat16-128-4", "float16-64-8"])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_split_select_after_each_score_kernel(race_exe, dtype, D, G, group_select):
    """Rows split in slices after the score kernels of Llama-3-8B's shape (bfloat16, D = 128, 4
    heads a KV head) and of float16 D = 64 with 8, which clear the select's slice counters (the
    split tests above use float32 D = 64 alone), with lengths past S and below 0, which the
    kernels clamp, among the split rows."""
    S = 6200
    q, k = make_qk(3, G, 1, S, D, dtype, "cpu")
    out = run_qk_topn(race_exe, q, k, seq_lens_tensor([S + 50, -7, S - 2500], "cpu"), 60,
                      1 / math.sqrt(D), group_select, sms=132, slices=3)
    check_topn(q, k, seq_lens_tensor([S, 0, S - 2500], "cpu"), 60, 1 / math.sqrt(D),
               group_select, out)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_split_select_small_n(race_exe, group_select, n):
    """n = 1, 2, 5 (lists of 1, 2 and 8 slots, the tree's shortest merges) over 7 slices, with
    ties (K rounded), the row ending 3000 keys before S."""
    S = 14400
    q, k = make_qk(1, 2, 1, S, 64, torch.float32, "cpu")
    k = torch.round(k * 2)  # [B, Hkv, S, D], many equal scores
    lens = seq_lens_tensor([S - 3000], "cpu")
    out = run_qk_topn(race_exe, q, k, lens, n, 1 / 8, group_select, sms=132, slices=7)
    check_topn(q, k, lens, n, 1 / 8, group_select, out)


@pytest.mark.parametrize("S, slices", [(12300, 6), (14400, 7)])
def test_qk_topn_split_select_skips_many_slices(race_exe, S, slices):
    """skip_first = 7 and skip_last = 2100 over 6 and 7 slices (group mode, n = 100): the last
    slices of the second sequence rank nothing."""
    q, k = make_qk(2, 2, 1, S, 64, torch.float32, "cpu")
    lens = seq_lens_tensor([S, 4500], "cpu")
    out = run_qk_topn(race_exe, q, k, lens, 100, 1 / 8, True, sms=132, skip_first=7,
                      skip_last=2100, slices=slices)
    check_topn(q, k, lens, 100, 1 / 8, True, out, 7, 2100)


@pytest.mark.parametrize("group_select, sms, split", [
    (True, 1, False), (True, 2, True), (False, 2, False), (False, 4, True)],
    ids=["group-whole_row", "group-split", "per_head-whole_row", "per_head-split"])
def test_qk_topn_unstaged_slices(race_exe, group_select, sms, split):
    """Slices too long for a select block's shared memory (more than 2048 groups of 4 keys at
    n = 40: select_staged), ranked where they are in device memory (the score rows, the group mass
    rows): 4 or 8 ranked rows of 17000 keys in 4 blocks per multiprocessor give whole rows, or 2
    slices of 8500 keys; the second sequence ends inside the first slice."""
    q, k = make_qk(2, 4, 2, 17000, 64, torch.float32, "cpu")
    lens = seq_lens_tensor([17000, 8001], "cpu")
    rows = 2 * (2 if group_select else 4)
    assert (4 * sms // rows == 2) == split  # qk_select_slices: one wave of 4 blocks per SM
    out = run_qk_topn(race_exe, q, k, lens, 40, 1 / 8, group_select, sms=sms, staged=False)
    check_topn(q, k, lens, 40, 1 / 8, group_select, out)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_staged_slices_at_capacity(race_exe, group_select):
    """Slices of 8192 keys at n = 64 fill a select block's staged keys exactly (2048 groups of 4
    after the 64 picks' 32: select_staged): 2 slices a row (8 ranked rows on 4 multiprocessors per
    head, 4 on 2 in group mode), skip_first = 5 and skip_last = 3 inside 16-byte groups, and a
    second sequence ending inside the first slice."""
    q, k = make_qk(2, 4, 2, 16384, 64, torch.float32, "cpu")
    lens = seq_lens_tensor([16384, 6001], "cpu")
    out = run_qk_topn(race_exe, q, k, lens, 64, 1 / 8, group_select, sms=2 if group_select else 4,
                      skip_first=5, skip_last=3, slices=2, staged=True)
    check_topn(q, k, lens, 64, 1 / 8, group_select, out, 5, 3)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_split_select_short_slices(race_exe, group_select):
    """n larger than a slice's valid keys: the rows' second slices (2400 - 2252 and 2300 - 2252
    keys) are taken whole, without a radix pass, and merged with the first slices' 600 picks."""
    q, k = make_qk(2, 2, 1, 4500, 64, torch.float32, "cpu")
    lens = seq_lens_tensor([2400, 2300], "cpu")
    out = run_qk_topn(race_exe, q, k, lens, 600, 1 / 8, group_select, sms=4)
    check_topn(q, k, lens, 600, 1 / 8, group_select, out)


@pytest.mark.parametrize("S, sms", [(4500, 8), (4000, 132)], ids=["split", "whole_row"])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_skipped_keys(race_exe, group_select, S, sms):
    """skip_first = 5 (inside a 16-byte group) and skip_last = 60: only the keys between are
    ranked, in rows split in two slices of 2252 keys (the second starting below L_b - 60 for the
    first row only) and in whole rows (S < 2 · 2048: one slice); rows with 2 ranked keys and with
    none."""
    q, k = make_qk(4, 4, 2, S, 64, torch.float32, "cpu")
    lens = seq_lens_tensor([S, 2100, 67, 40], "cpu")
    out = run_qk_topn(race_exe, q, k, lens, 40, 1 / 8, group_select, sms=sms, skip_first=5,
                      skip_last=60)
    check_topn(q, k, lens, 40, 1 / 8, group_select, out, 5, 60)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_qk_topn_strided_inputs(race_exe, group_select):
    """k_cache sliced on S and heads, q a transposed view, seq_lens every other element."""
    B, Hkv, G, S, D, n = 2, 2, 3, 97, 128, 16
    k = torch.randn(B, 2 * Hkv, S + 11, D).to(torch.bfloat16)[:, ::2, 5:S + 5]
    q = torch.randn(Hkv * G, B, D).to(torch.bfloat16).transpose(0, 1)
    lens = seq_lens_tensor([S, 0, 50, 0], "cpu")[::2]
    assert not k.is_contiguous() and not q.is_contiguous() and not lens.is_contiguous()
    out = run_qk_topn(race_exe, q, k, lens, n, 1 / math.sqrt(D), group_select)
    check_topn(q, k, lens, n, 1 / math.sqrt(D), group_select, out)


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 5, 8]),
       S=st.integers(1, 700), n=st.integers(1, 80), D=st.sampled_from([64, 128]),
       dtype=st.sampled_from(DTYPES), group_select=st.booleans(), sms=st.sampled_from([1, 132]),
       skip_first=st.integers(0, 70), skip_last=st.integers(0, 70), data=st.data())
def test_qk_topn_random_shapes(race_exe, B, Hkv, G, S, n, D, dtype, group_select, sms,
                               skip_first, skip_last, data):
    lens = seq_lens_tensor(data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B)), "cpu")
    q, k = make_qk(B, Hkv * G, Hkv, S, D, dtype, "cpu")
    out = run_qk_topn(race_exe, q, k, lens, n, 1 / math.sqrt(D), group_select, sms=sms,
                      skip_first=skip_first, skip_last=skip_last)
    check_topn(q, k, lens, n, 1 / math.sqrt(D), group_select, out, skip_first, skip_last)


# ---- sparse_attn_v ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,D,G,renormalize", [
    (torch.float32, 64, 1, True),
    (torch.float16, 128, 3, False),
    (torch.bfloat16, 64, 4, True),
    (torch.float32, 128, 8, False),
    (torch.bfloat16, 128, 8, True),
    (torch.float16, 64, 3, True),
    (torch.bfloat16, 64, 12, False),
    (torch.bfloat16, 128, 7, True),
], ids=lambda v: str(v).removeprefix("torch."))
def test_sparse_attn_v_matches_reference(race_exe, dtype, D, G, renormalize):
    """G = 12: two blocks per KV head (a slice of 8 query heads and one of 4); G = 7 (Qwen2.5-7B's
    28 / 4 heads) a slice of 8 with one head empty."""
    B, Hkv, S, N = 2, 2, 300, 64
    scores, indices, lse = make_selection(B, Hkv * G, N, S, "cpu")
    v = torch.randn(B, Hkv, S, D).to(dtype)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, renormalize)
    check_attn(scores, indices, v, lse, renormalize, out)


def test_sparse_attn_v_lse_ignored_when_renormalizing(race_exe):
    scores, indices, lse = make_selection(2, 4, 8, 50, "cpu")
    v = torch.randn(2, 2, 50, 64)
    with_lse = run_sparse_attn_v(race_exe, scores, indices, v, lse, True)
    assert torch.equal(with_lse, run_sparse_attn_v(race_exe, scores, indices, v, None, True))
    check_attn(scores, indices, v, None, True, with_lse)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full_softmax"])
def test_sparse_attn_v_no_valid_entry_gives_zeros(race_exe, renormalize):
    scores, indices, lse = make_selection(2, 4, 8, 50, "cpu", pad_fraction=0.0)
    indices[0, 1], scores[0, 1], lse[0, 1] = -1, float("-inf"), float("-inf")
    v = torch.randn(2, 2, 50, 64)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, renormalize)
    assert torch.equal(out[0, 1], torch.zeros(64))
    check_attn(scores, indices, v, lse, renormalize, out)


@pytest.mark.parametrize("G", [1, 3], ids=["own_rows", "row_union"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "group_rows"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full_softmax"])
def test_sparse_attn_v_nan_and_inf_weights_count_zero(race_exe, renormalize, shared, G):
    """A NaN weight counts 0, as the reference's (test_sparse_attn_v.test_nan_and_inf_weights_
    count_zero): a valid NaN score, a NaN lse, a +inf score with a +inf lse; in each of the row
    lists (a head's own rows, the union of a slice's rows, a group's shared rows)."""
    scores, indices, lse = make_selection(2, 2 * G, 8, 50, "cpu", pad_fraction=0.0)
    if shared:
        indices = indices[:, ::G].repeat_interleave(G, dim=1).contiguous()
    scores[0, 0, 3] = float("nan")
    lse[0, G] = float("nan")
    scores[1, G, 5], lse[1, G] = float("inf"), float("inf")
    v = torch.randn(2, 2, 50, 64)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, renormalize)
    check_attn(scores, indices, v, lse, renormalize, out)


def test_sparse_attn_v_mean_tail_nan_weight_counts_zero(race_exe):
    """The mean tail's mass leaves a NaN weight out, as the reference does."""
    scores, indices, lse, v, v_sum, lens = make_tail_case(2, 2, 2, 8, 50, [50, 40], torch.float32,
                                                          "cpu", pad_fraction=0.0)
    scores[1, 3, 2] = float("nan")
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, False, v_sum=v_sum, seq_lens=lens)
    check_mean_tail(scores, indices, v, lse, v_sum, lens, out)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full_softmax"])
def test_sparse_attn_v_empty_selection(race_exe, renormalize):
    """N = 0: every head yields zeros."""
    scores, indices, lse = make_selection(2, 6, 0, 40, "cpu")  # [2, 6, 0], [2, 6, 0], [2, 6]
    v = torch.randn(2, 2, 40, 64)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, renormalize)
    assert torch.equal(out, torch.zeros(2, 6, 64))


@pytest.mark.parametrize("group_shared", [False, True], ids=["own_rows", "group_rows"])
def test_sparse_attn_v_out_of_range_indices_are_skipped(race_exe, group_shared):
    """Indices >= S or < -1 (which the launcher rejects outside graph capture) are skipped like
    padding, never read; with one index row per group the rows are read once for the group."""
    B, Hkv, G, S, N = 2, 2, 4, 60, 24
    scores, indices, lse = make_selection(B, Hkv * G, N, S, "cpu")
    rows = indices.view(B, Hkv, G, N)
    if group_shared:
        rows = rows[:, :, :1]
    rows = rows.masked_fill(torch.rand(rows.shape) < 0.2, S + 3)
    rows[0, 0, 0, 0], rows[1, -1, -1, -1] = -5, 1 << 30
    indices = rows.expand(B, Hkv, G, N).reshape(B, Hkv * G, N)
    v = torch.randn(B, Hkv, S, 128).to(torch.float16)
    for renormalize in (True, False):
        out = run_sparse_attn_v(race_exe, scores, indices, v, lse, renormalize)
        cleaned = indices.masked_fill((indices < 0) | (indices >= S), -1)
        check_attn(scores, cleaned, v, lse, renormalize, out)


def test_sparse_attn_v_strided_inputs(race_exe):
    """v_cache sliced on S and heads, scores / indices / lse transposed views."""
    B, Hkv, G, S, D, N = 2, 2, 4, 97, 64, 16
    scores, indices, lse = make_selection(Hkv * G, B, N, S, "cpu")
    scores, indices, lse = scores.transpose(0, 1), indices.transpose(0, 1), lse.t()
    v = torch.randn(B, 2 * Hkv, S + 9, D).to(torch.bfloat16)[:, 1::2, 3:S + 3]
    for renormalize in (True, False):
        out = run_sparse_attn_v(race_exe, scores, indices, v, lse, renormalize)
        check_attn(scores, indices, v, lse, renormalize, out)


def test_sparse_attn_v_n_1024(race_exe):
    scores, indices, lse = make_selection(1, 3, 1024, 1500, "cpu")
    v = torch.randn(1, 1, 1500, 128)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, True)
    check_attn(scores, indices, v, lse, True, out)


# kind -> the parts of each row list for sms = 1, 3, 4, 7, 132 (B · Hkv = 2 blocks)
PARTS_SMS = [1, 3, 4, 7, 132]
PARTS = {"group": [1, 1, 2, 4, 10], "union": [1, 1, 2, 4, 10], "each_head": [1, 1, 2, 4, 66]}


@pytest.mark.parametrize("kind", list(PARTS))
@pytest.mark.parametrize("sms", PARTS_SMS)
def test_sparse_attn_v_parts(race_exe, kind, sms):
    """A slice's row list split over blocks where the slices alone leave more than half of the
    multiprocessors without one (sparse_attn_v_launch.h): B · Hkv = 2 blocks, so none at 3 SMs,
    else ceil(sms / 2) parts, but none of fewer than 16 rows of the longest list (G · N): group
    rows (N = 40: 10 parts at most, of 4 rows), the row union of overlapping heads (up to 160
    rows), and each head's rows on their own (N = 513, above the union's cap: 2052 rows, parts of
    31 and of several tiles)."""
    B, Hkv, G, S, D = 1, 2, 4, 300, 64
    N = 40 if kind != "each_head" else UNION_CAP // G + 1
    scores, indices, lse = make_selection(B, Hkv * G, N, S, "cpu")
    if kind == "group":
        indices = indices[:, ::G].repeat_interleave(G, dim=1)
    elif kind == "union":
        indices = overlapping_indices(B, Hkv, G, N, S, "half", "cpu")
    v = torch.randn(B, Hkv, S, D).to(torch.bfloat16)
    parts = PARTS[kind][PARTS_SMS.index(sms)]
    for renormalize in (True, False):
        out = run_sparse_attn_v(race_exe, scores, indices, v, lse, renormalize, sms=sms,
                                parts=parts)
        check_attn(scores, indices, v, lse, renormalize, out)


def test_sparse_attn_v_parts_with_empty_parts_and_mean_tail(race_exe):
    """More parts than rows (sequence 0: its 4 heads choose the same 3 rows in different orders,
    a union of 3 rows over 10 parts, so parts 0, 1, 2, 4, 5, 7 and 8 hold none and write zero
    sums) and the mean tail, added once (by part 0, empty here)."""
    B, Hkv, G, N, S = 2, 1, 4, 40, 200
    scores, indices, lse, v, v_sum, lens = make_tail_case(B, Hkv, G, N, S, [S, 150],
                                                          torch.float16, "cpu", D=128)
    indices[0] = -1
    for h in range(G):
        indices[0, h, :3] = torch.tensor([5, 17, 99], dtype=torch.int32).roll(h)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, False, v_sum=v_sum,
                            seq_lens=lens, sms=132, parts=10)
    check_mean_tail(scores, indices, v, lse, v_sum, lens, out)


# The most entries (gs · N) of a per-head slice whose distinct rows are read once.
ATTN_KERNEL = (emu.KERNEL_DIR / "sparse_attn_v_kernel.cuh").read_text(encoding="utf-8")
UNION_CAP = int(re.search(r"kAttnUnionCap = (\d+);", ATTN_KERNEL).group(1))


@pytest.mark.parametrize("dtype,D,G,kind,renormalize", [
    (torch.bfloat16, 128, 3, "half", True),
    (torch.float32, 64, 3, "same", False),
    (torch.float32, 128, 8, "half", False),
    (torch.bfloat16, 64, 8, "same", True),
    (torch.float16, 128, 12, "half", True),
], ids=lambda v: str(v).removeprefix("torch."))
def test_sparse_attn_v_heads_sharing_rows(race_exe, dtype, D, G, kind, renormalize):
    """Per-head selections overlapping within a group: half of each head's rows common to its
    group, or all the same rows in another order per head (not group_select's shared row); each
    distinct row is read once for the heads that chose it. G = 12: slices of 8 and 4 heads."""
    B, Hkv, S, N = 2, 2, 300, 64
    scores, _, lse = make_selection(B, Hkv * G, N, S, "cpu")
    indices = overlapping_indices(B, Hkv, G, N, S, kind, "cpu")
    v = torch.randn(B, Hkv, S, D).to(dtype)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, renormalize)
    check_attn(scores, indices, v, lse, renormalize, out)


@pytest.mark.parametrize("G", [3, 8])
def test_sparse_attn_v_shared_rows_with_duplicates_and_padding(race_exe, G):
    """Overlapping heads whose rows also hold padding, indices >= S or < -1, rows repeated within
    a head (their weights add up) and, in sequence 1, a head with no valid entry (zeros)."""
    B, Hkv, S, N, D = 2, 2, 120, 24, 128
    scores, _, lse = make_selection(B, Hkv * G, N, S, "cpu")
    indices = overlapping_indices(B, Hkv, G, N, S, "half", "cpu")
    indices[torch.rand(indices.shape) < 0.15] = -1
    indices[torch.rand(indices.shape) < 0.1] = S + 3
    indices[0, 0, :3] = torch.tensor([-5, S, 1 << 30], dtype=torch.int32)
    indices[:, :, 5] = indices[:, :, 4]  # a repeated row in every head
    indices[0, 1, 8:12] = indices[0, 1, 7]
    indices[1, G + 1] = -1
    v = torch.randn(B, Hkv, S, D).to(torch.float16)
    cleaned = indices.masked_fill((indices < 0) | (indices >= S), -1)
    for renormalize in (True, False):
        out = run_sparse_attn_v(race_exe, scores, indices, v, lse, renormalize)
        check_attn(scores, cleaned, v, lse, renormalize, out)
        if renormalize:
            assert torch.equal(out[1, G + 1], torch.zeros(D, dtype=torch.float16))


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full_softmax"])
@pytest.mark.parametrize("G", [3, 8])
def test_sparse_attn_v_rows_of_other_heads_are_not_touched(race_exe, G, renormalize):
    """A NaN row chosen by head 0 alone and an inf row chosen by head 1 alone, among rows the
    heads of the group share: heads 0 and 1 get the reference's NaN and inf, every other head
    stays finite and equal to the reference (a row is never multiplied by the 0 weight of a head
    that did not choose it)."""
    B, Hkv, S, N, D = 1, 2, 200, 16, 64
    scores, _, lse = make_selection(B, Hkv * G, N, S, "cpu", pad_fraction=0.0)
    indices = overlapping_indices(B, Hkv, G, N, S - 2, "half", "cpu")  # rows < S - 2
    indices[0, 0, 0], indices[0, 1, 3] = S - 2, S - 1
    v = torch.randn(B, Hkv, S, D)
    v[0, 0, S - 2], v[0, 0, S - 1] = float("nan"), float("inf")
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, renormalize)
    ref = R.sparse_attn_v(scores, indices, v, lse, renormalize)  # [B, Hq, D]
    assert out[0, 0].isnan().all() and out[0, 1].isposinf().all()
    assert out[0, 2:].isfinite().all()
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=TOL[torch.float32],
                               equal_nan=True)


@pytest.mark.parametrize("G,N", [(8, UNION_CAP // 8), (8, UNION_CAP // 8 + 1),
                                 (3, UNION_CAP // 3), (3, UNION_CAP // 3 + 1)],
                         ids=["G8_at_cap", "G8_above", "G3_at_cap", "G3_above"])
def test_sparse_attn_v_row_union_cap(race_exe, G, N):
    """gs · N at the row union's cap (2048 entries for G = 8; 2046, sorted as 2048, for G = 3)
    and one entry per head above it (each head's rows read on their own)."""
    B, Hkv, S = 1, 1, 3000
    dtype, D = (torch.bfloat16, 128) if G == 8 else (torch.float32, 64)
    scores, _, lse = make_selection(B, Hkv * G, N, S, "cpu")
    indices = overlapping_indices(B, Hkv, G, N, S, "half", "cpu")
    indices[torch.rand(indices.shape) < 0.1] = -1
    v = torch.randn(B, Hkv, S, D).to(dtype)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, G == 8)
    check_attn(scores, indices, v, lse, G == 8, out)


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 5, 8]),
       S=st.integers(1, 300), N=st.integers(1, 200), D=st.sampled_from([64, 128]),
       dtype=st.sampled_from(DTYPES), renormalize=st.booleans(),
       pad_fraction=st.sampled_from([0.0, 0.5, 1.0]))
def test_sparse_attn_v_random_shapes(race_exe, B, Hkv, G, S, N, D, dtype, renormalize,
                                     pad_fraction):
    scores, indices, lse = make_selection(B, Hkv * G, N, S, "cpu", pad_fraction)
    v = torch.randn(B, Hkv, S, D).to(dtype)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, renormalize)
    check_attn(scores, indices, v, lse, renormalize, out)


def decode_step_inputs():
    """Fresh bfloat16 inputs of the emulated decode steps: q [2, 8, 64], k and v [2, 2, 700, 64],
    seq_lens [2] = (700, 97), and n = 32."""
    B, Hkv, G, S, D, n = 2, 2, 4, 700, 64, 32
    q, k = make_qk(B, Hkv * G, Hkv, S, D, torch.bfloat16, "cpu")
    v = torch.randn(B, Hkv, S, D).to(torch.bfloat16)
    return q, k, v, seq_lens_tensor([S, 97], "cpu"), n


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_decode_step(race_exe, group_select):
    """qk_topn then sparse_attn_v on the emulator equals the reference decode step."""
    q, k, v, lens, n = decode_step_inputs()
    scores, indices, lse = run_qk_topn(race_exe, q, k, lens, n, 1 / 8, group_select)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, True)
    ref = R.decode_attention(q, k, v, lens, n, 1 / 8, group_select)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[torch.bfloat16],
                               rtol=TOL[torch.bfloat16])


# ---- sparse_attn_v with the mean tail ------------------------------------------------------------

@pytest.mark.parametrize("dtype,D,G", [
    (torch.float32, 64, 1), (torch.float16, 128, 3), (torch.bfloat16, 64, 4),
    (torch.float32, 128, 8), (torch.bfloat16, 128, 12), (torch.float16, 64, 2),
], ids=lambda v: str(v).removeprefix("torch."))
def test_mean_tail_matches_reference(race_exe, dtype, D, G):
    """L_b > N, L_b <= N (no tail) and L_b = 0; G = 12: two blocks per KV head."""
    B, Hkv, S, N = 4, 2, 300, 40
    lens = [300, 150, 25, 0]
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(B, Hkv, G, N, S, lens, dtype, "cpu",
                                                              D=D)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, False, v_sum=v_sum,
                            seq_lens=seq_lens)
    check_mean_tail(scores, indices, v, lse, v_sum, seq_lens, out)
    assert torch.equal(out[3], torch.zeros(Hkv * G, D, dtype=dtype))


def test_mean_tail_group_rows(race_exe):
    """One index row per group (group_select): each row read once for all heads, each head with
    its own weights and tail factor."""
    B, Hkv, G, S, N = 2, 2, 4, 200, 24
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(B, Hkv, G, N, S, [200, 60],
                                                              torch.bfloat16, "cpu")
    indices = indices.view(B, Hkv, G, N)[:, :, :1].expand(B, Hkv, G, N).reshape(B, Hkv * G, N)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, False, v_sum=v_sum,
                            seq_lens=seq_lens)
    check_mean_tail(scores, indices, v, lse, v_sum, seq_lens, out)


@pytest.mark.parametrize("dtype,D,G,kind", [
    (torch.bfloat16, 128, 3, "half"), (torch.float32, 64, 8, "same"),
], ids=lambda v: str(v).removeprefix("torch."))
def test_mean_tail_heads_sharing_rows(race_exe, dtype, D, G, kind):
    """The mean tail with per-head rows overlapping within a group (each distinct row read once,
    weighted p_i - c_h for each head that chose it), with padding; L_b > N and L_b < S."""
    B, Hkv, S, N = 2, 2, 300, 40
    lens = [300, 150]
    scores, _, lse, v, v_sum, seq_lens = make_tail_case(B, Hkv, G, N, S, lens, dtype, "cpu", D=D)
    indices = overlapping_indices(B, Hkv, G, N, S, kind, "cpu", lens=lens)
    indices[torch.rand(indices.shape) < 0.2] = -1
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, False, v_sum=v_sum,
                            seq_lens=seq_lens)
    check_mean_tail(scores, indices, v, lse, v_sum, seq_lens, out)


def test_mean_tail_out_of_range_lengths_and_indices(race_exe):
    """seq_lens beyond S or negative are clamped to [0, S]; indices outside [0, S) are skipped
    (neither counted nor read), as the launcher lets them through with check_values=False."""
    B, Hkv, G, S, N = 3, 1, 3, 80, 16
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(B, Hkv, G, N, S, [80, 80, 0],
                                                              torch.float32, "cpu")
    indices[0, 0, :2] = torch.tensor([S, -9], dtype=torch.int32)
    bad_lens = seq_lens_tensor([S + 50, 1 << 30, -4], "cpu")
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, False, v_sum=v_sum,
                            seq_lens=bad_lens)
    cleaned = indices.masked_fill((indices < 0) | (indices >= S), -1)
    check_mean_tail(scores, cleaned, v, lse, v_sum, seq_lens, out)


def test_mean_tail_strided_and_empty(race_exe):
    """v_cache a [:, :, :T] slice, v_sum / seq_lens / scores strided; N = 0 gives the mean of all
    L_b rows."""
    B, Hkv, G, S, N = 3, 2, 3, 97, 16
    lens = [97, 40, 9]
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(B, Hkv, G, N, S, lens,
                                                              torch.float16, "cpu")
    buf = torch.randn(B, Hkv, S + 31, 64).to(torch.float16)
    buf[:, :, :S] = v
    v = buf[:, :, :S]
    v_sum_strided = torch.stack([v_sum, torch.randn_like(v_sum)], 1)[:, 0]
    lens_strided = seq_lens.repeat_interleave(2)[::2]
    out = run_sparse_attn_v(race_exe, scores.transpose(0, 1).contiguous().transpose(0, 1),
                            indices, v, lse, False, v_sum=v_sum_strided, seq_lens=lens_strided)
    check_mean_tail(scores, indices, v, lse, v_sum, seq_lens, out)
    empty_scores, empty_indices = scores[:, :, :0].contiguous(), indices[:, :, :0].contiguous()
    out = run_sparse_attn_v(race_exe, empty_scores, empty_indices, v, lse, False, v_sum=v_sum,
                            seq_lens=seq_lens)
    want = (v_sum / seq_lens[:, None, None]).repeat_interleave(G, 1)  # [B, Hq, D]
    torch.testing.assert_close(out.float(), want, atol=TOL[torch.float16],
                               rtol=TOL[torch.float16])


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 5, 8]),
       S=st.integers(1, 300), N=st.integers(1, 200), D=st.sampled_from([64, 128]),
       dtype=st.sampled_from(DTYPES), pad_fraction=st.sampled_from([0.0, 0.5, 1.0]),
       data=st.data())
def test_mean_tail_random_shapes(race_exe, B, Hkv, G, S, N, D, dtype, pad_fraction, data):
    lens = data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(B, Hkv, G, N, S, lens, dtype, "cpu",
                                                              pad_fraction, D=D)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, False, v_sum=v_sum,
                            seq_lens=seq_lens)
    check_mean_tail(scores, indices, v, lse, v_sum, seq_lens, out)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_mean_tail_decode_step(race_exe, group_select):
    """qk_topn then sparse_attn_v with the mean tail on the emulator, against the reference."""
    q, k, v, lens, n = decode_step_inputs()
    v_sum = torch.stack([v[b, :, :L].float().sum(1) for b, L in enumerate(lens.tolist())])
    scores, indices, lse = run_qk_topn(race_exe, q, k, lens, n, 1 / 8, group_select)
    out = run_sparse_attn_v(race_exe, scores, indices, v, lse, False, v_sum=v_sum, seq_lens=lens)
    check_mean_tail(scores, indices, v, lse, v_sum, lens, out)


# ---- gather_rows --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,D,G", [
    (torch.float32, 64, 1), (torch.float16, 128, 3), (torch.bfloat16, 64, 8),
    (torch.float32, 128, 4),
], ids=lambda v: str(v).removeprefix("torch."))
def test_gather_rows_matches_reference(race_exe, dtype, D, G):
    src = torch.randn(2, 2, 300, D).to(dtype)
    indices = make_indices(2, 2 * G, 97, 300, "cpu")
    assert torch.equal(run_gather_rows(race_exe, src, indices), R.gather_rows(src, indices))


@pytest.mark.parametrize("sms, per_thread", [(1, 8), (12, 6), (24, 3), (132, 1)])
def test_gather_rows_spread_over_multiprocessors(race_exe, sms, per_thread):
    """A read too small to give every multiprocessor a block of 8 pieces a thread takes fewer
    (gather_rows_launch.h): 2 · 6 · 97 rows of 256 bytes are 18 624 16-byte pieces, so
    18 624 // (256 · sms) a thread, at least 1 and at most 8; the last block is partial."""
    src = torch.randn(2, 3, 200, 128).to(torch.bfloat16)
    indices = make_indices(2, 6, 97, 200, "cpu")
    out = run_gather_rows(race_exe, src, indices, sms=sms, per_thread=per_thread)
    assert torch.equal(out, R.gather_rows(src, indices))


def test_gather_rows_strided_and_out_of_range(race_exe):
    """src sliced on heads and S, indices a transposed view; indices >= S or < -1 give zero rows."""
    src = torch.randn(2, 4, 120, 128).to(torch.bfloat16)[:, ::2, 7:104]
    indices = make_indices(6, 2, 33, 97, "cpu")
    indices[0, 0, :3] = torch.tensor([97, -2, 1 << 30], dtype=torch.int32)
    indices = indices.transpose(0, 1)
    cleaned = indices.masked_fill((indices < 0) | (indices >= 97), -1)
    assert torch.equal(run_gather_rows(race_exe, src, indices), R.gather_rows(src, cleaned))


# ---- quantize_rows ------------------------------------------------------------------------------

def run_quantize_rows(exe, v, bits, seeds=SEEDS):
    """quantize_rows on the emulator: v [..., D] (any strides, last dim contiguous)
    -> codes [..., D * bits / 8] uint8, meta [..., 2] bfloat16."""
    out = emu.run(exe, "quantize_rows", dict(bits=bits), dict(v=v), seeds=seeds)
    return out["codes"], out["meta"]


def check_quantize_emu(exe, v, bits, seeds=SEEDS):
    """The kernel's codes and meta equal the reference's bit for bit."""
    codes, meta = run_quantize_rows(exe, v, bits, seeds)
    ref_codes, ref_meta = R.quantize_rows(v, bits)
    assert torch.equal(meta, ref_meta)
    assert torch.equal(codes, ref_codes)


@pytest.mark.parametrize("dtype,D,bits", [
    (torch.float32, 64, 2), (torch.float16, 128, 4), (torch.bfloat16, 128, 2),
    (torch.float32, 200, 4), (torch.float16, 8, 2), (torch.bfloat16, 6, 4),
    (torch.float32, 4, 2), (torch.bfloat16, 72, 4),
], ids=lambda v: str(v).removeprefix("torch."))
def test_quantize_rows_matches_reference(race_exe, dtype, D, bits):
    """D beyond 64 / 128: fewer than 32 values per row (idle lanes), more than 32 bytes of codes
    (lanes loop), D = 6 with 4 bits (not a multiple of 4); 3 x 5 x 7 rows, the last block part
    full."""
    check_quantize_emu(race_exe, make_rows((3, 5, 7, D), dtype, "cpu"), bits)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_rows_near_the_float_range(race_exe, dtype, bits):
    """Finite rows up to the dtype's largest value, spans past the float range: the kernel clamps
    the max and min to ±2^125 as the reference does, bit for bit, and the meta is finite."""
    check_quantize_emu(race_exe, extreme_rows(dtype, "cpu"), bits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_rows_signed_zeros(race_exe, dtype):
    """A zero min or max held as both -0 and +0: the kernel's meta is the reference's (+0)."""
    for bits in (2, 4):
        check_quantize_emu(race_exe, signed_zero_rows(dtype, "cpu"), bits)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("lead", [(), (1,), (3,), (1, 2, 1, 3)], ids=str)
def test_quantize_rows_leading_shapes(race_exe, lead, bits):
    """One row, a decode step's few rows (one block, idle warps), size-1 dims between others.
    (No rows: the launchers return before any launch; test_quantize_rows covers it.)"""
    v = make_rows((*lead, 128), torch.bfloat16, "cpu")
    codes, meta = run_quantize_rows(race_exe, v, bits)
    assert codes.shape == (*lead, 16 * bits) and meta.shape == (*lead, 2)
    check_quantize_emu(race_exe, v, bits)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_rows_strided_inputs(race_exe, bits):
    """The prefill hand-off's [:, :, :T] slice, transposed and expanded (stride 0) views, a slice
    along D, four leading dims that do not merge (the most the kernel indexes), and six that merge
    into two."""
    B, Hkv, S, T, D = 2, 3, 20, 13, 64
    buf = make_rows((B, Hkv, S, D), torch.float16, "cpu")
    four = make_rows((2, 3, 2, 3, 8), torch.float16, "cpu").permute(3, 2, 1, 0, 4)
    six = make_rows((2, 1, 3, 2, 2, 5, 8), torch.float16, "cpu")[:, :, :, :, :, 1:4]
    views = [buf[:, :, :T], buf.transpose(1, 2), buf[:, :1].expand(B, 4, S, D), buf[..., 16:48],
             four, six]
    for v in views:
        check_quantize_emu(race_exe, v, bits)


def test_quantize_rows_round_half_to_even(race_exe):
    """Exact halves between two codes (scale 1, min 0) round to the even code, as the reference
    (test_quantize_rows.test_round_half_to_even)."""
    row2 = torch.tensor([[0, 3, 0.5, 1.5, 2.5, 1, 2, 0.5]])  # [1, 8]
    row4 = torch.tensor([[0, 15, 0.5, 1.5, 2.5, 13.5, 14.5, 7.5]])  # [1, 8]
    check_quantize_emu(race_exe, row2, 2)
    check_quantize_emu(race_exe, row4, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_rows_non_finite_as_cpu(race_exe, bits, dtype):
    """NaN and inf elements, a row of NaN, a row of inf and -inf, in every float dtype: the
    kernel follows the CPU op's documented rules bit for bit (no read out of bounds, every code
    in range)."""
    v = make_rows((6, 128), dtype, "cpu")
    v[1, 7], v[2, :], v[3, 9], v[4, 0] = float("nan"), float("nan"), float("inf"), float("-inf")
    v[5, 3], v[5, 4] = float("inf"), float("-inf")
    codes, meta = run_quantize_rows(race_exe, v, bits)
    want_codes, want_meta = kcache_ops.quantize_rows(v, bits)
    assert torch.equal(codes, want_codes)
    assert torch.equal(meta.view(torch.int16), want_meta.view(torch.int16))


@settings(max_examples=6, deadline=None)
@given(lead=st.lists(st.integers(1, 6), min_size=0, max_size=4), groups=st.integers(1, 40),
       bits=st.sampled_from([2, 4]), dtype=st.sampled_from(DTYPES), transpose=st.booleans())
def test_quantize_rows_random_shapes(race_exe, lead, groups, bits, dtype, transpose):
    v = make_rows((*lead, groups * 8 // bits), dtype, "cpu")
    if transpose and v.dim() >= 3:
        v = v.transpose(0, -2)
    check_quantize_emu(race_exe, v, bits)


def test_asan_quantize_rows(asan_exe):
    """The last element of the storage is the last one read: a strided slice that ends there and
    an odd D (an overrun of the row or of the codes would leave the buffer)."""
    buf = make_rows((2, 3, 9, 200), torch.bfloat16, "cpu")
    for bits in (2, 4):
        check_quantize_emu(asan_exe, buf[:, 1:, 4:], bits, seeds=(1,))
        check_quantize_emu(asan_exe, make_rows((5, 4), torch.float32, "cpu"), bits, seeds=(2,))


# ---- under AddressSanitizer + UBSan -------------------------------------------------------------

@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_asan_qk_topn(asan_exe, group_select):
    """Strided K, clamped lengths, several chunks, N >= L in one batch, one seed."""
    B, Hkv, G, S, D, n = 3, 1, 3, 1030, 64, 40
    k = torch.randn(B, Hkv, S + 4, D).to(torch.float16)[:, :, 4:]
    q = torch.randn(B, Hkv * G, D).to(torch.float16)
    lens = seq_lens_tensor([S + 9, 30, 700], "cpu")
    out = run_qk_topn(asan_exe, q, k, lens, n, 1 / 8, group_select, seeds=(2,))
    check_topn(q, k, seq_lens_tensor([S, 30, 700], "cpu"), n, 1 / 8, group_select, out)


def test_asan_qk_topn_split_select(asan_exe):
    """The split select (two blocks per row for the radix passes and the collect) on a row that
    ends inside its last K stage: every workspace and scratch access in bounds."""
    B, Hkv, G, S, D, n = 1, 1, 2, 8299, 64, 50
    q, k = make_qk(B, Hkv * G, Hkv, S, D, torch.float32, "cpu")
    lens = seq_lens_tensor([S], "cpu")
    out = run_qk_topn(asan_exe, q, k, lens, n, 1 / 8, True, sms=4, seeds=(1,))
    check_topn(q, k, lens, n, 1 / 8, True, out)


def test_asan_sparse_attn_v_and_gather_rows(asan_exe):
    """The last row of V and of src is read (an overrun would leave the buffer)."""
    B, Hkv, G, S, D, N = 2, 2, 3, 80, 128, 20
    scores, indices, lse = make_selection(B, Hkv * G, N, S, "cpu")
    indices[:, :, 0] = S - 1
    v = torch.randn(B, Hkv, S, D).to(torch.bfloat16)
    for renormalize in (True, False):
        out = run_sparse_attn_v(asan_exe, scores, indices, v, lse, renormalize, seeds=(1,))
        check_attn(scores, indices, v, lse, renormalize, out)
    assert torch.equal(run_gather_rows(asan_exe, v, indices, seeds=(1,)),
                       R.gather_rows(v, indices))


def test_asan_sparse_attn_v_mean_tail(asan_exe):
    """The mean tail under ASan + UBSan: the last row of V read, v_sum and seq_lens strided."""
    B, Hkv, G, S, N = 2, 2, 3, 80, 20
    scores, indices, lse, v, v_sum, seq_lens = make_tail_case(B, Hkv, G, N, S, [S, 33],
                                                              torch.bfloat16, "cpu", D=128)
    indices[0, :, 0] = S - 1
    out = run_sparse_attn_v(asan_exe, scores, indices, v, lse, False, seeds=(1,),
                            v_sum=torch.stack([v_sum, v_sum], 1)[:, 1],
                            seq_lens=seq_lens.repeat_interleave(2)[1::2])
    check_mean_tail(scores, indices, v, lse, v_sum, seq_lens, out)


def test_asan_sparse_attn_v_row_union(asan_exe):
    """The row union at its cap under ASan + UBSan (2048 keys sorted, 2049 run starts), the last
    row of V read, strided V."""
    B, Hkv, G, S, D = 1, 2, 8, 700, 128
    N = UNION_CAP // G
    scores, _, lse = make_selection(B, Hkv * G, N, S, "cpu")
    indices = overlapping_indices(B, Hkv, G, N, S, "half", "cpu")
    indices[torch.rand(indices.shape) < 0.1] = -1
    indices[0, :, 0] = S - 1
    v = torch.randn(B, Hkv, S + 3, D).to(torch.bfloat16)[:, :, 3:]
    out = run_sparse_attn_v(asan_exe, scores, indices, v, lse, True, seeds=(1,))
    check_attn(scores, indices, v, lse, True, out)


def test_asan_catches_a_misaligned_load(asan_exe):
    """UBSan's alignment check is live: a source 4 bytes off a 16-byte boundary stops the run at
    the kernel's 16-byte load (the launcher rejects such a tensor before it reaches a GPU)."""
    src = torch.randn(2 * 2 * 50 * 64 + 1)[1:].view(2, 2, 50, 64)
    indices = make_indices(2, 2, 5, 50, "cpu", pad_fraction=0.0)
    with pytest.raises(emu.EmulatorError, match="misaligned address"):
        run_gather_rows(asan_exe, src, indices, seeds=(1,))


# ---- the emulator's own checks ------------------------------------------------------------------

SELFTESTS = ["clean", "partial_warp", "barrier_after_exit", "divergent_barrier", "missing_barrier",
             "stale_shared", "split_warp", "double_write", "divergent_warp_sum",
             "divergent_block_scan", "async_clean", "async_read_before_wait", "async_newest_group",
             "async_uncommitted", "async_read_other", "async_misaligned_dst",
             "async_misaligned_src", "ticket_clean", "ticket_unordered", "ticket_unfenced",
             "handoff_clean", "handoff_unfenced"]


@pytest.mark.parametrize("kernel,message", [
    ("partial_warp", "exited while other lanes|has exited"),
    ("barrier_after_exit", "exited"),
    ("divergent_barrier", "divergent __syncthreads"),
    ("missing_barrier", "race|not written in this block"),
    ("stale_shared", "not written in this block"),
    ("split_warp", "deadlock"),
    ("double_write", "written twice"),
    # one helper's shuffle / barrier line reached from two calls: not the same call
    ("divergent_warp_sum", r"divergent warp: .*kernel_utils\.cuh:\d+ < selftest_kernels\.cuh"),
    ("divergent_block_scan",
     r"divergent __syncthreads: .*kernel_utils\.cuh:\d+ < selftest_kernels"),
    # asynchronous copies: data not waited for, a misaligned copy
    ("async_read_before_wait", "(?s)asynchronous copy into it .* is in flight"),
    ("async_newest_group", "(?s)asynchronous copy into it .* is in flight"),
    ("async_uncommitted", "(?s)asynchronous copy into it .* is in flight"),
    ("async_read_other", "in flight|race|not written in this block"),
    ("async_misaligned_dst",
     r"misaligned __pipeline_memcpy_async .*destination \S+ \(misaligned\)"),
    ("async_misaligned_src", r"misaligned __pipeline_memcpy_async .*source \S+ \(misaligned\)"),
    # a ticket on global memory: the block's writes not ordered before it, or not fenced
    ("ticket_unordered", "(after thread 0's ticket|not ordered before the ticket)"),
    ("ticket_unfenced", "without a __threadfence"),
    # the block with the last ticket reads the others' writes without fencing after its ticket
    ("handoff_unfenced", "after the block's ticket but without a __threadfence by the ticket's"),
])
def test_emulator_reports_misuse(race_exe, kernel, message):
    """Each misuse stops the run with a message naming it: never a hang, never a silent result."""
    with pytest.raises(emu.EmulatorError, match=message):
        emu.run(race_exe, "selftest", dict(kernel=SELFTESTS.index(kernel)), {}, timeout=60)


def test_emulator_runs_a_correct_kernel(race_exe):
    out = emu.run(race_exe, "selftest", dict(kernel=SELFTESTS.index("clean")), {})["out"]
    b = torch.arange(2)[:, None]  # [2, 1]
    t = torch.arange(64)[None, :]  # [1, 64]
    read = 63 - t + b  # [2, 64]: what each thread read back
    expected = read.view(2, 2, 32).sum(-1, keepdim=True).expand(2, 2, 32).reshape(2, 64)
    assert torch.equal(out, expected.to(torch.int32))


def test_emulator_runs_a_correct_ticket(race_exe):
    """The handoff done right (writes, barrier, fence, ticket) passes the race check, and the
    ticket counts once per block."""
    out = emu.run(race_exe, "selftest", dict(kernel=SELFTESTS.index("ticket_clean")), {})["out"]
    assert torch.equal(out[:, :63], torch.arange(63, dtype=torch.int32).expand(2, 63))
    assert (out[:, 63] == 0x7F7F7F7F + 1).all()  # the poisoned counter, one ticket


def test_emulator_runs_a_correct_handoff(race_exe):
    """Both halves of the handoff done right (the last block's ticket thread fences after its
    ticket, a barrier, then another thread reads the other block's row) pass the race check, and
    the read sees that row: 0..62 (block 0) or 100..162 (block 1), whichever block came last.
    Which one that is depends on the seed's block order, so each seed runs alone (the run's
    check that seeds agree bit for bit would fail two seeds of different orders), until both
    orders have run."""
    rows, sums = {sum(range(63)), sum(range(100, 163))}, set()
    for seed in range(1, 65):
        out = emu.run(race_exe, "selftest", dict(kernel=SELFTESTS.index("handoff_clean")), {},
                      seeds=(seed,))["out"]
        sums.add(out[0, 63].item())
        assert sums <= rows
        if sums == rows:
            break
    assert sums == rows  # both block orders among the seeds


def test_emulator_runs_correct_async_copies(race_exe):
    """Two commit groups, each read after the __pipeline_wait_prior that covers it (the second
    zero-filled in odd threads), another thread's slot after a barrier."""
    out = emu.run(race_exe, "selftest", dict(kernel=SELFTESTS.index("async_clean")), {})["out"]
    t = torch.arange(64)
    want = (1000 + t) + torch.where(t % 2 == 1, 0, 1001 + t) + (1063 - t)  # [64]
    assert torch.equal(out, want.expand(2, 64).to(torch.int32))


def test_emulator_defers_async_copies_without_the_race_check(asan_exe):
    """In the sanitizer build (no shadow to stop the read) a copy's destination read before the
    wait holds the block's poison, not the source: the copy lands at the wait, not at issue."""
    out = emu.run(asan_exe, "selftest", dict(kernel=SELFTESTS.index("async_read_before_wait")),
                  {}, seeds=(1,))["out"]
    source = 1000 + torch.arange(64)
    assert not (out == source).any()
    poison = {int.from_bytes(bytes([b] * 4), "little", signed=True) for b in (0xff, 0xab, 0x7f)}
    assert set(out.flatten().tolist()) <= poison


def tf32(x):
    """x float32 cut to tf32 (the low 13 mantissa bits cleared), as the tensor cores read it."""
    return (x.view(torch.int32) & -8192).view(torch.float32)


def run_mma(exe, a, b, c):
    """d [16, 8] = c + a [16, 8] · b [8, 8] by one warp's mma_tf32_m16n8k8 on the emulator."""
    return emu.run(exe, "mma", {}, dict(a=a, b=b, c=c))["d"]


def test_emulator_mma_layout(race_exe):
    """The emulator's tensor-core product: every element of c + a · b over the inputs cut to tf32
    (so each lane holds the fragments the PTX ISA gives it), to float32's rounding."""
    a, b, c = torch.randn(16, 8), torch.randn(8, 8), torch.randn(16, 8)
    a[0, 0] = 1 + 2 ** -20  # cut to 1
    d = run_mma(race_exe, a, b, c)
    want = c.double() + tf32(a).double() @ tf32(b).double()  # [16, 8]
    torch.testing.assert_close(d.double(), want, rtol=2e-6, atol=2e-6)
    assert not torch.allclose(d.double(), c.double() + a.double() @ b.double(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("sign", [1, -1])
def test_emulator_mma_truncates(race_exe, sign):
    """The emulator adds as the tensor cores are measured to (Fasi et al. 2021): addends aligned
    to the largest and cut below its 24 bits. 1 + 8 products of ±1.5 · 2^-24 stays 1, where IEEE
    float32 adds them to 1 ± 1.5 · 2^-21, so the kernels' tests see the truncation's drift."""
    a = torch.ones(16, 8)
    b = torch.full((8, 8), sign * 1.5 * 2.0 ** -24)  # exact in tf32
    c = torch.ones(16, 8)
    assert (c[0, 0] + a[0] @ b[:, 0]).item() != 1.0  # IEEE float32
    assert torch.equal(run_mma(race_exe, a, b, c), c)


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_block_bitonic_sort(race_exe, size):
    """kernel_utils.cuh's block_bitonic_sort on its own, both directions: up to 64 keys in one
    warp's registers (warp_bitonic_sort), more by the block's stages. Unsigned 64-bit keys, repeats
    and the top bit among them."""
    g = torch.Generator().manual_seed(size)
    pool = torch.randint(-2**31, 2**31, (max(1, size // 3), 2), generator=g, dtype=torch.int64)
    pool[0, 1] = -1  # a key with the top bit set
    keys = pool[torch.randint(len(pool), (size,), generator=g)].to(torch.int32)  # [size, 2]
    out = emu.run(race_exe, "sort", {}, dict(keys=keys))["out"]  # [2, size, 2]

    def u64(words):  # [size, 2] int32 (low, high) -> the keys as Python ints
        return [(hi & 0xFFFFFFFF) << 32 | (lo & 0xFFFFFFFF) for lo, hi in words.tolist()]

    assert u64(out[0]) == sorted(u64(keys), reverse=True)
    assert u64(out[1]) == sorted(u64(keys))


def _barrier_after(path, marker):
    """'file:line' of the first __syncthreads after the line containing ``marker``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    line = next(i for i in range(start, len(lines)) if re.search(r"__syncthreads\(\)", lines[i]))
    return f"{path.name}:{line + 1}"


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("S, sms, slices", [(5000, 1, 1), (5000, SMS, 2), (14400, 132, 7)],
                         ids=["whole_rows", "split_rows", "seven_slices"])
def test_qk_topn_top_p(race_exe, group_select, S, sms, slices):
    """top_p < 1 in the select kernels: on whole rows (one multiprocessor: no split) and in the
    merge of rows split over 2 and 7 slices, each head keeps the mass prefix of the same call's
    full selection (the reference's cut of it), the first entry always."""
    lens = seq_lens_tensor([S, 0, 90], "cpu")
    q, k = make_qk(3, 4, 1, S, 64, torch.float32, "cpu")
    k = k * 3
    full = run_qk_topn(race_exe, q, k, lens, 60, 1 / 8, group_select, sms=sms, seeds=(1,),
                       slices=slices)
    for top_p in (0.3, 0.8):
        cut = run_qk_topn(race_exe, q, k, lens, 60, 1 / 8, group_select, sms=sms, top_p=top_p)
        check_top_p(full, cut, top_p)
        assert (cut[1] >= 0).sum() < (full[1] >= 0).sum(), "top_p must cut somewhere"


@pytest.mark.parametrize("marker, S, group_select, match", [
    ("atomicAdd(&sh.hist", 700, 0, "race"),
    ("bool last_slice(", 6200, 1, "not ordered before the ticket|after thread")],
    ids=["radix_histogram", "last_slice"])
def test_missing_barrier_is_caught(race_exe, marker, S, group_select, match):
    """A barrier of qk_select_kernel removed, the race check must stop the run (tests/cuda_emu/
    mutants.py does this for every barrier): the one between the radix histogram's atomics and its
    read (a shared-memory race), and the one before a split row's ticket (last_slice: thread 0
    would take it while other threads still write their picks; blocks never overlap here, so no
    result shows it, and the rule for tickets on global memory must)."""
    site = _barrier_after(emu.KERNEL_DIR / "qk_topn_kernel.cuh", marker)
    q, k = make_qk(1, 4, 2, S, 64, torch.float32, "cpu")
    args = dict(n=50, scale=0.1, group_select=group_select, sms=SMS)
    tensors = dict(q=q, k_cache=k, seq_lens=seq_lens_tensor([S], "cpu"))
    emu.run(race_exe, "qk_topn", args, tensors)  # the unmodified kernel passes
    with pytest.raises(emu.EmulatorError, match=match):
        emu.run(race_exe, "qk_topn", args, tensors, skip_barrier=site)


def test_short_async_wait_is_caught(tmp_path):
    """The kernels' cp.async pipelines go through the emulator's deferred copies (qk_scores_kernel
    by kernel_utils.cuh's copy16_async_evict_first, lowbit_tail_kernel by
    __pipeline_memcpy_async): a copy of the kernels whose loop waits for one group too few, so that
    it reads a stage still in flight, is stopped in both, where the unmodified kernels pass."""
    kernels = tmp_path / "cuda"
    shutil.copytree(emu.KERNEL_DIR, kernels)
    for name, stages in (("qk_topn_kernel.cuh", "kScoreStages"),
                         ("lowbit_tail_kernel.cuh", "kTailStages")):
        path = kernels / name
        text = path.read_text(encoding="utf-8")
        wait = f"__pipeline_wait_prior({stages} - 1);"
        assert text.count(wait) == 1, f"{name}: the loop's wait moved"
        path.write_text(text.replace(wait, f"__pipeline_wait_prior({stages});"), encoding="utf-8")
    exe = emu.build("race", kernel_dir=kernels)
    q, k = make_qk(1, 4, 1, 600, 64, torch.float32, "cpu")
    with pytest.raises(emu.EmulatorError, match="(?s)EMU-ERROR qk_scores_kernel .*in flight"):
        run_qk_topn(exe, q, k, seq_lens_tensor([600], "cpu"), 20, 0.125, False, seeds=(1,))
    args = lowbit_case(1, 1, 4, 300, 64, 2, torch.float32, [300], 24, False, 0.1)
    with pytest.raises(emu.EmulatorError, match="(?s)EMU-ERROR lowbit_tail_kernel .*in flight"):
        run_lowbit_tail(exe, *args, 2, sms=1, seeds=(1,))


# ---- lowbit_tail --------------------------------------------------------------------------------

def run_lowbit_tail(exe, scores, seq_lens, lse, indices, codes, meta, bits, sms=SMS,
                    seeds=SEEDS, skip_barrier=None, skip_first=0, skip_last=0, hot_v=None,
                    hot_pos=None):
    """lowbit_tail on the emulator: scores [B, Hq, S] float32, seq_lens [B] int32, lse [B, Hq]
    float32, indices [B, Hq, N] int32, codes [B, Hkv, S, D * bits / 8] uint8 (sent as int32
    words: the case format has no uint8), meta [B, Hkv, S, 2] bfloat16, optionally hot_v
    [B, Hkv, H, D] and hot_pos [B, H] int32 -> out [B, Hq, D] float32. skip_barrier: as
    emu.run's (a mutant)."""
    tensors = dict(scores=scores, seq_lens=seq_lens, lse=lse, indices=indices,
                   v_codes_words=codes.view(torch.int32), v_meta=meta)
    if hot_v is not None:
        tensors.update(hot_v=hot_v, hot_pos=hot_pos)
    scalars = dict(bits=bits, sms=sms, skip_first=skip_first, skip_last=skip_last)
    return emu.run(exe, "lowbit_tail", scalars, tensors, seeds=seeds,
                   skip_barrier=skip_barrier)["out"]


def lowbit_case(B, Hkv, G, S, D, bits, dtype, lens, n, group_select, scale):
    """(scores [B, Hq, S] (the reference's, NaN past L_b), seq_lens, lse, indices, codes, meta):
    make_lowbit_case's low-bit copy and the reference qk_topn's selection over its q and K."""
    q, k, seq_lens, codes, meta = make_lowbit_case(B, Hkv, G, S, D, bits, dtype, "cpu", lens)
    _, indices, lse = R.qk_topn(q, k, seq_lens, n, scale, group_select)
    scores, _ = lowbit_reference_scores(q, k, seq_lens, scale)
    return scores, seq_lens, lse, indices, codes, meta


@pytest.mark.parametrize("dtype,D,G,bits,group_select", [
    (torch.float32, 64, 1, 2, False),
    (torch.float16, 128, 3, 4, True),
    (torch.bfloat16, 64, 4, 4, False),
    (torch.float32, 128, 8, 2, True),
    (torch.bfloat16, 128, 8, 2, False),
    (torch.float16, 64, 2, 2, True),
    (torch.bfloat16, 64, 12, 4, True),
    (torch.float16, 128, 16, 2, True),
    (torch.bfloat16, 128, 7, 2, False),
    (torch.float32, 128, 8, 4, True),
], ids=lambda v: str(v).removeprefix("torch."))
def test_lowbit_tail_matches_reference(race_exe, dtype, D, G, bits, group_select):
    """Several chunks (partials and the reduce kernel), L = S, odd, N + 1, N, 1 and 0 in one
    batch; G = 12 takes two blocks per KV head (a slice of 8 query heads and one of 4), G = 16
    two of 8, G = 7 one of 8 with one head empty."""
    Hkv, S, n = 1 if G >= 8 else 2, 700, 16
    lens = [S, 97, n + 1, n, 1, 0]
    args = lowbit_case(len(lens), Hkv, G, S, D, bits, dtype, lens, n, group_select, 0.1)
    out = run_lowbit_tail(race_exe, *args, bits)
    check_lowbit_tail(*args, bits, out)
    assert torch.equal(out[3:], torch.zeros(3, *out.shape[1:])), "L_b <= N gives zeros"


@pytest.mark.parametrize("bits", [2, 4])
def test_lowbit_tail_single_chunk(race_exe, bits):
    """One multiprocessor: a single chunk per row, written to out without the reduce kernel."""
    args = lowbit_case(2, 2, 4, 300, 128, bits, torch.bfloat16, [300, 211], 24, False, 0.09)
    out = run_lowbit_tail(race_exe, *args, bits, sms=1)
    check_lowbit_tail(*args, bits, out)


def test_lowbit_tail_scores_keys_apart(race_exe):
    """Scores whose keys are not adjacent (keys_apart: key stride Hq + 1), as test_lowbit_tail.py's
    test_scores_keys_apart on a GPU, with hot rows: the weighing pass and the hot rows' weights
    step a head's scores by that stride."""
    B, Hkv, G, S, D, first, last = 2, 2, 3, 333, 128, 4, 60
    lens = [S, 170]
    scores, *rest = skipped_lowbit_case(B, Hkv, G, S, D, 2, torch.float32, "cpu", lens, 16,
                                        first, last)
    hot_v, hot_pos = hot_rows_case(B, Hkv, 5, D, S, lens, torch.bfloat16, "cpu")
    scores = keys_apart(scores)  # [B, Hq, S], key stride Hq + 1
    out = run_lowbit_tail(race_exe, scores, *rest, 2, skip_first=first, skip_last=last,
                          hot_v=hot_v, hot_pos=hot_pos)
    ref = R.lowbit_tail(scores, *rest, 2, first, last, hot_v, hot_pos)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_lowbit_tail_full_bitmap(race_exe):
    """Chunks of kTailMaxChunk = 4096 keys (one multiprocessor, 12288 keys): every word of the
    selection bitmap, for a slice of 8 heads, with 1024 selected keys per head."""
    args = lowbit_case(1, 1, 8, 12288, 64, 2, torch.float32, [12288], 1024, False, 0.125)
    out = run_lowbit_tail(race_exe, *args, 2, sms=1)
    check_lowbit_tail(*args, 2, out)


@pytest.mark.parametrize("skip_first, skip_last", [(4, 60), (300, 33), (0, 257), (31, 0)])
def test_lowbit_tail_skipped_keys(race_exe, skip_first, skip_last):
    """skip_first / skip_last set the bitmap's bits of the hot rows for every head: ranges that
    end inside a 32-key word, cover whole chunks (of 256 keys here) or cross into the next one;
    the skipped rows' copies are NaN, so one weighed shows."""
    lens = [700, 333, 97, 5, 0]
    args = skipped_lowbit_case(len(lens), 2, 3, 700, 64, 2, torch.float32, "cpu", lens, 24,
                               skip_first, skip_last)
    out = run_lowbit_tail(race_exe, *args, 2, skip_first=skip_first, skip_last=skip_last)
    check_lowbit_tail(*args, 2, out, skip_first, skip_last)


@pytest.mark.parametrize("bits", [2, 4])
def test_lowbit_tail_v_near_the_float_range(race_exe, bits):
    """V rows up to ±3.4e38 (scales near 2^126, so w · scale spans the float range): the tensor
    cores' two tf32 parts of w · scale keep the tail finite and within float32 rounding of the
    reference's, as on the CPU (test_lowbit_tail.py's near-the-float-range test)."""
    B, Hkv, G, S, D, n = 2, 1, 3, 300, 128, 16
    q, k, seq_lens, _, _ = make_lowbit_case(B, Hkv, G, S, D, bits, torch.float32, "cpu",
                                            [300, 177])
    codes, meta = R.quantize_rows(v_near_the_float_range(B, Hkv, S, D), bits)
    _, indices, lse = R.qk_topn(q, k, seq_lens, n, 0.1)
    scores, _ = lowbit_reference_scores(q, k, seq_lens, 0.1)
    out = run_lowbit_tail(race_exe, scores, seq_lens, lse, indices, codes, meta, bits)
    assert out.isfinite().all()
    ref = R.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, bits)
    torch.testing.assert_close(out, ref, atol=2.0 ** 126 * 1e-5, rtol=1e-5)


def test_lowbit_tail_arbitrary_indices(race_exe):
    """Indices repeated, -1, in [L_b, S), >= S and < -1 (the last two rejected by the launcher
    outside graph capture): only the valid ones in [0, L_b) are left out, nothing else is read."""
    B, Hkv, G, S, D, N = 2, 2, 3, 300, 64, 40
    q, k, seq_lens, codes, meta = make_lowbit_case(B, Hkv, G, S, D, 4, torch.float16, "cpu",
                                                   [300, 150])
    indices = torch.randint(0, S, (B, Hkv * G, N), dtype=torch.int32)
    indices[:, :, 1] = indices[:, :, 0]
    indices[torch.rand(B, Hkv * G, N) < 0.2] = -1
    indices[0, 0, 2], indices[1, 2, 3], indices[1, 1, 4] = S + 3, -7, 1 << 30
    scores, lse = lowbit_reference_scores(q, k, seq_lens, 0.2)
    out = run_lowbit_tail(race_exe, scores, seq_lens, lse, indices, codes, meta, 4)
    cleaned = indices.masked_fill((indices < 0) | (indices >= S), -1)
    check_lowbit_tail(scores, seq_lens, lse, cleaned, codes, meta, 4, out)


@pytest.mark.parametrize("bits", [2, 4])
def test_lowbit_tail_selected_nan_row_is_left_out(race_exe, bits):
    """A NaN row (NaN scale and min) that a head selected never meets that head's weight (the
    weighing lane multiplies w · scale only for a weight that is not 0): its tail stays finite;
    the heads that did not select the row are NaN, as the reference's, unless their weight of it
    is 0 (a score of -inf or NaN)."""
    check_nan_row_left_out(lambda *args: run_lowbit_tail(race_exe, *args), "cpu", bits)


@pytest.mark.parametrize("G", [5, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_lowbit_tail_rows_past_the_float_range(race_exe, G, D):
    """test_lowbit_tail.py's rows past the float range among finite ones, on the kernel: NaN and
    inf copies (rows 40-42) and mins of +-3e38 (rows 300, 301) that the even heads of KV head 1
    weigh, cancelling to ~1e34, so that a weight a few ulps from exp(s - lse) moves the output by
    more than 1e-5 of it (exp2f((s - lse) * log2e), the product rounded, did: 1.5e-5 at G = 5,
    D = 128, on the CUDA cores, so on the GPU too). Each head's output is the reference's."""
    torch.manual_seed(0)
    B, Hkv, S, n, bits = 1, 2, 700, 8, 2
    q, k, seq_lens, codes, meta = make_lowbit_case(B, Hkv, G, S, D, bits, torch.float32, "cpu",
                                                   [S])
    scores, indices, lse = lowbit_selection(q, k, seq_lens, n, False)  # the CPU qk_topn's
    bad = {40: (float("nan"), 0.5), 41: (0.5, float("inf")), 42: (float("-inf"), 1.0),
           300: (1.0, 3e38), 301: (1.0, -3e38), 650: (3e38, 0.0)}  # position -> (scale, min)
    for j, (step, base) in bad.items():
        meta[:, :, j] = torch.tensor([step, base], dtype=torch.bfloat16)
    scores[:, :, 650] = float("-inf")
    rows = torch.tensor([40, 41, 42, 300, 301], dtype=torch.int32)
    indices[0, 1:G:2, :5] = rows  # KV head 0's odd heads
    indices[0, G:, :3] = rows[:3]  # KV head 1's heads
    indices[0, G + 1::2, 3:5] = rows[3:]  # and its odd ones
    args = (scores, seq_lens, lse, indices, codes, meta)
    out = run_lowbit_tail(race_exe, *args, bits)
    ref = R.lowbit_tail(*args, bits)
    assert ref[0, G::2].isfinite().all() and ref[0, G::2].abs().max() > 1e30
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("atol", [0.0, TF32_SUBNORMAL_FLOOR])
def test_lowbit_tail_weights_at_the_float_limits(race_exe, atol):
    """test_lowbit_tail.py's weights at the float limits, on the kernel: the largest float's,
    none, and the subnormal one kept, but on the tensor cores' tf32 grid (2^-136: w * scale
    split in two tf32 parts, codes scaled by up to 2^-14), so its outputs are off by more than
    1e-5 of them, within TF32_SUBNORMAL_FLOOR."""
    args = float_limit_weights_case()
    out = run_lowbit_tail(race_exe, *args, 2)  # [1, 12, 64]
    ref = R.lowbit_tail(*args, 2)
    if atol:
        check_float_limit_weights(out, ref, atol)
    else:  # the floor is needed: exact to 1e-5 only on the CPU
        with pytest.raises(AssertionError, match="Tensor-likes are not close"):
            check_float_limit_weights(out, ref, atol)


def test_lowbit_tail_out_of_range_lengths_are_clamped(race_exe):
    """seq_lens beyond S or negative (rejected by the launcher outside graph capture) are clamped
    to [0, S], never read out of bounds."""
    S = 300
    q, k, _, codes, meta = make_lowbit_case(3, 2, 2, S, 64, 2, torch.float32, "cpu", [S, S, 40])
    clamped = seq_lens_tensor([S, 0, 40], "cpu")
    _, indices, lse = R.qk_topn(q, k, clamped, 8, 0.2)
    scores, _ = lowbit_reference_scores(q, k, clamped, 0.2)
    out = run_lowbit_tail(race_exe, scores, seq_lens_tensor([S + 50, -7, 40], "cpu"), lse,
                          indices, codes, meta, 2)
    check_lowbit_tail(scores, clamped, lse, indices, codes, meta, 2, out)


def test_lowbit_tail_strided_inputs(race_exe):
    """The cache's views: codes and meta sliced on S and heads; scores every other head's of a
    wider buffer; lse and indices transposed views; seq_lens every other element."""
    B, Hkv, G, S, D, n = 2, 2, 3, 97, 128, 16
    q, k, _, codes, meta = make_lowbit_case(B, 2 * Hkv, G, S + 11, D, 4, torch.bfloat16, "cpu",
                                            [S + 5, 55])
    k, codes, meta = (t[:, 1::2, 5:S + 5] for t in (k, codes, meta))
    q = q.view(B, 2 * Hkv, G, D)[:, 1::2].reshape(B, Hkv * G, D)
    lens = seq_lens_tensor([S, 0, 50, 0], "cpu")[::2]
    _, indices, lse = R.qk_topn(q, k, lens, n, 0.1)
    scores, _ = lowbit_reference_scores(q, k, lens, 0.1)
    wide = torch.full((B, 2 * Hkv * G, S + 7), float("nan"))
    wide[:, 1::2, 3:S + 3] = scores
    scores = wide[:, 1::2, 3:S + 3]
    indices = indices.transpose(0, 1).contiguous().transpose(0, 1)
    lse = lse.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (scores, codes, meta, indices, lse, lens))
    out = run_lowbit_tail(race_exe, scores, lens, lse, indices, codes, meta, 4)
    check_lowbit_tail(scores, lens, lse, indices, codes, meta, 4, out)


def test_lowbit_tail_empty_cache(race_exe):
    """S = 0: no block at all, zeros out."""
    args = lowbit_case(2, 2, 2, 0, 64, 2, torch.float32, [0, 0], 4, False, 0.1)
    assert torch.equal(run_lowbit_tail(race_exe, *args, 2), torch.zeros(2, 4, 64))


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_lowbit_tail_decode_step(race_exe, group_select):
    """qk_topn then lowbit_tail on the emulator, over qk_topn's own score scratch (as KCache
    passes it): the reference tail of the reference selection."""
    B, Hkv, G, S, D, n = 2, 2, 4, 700, 64, 32
    q, k, lens, codes, meta = make_lowbit_case(B, Hkv, G, S, D, 2, torch.bfloat16, "cpu", [S, 97])
    _, indices, lse, every = run_qk_topn(race_exe, q, k, lens, n, 1 / 8, group_select,
                                         return_scores=True)
    out = run_lowbit_tail(race_exe, every, lens, lse, indices, codes, meta, 2)
    check_lowbit_tail(every, lens, lse, indices, codes, meta, 2, out)
    want, _ = R.qk_scores(q, k, lens, 1 / 8)  # [B, Hq, S]
    for b, L in enumerate(lens.tolist()):
        torch.testing.assert_close(every[b, :, :L], want[b, :, :L], atol=SCORE_TOL,
                                   rtol=SCORE_TOL)


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 5, 8]),
       S=st.integers(1, 700), n=st.integers(1, 80), D=st.sampled_from([64, 128]),
       bits=st.sampled_from([2, 4]), dtype=st.sampled_from(DTYPES), group_select=st.booleans(),
       sms=st.sampled_from([1, 132]), skip_first=st.integers(0, 70),
       skip_last=st.integers(0, 70), data=st.data())
def test_lowbit_tail_random_shapes(race_exe, B, Hkv, G, S, n, D, bits, dtype, group_select, sms,
                                   skip_first, skip_last, data):
    """Random shapes, lengths and skipped keys (the skipped rows' copies NaN)."""
    lens = data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    args = skipped_lowbit_case(B, Hkv, G, S, D, bits, dtype, "cpu", lens, n, skip_first,
                               skip_last, group_select)
    out = run_lowbit_tail(race_exe, *args, bits, sms=sms, skip_first=skip_first,
                          skip_last=skip_last)
    check_lowbit_tail(*args, bits, out, skip_first, skip_last)


@pytest.mark.parametrize("sms", [1, 132], ids=["one_chunk", "chunks"])
def test_asan_lowbit_tail(asan_exe, sms):
    """Strided inputs ending at the last row of their storage, both bit widths, one seed."""
    for bits, dtype in ((2, torch.float16), (4, torch.float32)):
        q, k, lens, codes, meta = make_lowbit_case(2, 1, 3, 610, 64, bits, dtype, "cpu",
                                                   [610, 333])
        k, codes, meta = (t[:, :, 10:] for t in (k, codes, meta))
        lens = seq_lens_tensor([600, 323], "cpu")
        _, indices, lse = R.qk_topn(q, k, lens, 30, 0.1)
        scores, _ = lowbit_reference_scores(q, k, lens, 0.1)
        scores = torch.cat([torch.zeros(2, 3, 10), scores], -1)[..., 10:]  # ends at its storage's
        out = run_lowbit_tail(asan_exe, scores, lens, lse, indices, codes, meta, bits, sms=sms,
                              seeds=(1,))
        check_lowbit_tail(scores, lens, lse, indices, codes, meta, bits, out)


def _barriers(kernel_file):
    """'file:line' of every __syncthreads in csrc/cuda/<kernel_file>."""
    path = emu.KERNEL_DIR / kernel_file
    lines = path.read_text(encoding="utf-8").splitlines()
    return [f"{path.name}:{i + 1}" for i, line in enumerate(lines)
            if re.search(r"__syncthreads\(\)", line)]


@pytest.mark.parametrize("site", _barriers("lowbit_tail_kernel.cuh"))
def test_lowbit_tail_missing_barrier_is_caught(race_exe, site):
    """Each barrier of lowbit_tail_kernel removed in turn: the race check stops the run, without
    hot rows or with them (one chunk of 250 keys, 300 slots in 3 tiles: the hot rows' barriers;
    their first one also separates the warps' sums from their reads, so the barrier kept for
    calls without hot rows shows only in those)."""
    args = lowbit_case(1, 1, 4, 250, 64, 2, torch.float32, [250], 40, False, 0.1)
    hot_v, hot_pos = hot_rows_case(1, 1, 300, 64, 250, [250], torch.float32, "cpu")
    caught = []
    for extra in (dict(), dict(hot_v=hot_v, hot_pos=hot_pos)):
        run_lowbit_tail(race_exe, *args, 2, seeds=(1,), sms=1, **extra)  # unmodified: passes
        try:
            run_lowbit_tail(race_exe, *args, 2, seeds=(1,), sms=1, skip_barrier=site, **extra)
        except emu.EmulatorError as e:
            caught.append(str(e))
    assert caught, f"removing the barrier at {site} went unnoticed"
    assert all(re.search("race|not written in this block", e) for e in caught)


@pytest.mark.parametrize("S, sms, H, dtype, G, D, bits", [
    (700, 1, 5, torch.bfloat16, 3, 64, 2),
    (700, SMS, 64, torch.float16, 3, 64, 2),
    (700, SMS, 300, torch.float32, 3, 64, 2),
    (250, 1, 300, torch.bfloat16, 3, 64, 2),
    (700, SMS, 64, torch.bfloat16, 8, 128, 2),
    (500, SMS, 64, torch.float32, 10, 128, 2),
    (700, SMS, 64, torch.bfloat16, 8, 64, 2),
    (700, 1, 64, torch.bfloat16, 8, 128, 2),
    (700, 1, 64, torch.float16, 4, 64, 4),
    (700, 1, 64, torch.bfloat16, 8, 64, 4),
    (700, SMS, 64, torch.float32, 8, 128, 4)])
def test_lowbit_tail_hot_rows(race_exe, S, sms, H, dtype, G, D, bits):
    """hot_v / hot_pos: each chunk's block adds its share of the slots (several chunks; one chunk
    of 250 keys taking 300 slots in 3 tiles of 128); empty slots with NaN rows, positions past
    L_b with inf rows, repeats, rows of every float dtype; slices of 4 and 8 heads, G = 10 (a
    slice of 2 after one of 8); hot_v strided in its slots; 2-bit and 4-bit codes, and one
    multiprocessor, whose long chunks wrap the key loop's staging; against the reference at the
    float32 tolerance."""
    lens, first, last = [S, 233, 0], 4, 60
    args = skipped_lowbit_case(len(lens), 2, G, S, D, bits, torch.float32, "cpu", lens, 24,
                               first, last)
    hot_v, hot_pos = hot_rows_case(len(lens), 2, H, D, S, lens, dtype, "cpu")
    if G == 10:  # every other row of a buffer twice as long (NaN between): slot stride 2 · D
        nan = torch.full_like(hot_v, float("nan"))
        hot_v = torch.stack([hot_v, nan], 3).flatten(2, 3)[:, :, ::2]
    out = run_lowbit_tail(race_exe, *args, bits, sms=sms, skip_first=first, skip_last=last,
                          hot_v=hot_v, hot_pos=hot_pos)
    ref = R.lowbit_tail(*args, bits, first, last, hot_v, hot_pos)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- reuse_rows ---------------------------------------------------------------------------------

def run_reuse_rows(exe, indices, v, new_pos, pool, step, group_select, seeds=SEEDS,
                   skip_barrier=None):
    """reuse_rows on the emulator: indices [B, Hq, N] int32, v [B, Hkv, S, D], new_pos [B] int32,
    pool (rows [B, Hkv, C, D], held and used [B, Hkv, C] int32) -> pool_indices [B, Hq, N],
    counts [B, Hkv, 2], the pool after the step (the inputs are left as they were)."""
    tensors = dict(indices=indices, v_host=v, new_pos=new_pos, rows=pool[0], held=pool[1],
                   used=pool[2], step=torch.tensor([step], dtype=torch.int32))
    out = emu.run(exe, "reuse_rows", dict(group_select=int(group_select)), tensors, seeds=seeds,
                  skip_barrier=skip_barrier)
    return out["pool_indices"], out["counts"], [out["rows"], out["held"], out["used"]]


def check_reuse_steps(exe, B, Hkv, G, N, C, D, dtype, group_select, steps=4, span=None,
                      seeds=SEEDS, skip_barrier=None):
    """``steps`` steps of the emulated kernel and of the reference from an empty pool (rows NaN),
    selections from a window that drifts by a position a step, every other step's new token
    among its rows, a few indices out of range (padding): the same slots, counts and pool state
    bit for bit -> the counts summed over the steps."""
    S = 3 * N + steps + 8
    span = span or 2 * N
    v = torch.randn(B, Hkv, S, D).to(dtype)  # [B, Hkv, S, D]
    pool = [torch.full((B, Hkv, C, D), float("nan")).to(dtype),
            torch.full((B, Hkv, C), -1, dtype=torch.int32),
            torch.full((B, Hkv, C), -1, dtype=torch.int32)]  # rows, held, used
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros(2, dtype=torch.int32)
    for step in range(steps):
        indices = reuse_selection(B, G * Hkv, Hkv, N, span, group_select, gen=gen) + step
        indices = torch.where(indices >= step, indices, -1)  # [B, Hq, N]
        if not group_select:
            indices[:, 0, -1] = S + step  # out of range: padding
        new_pos = (indices[:, 0].amax(-1) if step % 2 else
                   torch.full((B,), S - 1, dtype=torch.int32))  # [B]
        want_pool = [t.clone() for t in pool]
        want = R.reuse_rows(indices, v, new_pos, *want_pool, torch.tensor([step]).int(),
                            group_select)
        got_indices, counts, pool = run_reuse_rows(exe, indices, v, new_pos, pool, step,
                                                   group_select, seeds, skip_barrier)
        assert torch.equal(got_indices, want[0]) and torch.equal(counts, want[1]), step
        for got, ref in zip(pool, want_pool):
            torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
        total += counts.sum((0, 1))
    return total


@pytest.mark.parametrize("dtype, D, G, N, extra, group_select", [
    (torch.float32, 64, 1, 9, 5, False),
    (torch.bfloat16, 128, 4, 6, 0, False),
    (torch.float16, 64, 3, 10, 10, True),
    (torch.float32, 64, 8, 40, 280, False),
    (torch.bfloat16, 64, 4, 300, 0, True),
    (torch.bfloat16, 128, 7, 12, 3, False),
], ids=["G1", "C_equal_E", "group", "runs_of_2_sort_1024", "group_300", "G7"])
def test_reuse_rows_matches_reference(race_exe, dtype, D, G, N, extra, group_select):
    """Pools of E + extra slots (E = G·N per head, N with group_select): C = E, more entries
    than threads (each thread a run of 2) and a sort of 1024 keys for 600 slots."""
    E = N if group_select else G * N
    reads, hits = check_reuse_steps(race_exe, 2, 2, G, N, E + extra, D, dtype, group_select)
    assert 0 < hits < reads


@pytest.mark.parametrize("N, D, dtype", [(64, 128, torch.bfloat16), (128, 64, torch.float32)])
def test_reuse_rows_at_the_cuda_limits(race_exe, N, D, dtype):
    """A pool of kReuseMaxSlots = 2048 slots (a sort of 2048 keys, 4 pairs a thread) and steps of
    16 heads' 64 and 128 entries (E = 1024 and kReuseMaxEntries = 2048: runs of 4 and 8 a
    thread), as test_cuda_ops.py's largest case on a GPU and past it."""
    reads, hits = check_reuse_steps(race_exe, 1, 1, 16, N, 2048, D, dtype, False, steps=2)
    assert 0 < hits < reads


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 5, 8]),
       N=st.integers(1, 70), extra=st.integers(0, 40), D=st.sampled_from([64, 128]),
       dtype=st.sampled_from(DTYPES), group_select=st.booleans())
def test_reuse_rows_random_shapes(race_exe, B, Hkv, G, N, extra, D, dtype, group_select):
    E = N if group_select else G * N
    check_reuse_steps(race_exe, B, Hkv, G, N, E + extra, D, dtype, group_select, steps=3)


def test_asan_reuse_rows(asan_exe):
    """The last row of V and the last slot of the pool under ASan + UBSan."""
    check_reuse_steps(asan_exe, 2, 1, 3, 7, 21, 128, torch.bfloat16, False, steps=3,
                      seeds=(1,))


@pytest.mark.parametrize("site", _barriers("reuse_rows_kernel.cuh"))
def test_reuse_rows_missing_barrier_is_caught(race_exe, site):
    """Each barrier of reuse_rows_kernel removed in turn: the race check stops the run."""
    with pytest.raises(emu.EmulatorError, match="race|not written in this block"):
        check_reuse_steps(race_exe, 1, 1, 4, 5, 24, 64, torch.float32, False, steps=2,
                          seeds=(1,), skip_barrier=site)


def on_emulator(*args):
    """The last line of pytest's summary of a run of test files' device-parametrized cases through
    the CUDA kernels (cuda_emu/on_emulator.py swaps them in); args: the files and options."""
    env = dict(os.environ, KCACHE_OPS_TEST_DEVICES="cpu")
    res = run_pytest("-p", "cuda_emu.on_emulator", *args, cwd=Path(__file__).parent, env=env,
                     timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


def test_op_test_files_pass_on_the_emulated_kernels(race_exe):
    """The device-parametrized cases of the sparse_attn_v, gather_rows and reuse_rows test files,
    through the CUDA kernels, pass as the CPU op does: the CUDA cases of those files, checked
    without a GPU. (qk_topn's and lowbit_tail's files take minutes there: the plugin's docstring
    gives the command; the next test runs the cases of theirs that no test here repeats.)"""
    summary = on_emulator("test_sparse_attn_v.py", "test_gather_rows.py", "test_reuse_rows.py")
    assert int(re.search(r"(\d+) passed", summary)[1]) >= 220, summary


# The device cases of qk_topn's and lowbit_tail's test files whose options or values no test here
# gives the kernels: top_p's edges, group mass at large and subnormal shares, bfloat16 and float16
# at the ends of the range and NaN, exact ties and block maxima at every threshold start (the
# CPU's), hot rows with NaN and overflowing weights and with no slot, strided meta, hot rows and
# scores, and keys skipped up to and past L_b and S.
ONLY_IN_THE_OP_FILES = (
    "top_p_reached_exactly or top_p_that_rounds or top_p_keeps_each or group_mass_at_large or "
    "subnormal_group_mass or bfloat16_at_the_ends or nan_as_reference or nth_best or ties_exact "
    "or hot_rows_nan_and_overflowing or hot_rows_of_no_slot or test_strided_inputs or "
    "strided_seq_lens_and_hot or scores_keys_apart or skipped_keys_are_not_ranked or "
    "skipped_keys_are_left_out")


def test_qk_topn_and_lowbit_tail_cases_pass_on_the_emulated_kernels(race_exe):
    """Those cases through the CUDA kernels pass as the CPU op does (about five minutes on 2
    cores)."""
    summary = on_emulator("test_qk_topn.py", "test_lowbit_tail.py", "-k", ONLY_IN_THE_OP_FILES)
    assert int(re.search(r"(\d+) passed", summary)[1]) >= 222, summary
