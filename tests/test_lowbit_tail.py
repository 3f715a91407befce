"""kcache_ops.lowbit_tail against the float32 reference: scores, indices and lse from qk_topn (per
head and group selection) and arbitrary indices (padding, repeats, past L_b), L_b <= N giving
zeros, the skipped first and last keys (hot rows) left out, the tail plus the selected rows
equal to attention over the mixed V, scores and rows past L_b never read, strided inputs, GQA
ratios, both bit widths, random shapes; on CUDA long rows, determinism and graph replay."""
import pytest
import torch
from conftest import DEVICES, DTYPES, TOL, host_tensor, on_threads, seq_lens_tensor
from cuda_checks import capture_graph, requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st

import kcache_ops
from kcache_ops import reference as R

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest: outputs start as NaN

# the op sums float32 scores and codes whatever the model's dtype: the float32 tolerance for all
OUT_TOL = TOL[torch.float32]


def make_case(B, Hkv, G, S, D, bits, dtype, device, lens):
    """Fresh random q [B, Hq, D], k [B, Hkv, S, D] (dtype), seq_lens [B], and the low-bit copy
    of a random V: codes [B, Hkv, S, D * bits / 8] uint8, meta [B, Hkv, S, 2] bfloat16. Rows
    j >= L_b of k and meta are NaN and their codes random: a read of one shows in the output."""
    q = torch.randn(B, Hkv * G, D).to(dtype)
    k = torch.randn(B, Hkv, S, D).to(dtype)
    codes, meta = R.quantize_rows(torch.randn(B, Hkv, S, D) * 2 + 0.5, bits)
    past = torch.arange(S)[None, :] >= torch.tensor(lens)[:, None]  # [B, S]
    k[past[:, None, :, None].expand_as(k)] = float("nan")
    meta[past[:, None, :, None].expand_as(meta)] = float("nan")
    return (q.to(device), k.to(device), seq_lens_tensor(lens, device), codes.to(device),
            meta.to(device))


def hot_rows_case(B, Hkv, H, D, S, lens, dtype, device):
    """(hot_v [B, Hkv, H, D] of dtype, hot_pos [B, H] int32) for lowbit_tail: random rows at
    positions that mix valid ones, -1 (empty slots, NaN rows), positions at or past L_b (inf
    rows) and a repeat; nothing left out may reach the output."""
    hot_v = torch.randn(B, Hkv, H, D).to(dtype)
    L = torch.tensor(lens)[:, None]  # [B, 1]
    pos = torch.where(L > 0, (torch.rand(B, H) * L).long(), -1).int()  # [B, H] valid or empty
    if H > 1:
        pos[:, 0] = -1  # an empty slot
        hot_v[:, :, 0] = float("nan")
    if H > 2:
        pos[:, 1] = torch.where(L[:, 0] < S, L[:, 0], -1)  # L_b: not valid (or empty)
        hot_v[:, :, 1] = float("inf")
    if H > 3:
        pos[:, 3] = pos[:, 2]  # two slots, one position: each adds its row
    return hot_v.to(device), pos.to(device)


def v_near_the_float_range(B, Hkv, S, D):
    """V [B, Hkv, S, D] float32 with values up to ±3.4e38 (rows spanning past the float range),
    every third row of ordinary values."""
    top = torch.finfo(torch.float32).max
    v = (torch.rand(B, Hkv, S, D) * 2 - 1) * top
    v[:, :, ::3] = torch.randn(B, Hkv, (S + 2) // 3, D)
    return v


def selection(q, k, seq_lens, n, group_select, scale=None, skip_first=0, skip_last=0):
    """qk_topn's (all_scores [B, Hq, S], indices [B, Hq, n], lse [B, Hq]) for lowbit_tail, the
    keys j < skip_first and j >= L_b - skip_last not ranked."""
    _, indices, lse, all_scores = kcache_ops.qk_topn(q, k, seq_lens, n, scale, group_select,
                                                     return_scores=True, skip_first=skip_first,
                                                     skip_last=skip_last)
    return all_scores, indices, lse


def reference_scores(q, k, seq_lens, scale):
    """Every score [B, Hq, S] float32 of the reference and lse [B, Hq], on q's device, with NaN
    past L_b (lowbit_tail must not read them)."""
    s, lse = R.qk_scores(q.cpu(), k.cpu(), seq_lens.cpu(), scale)  # [B, Hq, S], [B, Hq]
    return s.nan_to_num(float("nan"), neginf=float("nan")).to(q.device), lse.to(q.device)


def check_tail(scores, lens, lse, indices, codes, meta, bits, out, skip_first=0, skip_last=0):
    """out [B, Hq, D] float32 on scores' device, close to the reference, no NaN."""
    B, Hq, _ = scores.shape
    D = codes.shape[-1] * 8 // bits
    assert out.dtype == torch.float32 and out.device == scores.device
    assert out.shape == (B, Hq, D)
    ref = R.lowbit_tail(scores.cpu(), lens.cpu(), lse.cpu(), indices.cpu(), codes.cpu(),
                        meta.cpu(), bits, skip_first, skip_last)
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu(), ref, atol=OUT_TOL, rtol=OUT_TOL)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 2, 3, 4, 7, 8])
def test_matches_reference(device, dtype, G, D, group_select, bits):
    """Indices and lse from qk_topn; L_b = 0, 1, N, N + 1, odd and full in one batch."""
    Hkv, S, n = 2, 1025, 64
    lens = [1025, 0, 1, n, n + 1, 97]
    q, k, seq_lens, codes, meta = make_case(len(lens), Hkv, G, S, D, bits, dtype, device, lens)
    scores, indices, lse = selection(q, k, seq_lens, n, group_select)
    out = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, bits)
    check_tail(scores, seq_lens, lse, indices, codes, meta, bits, out)
    assert torch.equal(out[1:4].cpu(), torch.zeros(3, *out.shape[1:])), "L_b <= N gives zeros"


def skipped_case(B, Hkv, G, S, D, bits, dtype, device, lens, n, skip_first, skip_last,
                 group_select=False):
    """(scores, seq_lens, lse, indices, codes, meta) as a KCache step with hot rows has them: the
    selection from qk_topn over the keys skip_first <= j < L_b - skip_last, the copies of the
    skipped rows NaN (a skipped row must never be weighed), and the scores past L_b the largest
    float: a weight read from one would be infinite (a NaN score weighs 0, which hid a hot slot
    at L_b taken as valid, helper 165's mutant)."""
    q, k, seq_lens, codes, meta = make_case(B, Hkv, G, S, D, bits, dtype, device, lens)
    j = torch.arange(S, device=device)[None, :]  # [1, S]
    end = seq_lens.long()[:, None] - skip_last  # [B, 1]
    meta[((j < skip_first) | (j >= end))[:, None, :, None].expand_as(meta)] = float("nan")
    scores, indices, lse = selection(q, k, seq_lens, n, group_select, None, skip_first,
                                     skip_last)
    past = (j >= seq_lens.long()[:, None])[:, None, :].expand_as(scores)  # [B, Hq, S]
    scores[past] = torch.finfo(torch.float32).max
    return scores, seq_lens, lse, indices, codes, meta


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("skip_first, skip_last", [(4, 60), (0, 7), (31, 33), (5, 0), (2000, 0),
                                                   (0, 2000)])
def test_skipped_keys_are_left_out(device, dtype, group_select, skip_first, skip_last):
    """skip_first / skip_last (KCache's hot rows): the keys j < skip_first and j >= L_b -
    skip_last are left out as if every head had selected them, NaN copies included; L_b below
    skip_first + skip_last (all skipped: zeros) and 0 in the batch."""
    lens = [1025, 700, 64, 40, 0]
    args = skipped_case(len(lens), 2, 4, 1025, 64, 2, dtype, device, lens, 32, skip_first,
                        skip_last, group_select)
    out = kcache_ops.lowbit_tail(*args, 2, skip_first=skip_first, skip_last=skip_last)
    check_tail(*args, 2, out, skip_first, skip_last)
    left = [b for b, L in enumerate(lens) if L <= skip_first + skip_last]
    assert torch.equal(out[left].cpu(), torch.zeros(len(left), *out.shape[1:]))


@pytest.mark.parametrize("bits", [2, 4])
def test_skipping_is_selecting(device, bits):
    """Skipping the first and last keys gives what selecting them in every head gives (how the
    step left out its hot rows before, by appending their positions to the selection)."""
    S, first, last = 700, 4, 60
    lens = [700, 301, 90, 3]
    scores, seq_lens, lse, indices, codes, meta = skipped_case(
        len(lens), 2, 3, S, 128, bits, torch.bfloat16, device, lens, 48, first, last)
    out = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, bits,
                                 skip_first=first, skip_last=last)
    B, Hq, _ = indices.shape
    pos = [list(range(min(first, L))) + list(range(max(first, L - last), L)) for L in lens]
    hot = torch.full((B, Hq, first + last), -1, dtype=torch.int32)  # [B, Hq, H], -1 padding
    for b, p in enumerate(pos):
        hot[b, :, :len(p)] = torch.tensor(p, dtype=torch.int32)
    read = torch.cat([indices, hot.to(device)], -1)  # [B, Hq, N + H]
    want = kcache_ops.lowbit_tail(scores, seq_lens, lse, read, codes, meta, bits)
    torch.testing.assert_close(out, want, atol=OUT_TOL, rtol=OUT_TOL)


@pytest.mark.parametrize("bits", [2, 4])
def test_arbitrary_indices(device, dtype, bits):
    """Random indices with padding, repeats and positions in [L_b, S) (ignored); the reference's
    scores, NaN past L_b."""
    B, Hkv, G, S, D, N = 3, 2, 4, 300, 64, 40
    lens = [300, 123, 7]
    q, k, seq_lens, codes, meta = make_case(B, Hkv, G, S, D, bits, dtype, device, lens)
    indices = torch.randint(0, S, (B, Hkv * G, N), dtype=torch.int32)
    indices[torch.rand(B, Hkv * G, N) < 0.3] = -1
    indices[:, :, 1] = indices[:, :, 0]  # a repeat
    indices = indices.to(device)
    scores, lse = reference_scores(q, k, seq_lens, 0.2)
    out = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, bits)
    check_tail(scores, seq_lens, lse, indices, codes, meta, bits, out)


def nan_row_case(device, bits):
    """(scores, seq_lens, lse, indices, codes, meta): one KV head with 4 query heads, the copy
    of its row 123 a NaN row's (NaN scale and min, as quantize_rows writes for a V row with
    NaN), selected by the first 2 heads only."""
    B, Hkv, G, S, D, n = 1, 1, 4, 600, 128, 8
    q, k, seq_lens, codes, meta = make_case(B, Hkv, G, S, D, bits, torch.float32, device, [S])
    scores, indices, lse = selection(q, k, seq_lens, n, False)
    j = 123
    indices[0, :2, 0] = j  # heads 0 and 1 select j (in place of their first pick)
    indices[0, 2:] = torch.where(indices[0, 2:] == j, -1, indices[0, 2:])  # heads 2, 3 do not
    meta[0, 0, j] = float("nan")
    return scores, seq_lens, lse, indices, codes, meta


def check_nan_row_left_out(tail, device, bits):
    """tail(scores, seq_lens, lse, indices, codes, meta, bits) -> out over :func:`nan_row_case`:
    the heads that selected the NaN row stay finite and equal to the reference, those that did
    not are NaN, as the reference's; then, with their weight of the row 0 (a score of -inf or
    NaN), every head is finite and equal to the reference."""
    args = nan_row_case(device, bits)
    out, ref = tail(*args, bits).cpu(), R.lowbit_tail(*(t.cpu() for t in args), bits)
    assert out[0, 2:].isnan().all() and ref[0, 2:].isnan().all()
    torch.testing.assert_close(out[0, :2], ref[0, :2], atol=OUT_TOL, rtol=OUT_TOL)
    scores = args[0]
    scores[0, 2, 123], scores[0, 3, 123] = float("-inf"), float("nan")  # weight 0, not selected
    out, ref = tail(*args, bits).cpu(), R.lowbit_tail(*(t.cpu() for t in args), bits)
    assert not out.isnan().any() and not ref.isnan().any()
    torch.testing.assert_close(out, ref, atol=OUT_TOL, rtol=OUT_TOL)


@pytest.mark.parametrize("bits", [2, 4])
def test_selected_nan_row_is_left_out(device, bits):
    """A row a head selected is left out exactly, even a NaN one; a head whose weight of the
    row is 0 leaves it out too (:func:`check_nan_row_left_out`)."""
    check_nan_row_left_out(kcache_ops.lowbit_tail, device, bits)


@pytest.mark.parametrize("G", [5, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_rows_past_the_float_range_among_finite_ones(device, G, D):
    """Copies whose values may not be finite (a NaN or inf scale or min: rows 40-42) or are near
    the float range (a min of ±3e38: rows 300, 301) in chunks with finite rows, groups of more
    than 4 heads. KV head 0: the odd heads select all five (finite output), the even heads weigh
    them (NaN, as the reference). KV head 1: every head selects rows 40-42, the odd heads also
    300 and 301, which the even heads weigh (finite). Row 650 (a scale of 3e38) weighs 0 for
    every head: left out. Each head's output is the reference's (the CPU's sums in registers
    take such rows apart, row by row)."""
    torch.manual_seed(0)
    B, Hkv, S, n, bits = 1, 2, 700, 8, 2
    q, k, seq_lens, codes, meta = make_case(B, Hkv, G, S, D, bits, torch.float32, device, [S])
    scores, indices, lse = selection(q, k, seq_lens, n, False)
    bad = {40: (float("nan"), 0.5), 41: (0.5, float("inf")), 42: (float("-inf"), 1.0),
           300: (1.0, 3e38), 301: (1.0, -3e38), 650: (3e38, 0.0)}  # position -> (scale, min)
    for j, (step, base) in bad.items():
        meta[:, :, j] = torch.tensor([step, base], dtype=torch.bfloat16, device=device)
    scores[:, :, 650] = float("-inf")
    rows = torch.tensor([40, 41, 42, 300, 301], dtype=torch.int32, device=device)
    indices[0, 1:G:2, :5] = rows  # KV head 0's odd heads
    indices[0, G:, :3] = rows[:3]  # KV head 1's heads
    indices[0, G + 1::2, 3:5] = rows[3:]  # and its odd ones
    args = (scores, seq_lens, lse, indices, codes, meta)
    out = kcache_ops.lowbit_tail(*args, bits).cpu()  # [B, Hq, D]
    ref = R.lowbit_tail(*(t.cpu() for t in args), bits)
    assert ref[0, 0:G:2].isnan().all() and ref[0, 1:G:2].isfinite().all()
    assert ref[0, G:].isfinite().all() and ref[0, G::2].abs().max() > 1e30
    torch.testing.assert_close(out, ref, atol=OUT_TOL, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("bits", [2, 4])
def test_v_near_the_float_range_gives_a_finite_tail(device, bits):
    """Finite V rows up to ±3.4e38 (spans past the float range): quantize_rows keeps their copies
    finite, so the tail is finite and the reference's (within float32 rounding of ~2^126)."""
    B, Hkv, G, S, D = 2, 2, 2, 300, 64
    q, k, seq_lens, _, _ = make_case(B, Hkv, G, S, D, bits, torch.float32, device, [300, 177])
    codes, meta = kcache_ops.quantize_rows(v_near_the_float_range(B, Hkv, S, D).to(device), bits)
    scores, indices, lse = selection(q, k, seq_lens, 16, False)
    out = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, bits)
    assert out.isfinite().all()
    ref = R.lowbit_tail(scores.cpu(), seq_lens.cpu(), lse.cpu(), indices.cpu(), codes.cpu(),
                        meta.cpu(), bits)
    torch.testing.assert_close(out.cpu(), ref, atol=2.0 ** 126 * 1e-5, rtol=1e-5)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_completes_exact_attention(device, dtype, group_select):
    """sparse_attn_v over the selected rows (full-softmax weights) plus the tail is attention over
    V whose unselected rows are their low-bit copies; with no row selected the tail alone is it."""
    B, Hkv, G, S, D, n, bits = 2, 2, 3, 500, 128, 32, 2
    lens = [500, 251]
    q, k, seq_lens, codes, meta = make_case(B, Hkv, G, S, D, bits, dtype, device, lens)
    v = torch.randn(B, Hkv, S, D)  # the exact rows read from host
    scores, indices, lse, every = kcache_ops.qk_topn(q, k, seq_lens, n, None, group_select,
                                                     return_scores=True)
    head = kcache_ops.sparse_attn_v(scores, indices, host_tensor(v, device), lse,
                                  renormalize=False)
    tail = kcache_ops.lowbit_tail(every, seq_lens, lse, indices, codes, meta, bits)
    low = R.dequantize_rows(codes.cpu(), meta.cpu(), D).repeat_interleave(G, 1)  # [B, Hq, S, D]
    idx = indices.cpu().long()  # [B, Hq, n]
    chosen = torch.zeros(B, Hkv * G, S + 1, dtype=torch.bool)  # slot S: padding
    chosen.scatter_(-1, torch.where(idx >= 0, idx, S), True)
    mixed = torch.where(chosen[..., :S, None], v.repeat_interleave(G, 1), low)  # [B, Hq, S, D]
    s, _ = R.qk_scores(q.cpu(), k.cpu(), seq_lens.cpu())  # [B, Hq, S]
    want = torch.einsum("bhs,bhsd->bhd", torch.softmax(s, -1), mixed.nan_to_num(0.0))
    torch.testing.assert_close(head.cpu().float() + tail.cpu(), want, atol=OUT_TOL, rtol=OUT_TOL)
    none = torch.full_like(indices, -1)
    alone = kcache_ops.lowbit_tail(every, seq_lens, lse, none, codes, meta, bits)
    want = torch.einsum("bhs,bhsd->bhd", torch.softmax(s, -1), low.nan_to_num(0.0))
    torch.testing.assert_close(alone.cpu(), want, atol=OUT_TOL, rtol=OUT_TOL)


@pytest.mark.parametrize("H", [1, 5, 64, 200])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_hot_rows(device, dtype, group_select, H):
    """hot_v / hot_pos: the exact device rows added with their weights exp(s − lse) in the same
    call (KCache's hot rows: the skipped first and last keys); empty slots, positions at or past
    L_b (NaN and inf rows there), repeats; the rows in the model's dtype; H over a block's tile
    of 128 slots; 1 chunk and several (L_b up to 2999)."""
    lens = [2999, 333, 0, 1]
    B, Hkv, G, S, D, first, last = len(lens), 2, 3, 3000, 64, 4, 60
    args = skipped_case(B, Hkv, G, S, D, 2, dtype, device, lens, 24, first, last, group_select)
    hot_v, hot_pos = hot_rows_case(B, Hkv, H, D, S, lens, dtype, device)
    out = kcache_ops.lowbit_tail(*args, 2, skip_first=first, skip_last=last, hot_v=hot_v,
                                 hot_pos=hot_pos)
    cpu = [t.cpu() for t in args]
    ref = R.lowbit_tail(*cpu, 2, first, last, hot_v.cpu(), hot_pos.cpu())
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu(), ref, atol=OUT_TOL, rtol=OUT_TOL)
    alone = R.hot_rows(cpu[0], cpu[1], cpu[2], hot_v.cpu(), hot_pos.cpu())  # [B, Hq, D]
    assert alone.abs().sum() > 0, "some hot row must count"


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_hot_rows_of_no_slot(device, dtype, group_select):
    """hot_v [B, Hkv, 0, D] and hot_pos [B, 0] (a cache with no hot rows left to add) give the
    same bits as no hot rows given, 1 chunk and several."""
    lens = [2999, 333, 0, 1]
    B, Hkv, G, S, D, first, last = len(lens), 2, 3, 3000, 64, 4, 60
    args = skipped_case(B, Hkv, G, S, D, 2, dtype, device, lens, 24, first, last, group_select)
    hot_v, hot_pos = hot_rows_case(B, Hkv, 0, D, S, lens, dtype, device)
    out = kcache_ops.lowbit_tail(*args, 2, skip_first=first, skip_last=last, hot_v=hot_v,
                                 hot_pos=hot_pos)
    alone = kcache_ops.lowbit_tail(*args, 2, skip_first=first, skip_last=last)
    assert alone[0].abs().sum() > 0, "the tail must count"
    assert torch.equal(out, alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hot_rows_nan_and_overflowing_weights(device, dtype):
    """A hot row whose score is NaN (at a valid position) weighs 0, its row adding nothing, and
    one whose exp(s − lse) overflows weighs the largest float (as in the tail): no NaN, the
    reference's output."""
    B, Hkv, G, S, D, H, first = 2, 2, 3, 40, 64, 4, 4
    lens = seq_lens_tensor([40, 9], "cpu")
    Hq = Hkv * G
    scores = torch.randn(B, Hq, S)
    lse = scores.logsumexp(-1) + 1.0  # [B, Hq]
    indices = torch.stack([torch.randperm(9)[:3] + first for _ in range(B * Hq)]).view(
        B, Hq, 3).int()  # [B, Hq, 3] selected past the skipped keys
    codes, meta = R.quantize_rows(torch.randn(B, Hkv, S, D), 2)
    hot_pos = torch.arange(H, dtype=torch.int32).repeat(B, 1)  # [B, H]: the skipped keys
    hot_v = (torch.randn(B, Hkv, H, D) * 1e-3).to(dtype)  # small: an overflowing weight's row
    scores[:, :, 1] = float("nan")  # every head: a NaN weight at a valid hot position
    scores[:, ::2, 2] = lse[:, ::2] + 200.0  # every other head: exp overflows (+inf)
    args = [t.to(device) for t in (scores, lens, lse, indices, codes, meta)]
    out = kcache_ops.lowbit_tail(*args, 2, skip_first=first, hot_v=hot_v.to(device),
                                 hot_pos=hot_pos.to(device))
    ref = R.lowbit_tail(scores, lens, lse, indices, codes, meta, 2, first, 0, hot_v, hot_pos)
    assert not out.isnan().any() and out.isfinite().all()
    assert (out[:, ::2].abs().amax(-1) > 1e30).all(), "the overflowing weight must count"
    torch.testing.assert_close(out.cpu(), ref, atol=OUT_TOL, rtol=OUT_TOL)


def test_hot_rows_are_the_skipped_keys_exactly(device):
    """The hot rows given as the skipped keys' own V: tail + hot rows is the tail over V whose
    skipped rows are exact (what the decode step with hot rows computes)."""
    lens, first, last, D = [700, 90], 4, 60, 128
    B, Hkv, G, S = len(lens), 2, 4, 700
    args = skipped_case(B, Hkv, G, S, D, 4, torch.bfloat16, device, lens, 32, first, last)
    v = torch.randn(B, Hkv, S, D)  # V's exact rows
    H = first + last
    pos = torch.tensor([list(range(first)) + list(range(L - last, L)) for L in lens],
                       dtype=torch.int32)  # [B, H]
    hot_v = torch.gather(v, 2, pos.long()[:, None, :, None].expand(B, Hkv, H, D))
    out = kcache_ops.lowbit_tail(*args, 4, skip_first=first, skip_last=last,
                                 hot_v=hot_v.to(device), hot_pos=pos.to(device))
    cold = kcache_ops.lowbit_tail(*args, 4, skip_first=first, skip_last=last)
    scores, _, lse = (t.cpu() for t in (args[0], args[1], args[2]))
    p = torch.exp(torch.gather(scores, 2, pos.long()[:, None, :].expand(B, Hkv * G, H))
                  - lse[..., None])  # [B, Hq, H]
    exact = torch.einsum("bhi,bhid->bhd", p, hot_v.repeat_interleave(G, 1))
    torch.testing.assert_close(out.cpu(), cold.cpu() + exact, atol=OUT_TOL, rtol=OUT_TOL)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("B, Hkv", [(1, 1), (1, 3), (5, 1)])
@pytest.mark.parametrize("D", [64, 128])
def test_rows_split_across_threads_give_the_same_bits(B, Hkv, D, group_select):
    """CPU groups that do not spread evenly over the threads (B·Hkv not a multiple of them and
    under 4 each) run with their rows split into chunks of 4096 keys: the output bit for bit as
    on one thread (no split), with lengths of 0, 1, one chunk, one summed key past it and
    several, skipped keys and hot rows, after a call with other indices (the kept scratch
    rewritten), and still the reference's."""
    torch.manual_seed(0)
    S, G, n, first, last = 3 * 4096 + 100, 3, 40, 4, 60
    lens = [S, 4096 + 1 + last, 0, 1, 4096][:B]
    args = skipped_case(B, Hkv, G, S, D, 2, torch.float32, "cpu", lens, n, first, last,
                        group_select)
    hot_v, hot_pos = hot_rows_case(B, Hkv, 9, D, S, lens, torch.float32, "cpu")
    other = list(args)
    other[3] = torch.where(args[3] >= 0, (args[3] + 1) % (S - last), -1)  # [B, Hq, n]

    def run(a):
        return kcache_ops.lowbit_tail(*a, 2, skip_first=first, skip_last=last, hot_v=hot_v,
                                      hot_pos=hot_pos)

    want = on_threads(1, lambda: run(args))
    torch.testing.assert_close(want, R.lowbit_tail(*args, 2, first, last, hot_v, hot_pos),
                               atol=OUT_TOL, rtol=OUT_TOL)
    for threads in (2, 3, 4):
        on_threads(threads, lambda: run(other))
        torch.testing.assert_close(on_threads(threads, lambda: run(args)), want, rtol=0, atol=0)


# s - lse of the keys of float_limit_weights_case: a weight past the float range, one just under
# it, a subnormal one, one that underflows, -inf and NaN
FLOAT_LIMIT_D = (100.0, 88.5, -90.0, -110.0, float("-inf"), float("nan"))
# CUDA sums w * scale * code on the tensor cores in tf32 (lowbit_tail's docstring): a product
# below 2^-112 is a subnormal there and counts within this of itself, per weighed key; float32
# outputs that small are subnormals too, themselves short of 24 significant bits
TF32_SUBNORMAL_FLOOR = 2.0 ** -133


def float_limit_weights_case():
    """lowbit_tail's arguments (bits 2) where head i and head 6 + i weigh one key by
    exp(FLOAT_LIMIT_D[i]) (lse 0, a garbage one, never qk_topn's), in a vectorised loop's first
    8 keys and in its remainder; every other key weighs 0 and nothing is selected."""
    torch.manual_seed(0)
    d = torch.tensor(FLOAT_LIMIT_D)  # s - lse
    G, S, D = 2 * len(d), 21, 64
    scores = torch.full((1, G, S), float("-inf"))  # [1, G, S]; lse 0: every other key weighs 0
    scores[0, :len(d), 3] = d  # in the first 8 keys
    scores[0, len(d):, S - 2] = d  # in the remainder: 21 = 2 * 8 + 5
    lse = torch.zeros(1, G)  # [1, G]
    indices = torch.full((1, G, 1), -1, dtype=torch.int32)  # [1, G, 1]: nothing selected
    codes = torch.randint(0, 256, (1, 1, S, D // 4), dtype=torch.uint8)  # [1, 1, S, D / 4]
    meta = torch.tensor([0.25, 0.125]).expand(1, 1, S, 2).to(torch.bfloat16)  # rows in (0, 1)
    return scores, torch.tensor([S], dtype=torch.int32), lse, indices, codes, meta


def check_float_limit_weights(out, ref, atol):
    """out [1, 12, 64] of float_limit_weights_case against the reference's: close, the weight
    past the range the largest float, the subnormal one kept, the rest 0."""
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5)
    n = len(FLOAT_LIMIT_D)
    big, under, gone = out[0, 0::n], out[0, 2::n], out[0, 3::n]  # [2, D] each
    assert big.isfinite().all() and (big > 1e37).all()
    assert (under > 0).all() and (under < 1e-38).all()
    assert (gone == 0).all() and (out[0, 4::n] == 0).all() and (out[0, 5::n] == 0).all()


def test_weights_at_the_float_limits(device):
    """Scores far from lse weigh as the reference weighs them, in a vectorised loop's 8-key steps
    and in its remainder: exp past the float range counts as the largest float, exp just under
    it is itself, a subnormal weight is kept, and one that underflows, a score of -inf and a NaN
    one weigh 0. Exact to 1e-5 on the CPU; on CUDA the subnormal outputs within
    TF32_SUBNORMAL_FLOOR (one weighed key each)."""
    args = float_limit_weights_case()
    out = kcache_ops.lowbit_tail(*(t.to(device) for t in args), 2).cpu()  # [1, G, D]
    check_float_limit_weights(out, R.lowbit_tail(*args, 2),
                              0 if device == "cpu" else TF32_SUBNORMAL_FLOOR)


def test_strided_inputs(device, dtype):
    """The cache's views: codes and meta [:, :, :T] slices of wider buffers (and every other
    head), meta's rows also 4 apart (not 2: the CPU's other meta loop), scores a slice of every
    other head's, lse and indices transposed views; strides honoured, nothing copied."""
    B, Hkv, G, S, D, n, bits = 2, 2, 3, 97, 64, 16, 4
    lens = [97, 50]
    q, k, _, codes, meta = make_case(B, 2 * Hkv, G, S + 11, D, bits, dtype, device,
                                     [L + 5 for L in lens])
    k, codes, meta = (t[:, ::2, 5:S + 5] for t in (k, codes, meta))
    wide_meta = torch.full((*meta.shape[:3], 4), float("nan"), dtype=meta.dtype, device=device)
    wide_meta[..., :2] = meta
    meta = wide_meta[..., :2]  # [B, Hkv, S, 2], rows 4 apart
    seq_lens = seq_lens_tensor(lens, device)
    q = q.view(B, 2 * Hkv, G, D)[:, ::2].reshape(B, Hkv * G, D).transpose(0, 1).contiguous()
    q = q.transpose(0, 1)
    scores, indices, lse = selection(q, k, seq_lens, n, False)
    wide = torch.full((B, 2 * Hkv * G, S + 3), float("nan"), device=device)  # [B, 2 Hq, S + 3]
    wide[:, ::2, 2:S + 2] = scores
    scores = wide[:, ::2, 2:S + 2]  # [B, Hq, S]
    indices = indices.transpose(0, 1).contiguous().transpose(0, 1)
    lse = lse.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (scores, codes, meta, indices, lse))
    out = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, bits)
    check_tail(scores, seq_lens, lse, indices, codes, meta, bits, out)


def keys_apart(scores):
    """scores [B, Hq, S] as a view of a [B, S, Hq + 1] buffer whose extra column is NaN: keys not
    adjacent (key stride Hq + 1)."""
    B, Hq, S = scores.shape
    wide = torch.full((B, S, Hq + 1), float("nan"), device=scores.device)  # [B, S, Hq + 1]
    wide[..., 1:] = scores.transpose(1, 2)
    apart = wide[..., 1:].transpose(1, 2)  # [B, Hq, S]
    assert apart.stride(2) == Hq + 1
    return apart


def test_scores_keys_apart(device, dtype):
    """Scores whose keys are not adjacent (keys_apart): honoured, where the CPU gathers each
    head's scores before weighing them and otherwise reads them in place."""
    B, Hkv, G, S, D, n, bits = 2, 2, 3, 333, 128, 16, 2
    lens = [333, 170]
    q, k, seq_lens, codes, meta = make_case(B, Hkv, G, S, D, bits, dtype, device, lens)
    scores, indices, lse = selection(q, k, seq_lens, n, False)
    scores = keys_apart(scores)  # [B, Hq, S], key stride Hq + 1
    out = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, bits)
    check_tail(scores, seq_lens, lse, indices, codes, meta, bits, out)


@pytest.mark.parametrize("check_values", [True, False], ids=["", "unchecked"])
def test_strided_seq_lens_and_hot_rows(device, dtype, check_values):
    """seq_lens every other element of a buffer whose others lie outside [0, S] (read, they
    would fail the check, or clamp to other lengths and weigh the NaN rows past L_b), hot_v
    every other head of a wider buffer from its row 1, hot_pos every other element of its rows
    beside other valid positions: strides honoured, with the value checks and without, the
    reference's output over contiguous copies."""
    lens = [2999, 333, 41, 0]
    B, Hkv, G, S, D, H, first, last = len(lens), 2, 3, 3000, 64, 9, 4, 60
    scores, seq_lens, *rest = skipped_case(B, Hkv, G, S, D, 2, dtype, device, lens, 24, first,
                                           last)
    hot_v, hot_pos = hot_rows_case(B, Hkv, H, D, S, lens, dtype, device)
    beside = torch.tensor([S + 1, -3, S + 7, -2 ** 31], dtype=torch.int32, device=device)
    wide_lens = torch.stack([seq_lens, beside], 1)[:, 0]  # [B], stride 2
    wide_v = torch.randn(B, 2 * Hkv, H + 3, D, device=device).to(dtype)  # [B, 2 Hkv, H + 3, D]
    wide_v[:, ::2, 1:H + 1] = hot_v
    other = (torch.rand(B, H, device=device) * torch.tensor(lens, device=device)[:, None]).int()
    wide_pos = torch.stack([hot_pos, other], 2)[..., 0]  # [B, H], strides (2 H, 2)
    hot_args = dict(hot_v=wide_v[:, ::2, 1:H + 1], hot_pos=wide_pos)
    assert not any(t.is_contiguous() for t in (wide_lens, *hot_args.values()))
    out = kcache_ops.lowbit_tail(scores, wide_lens, *rest, 2, check_values, first, last,
                                 **hot_args)
    cpu = [t.cpu() for t in (scores, seq_lens, *rest)]
    ref = R.lowbit_tail(*cpu, 2, first, last, hot_v.cpu(), hot_pos.cpu())
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu(), ref, atol=OUT_TOL, rtol=OUT_TOL)


def test_empty_batch(device):
    _, _, seq_lens, codes, meta = make_case(0, 2, 2, 16, 64, 2, torch.float32, device, [])
    scores = torch.zeros(0, 4, 16, device=device)
    lse = torch.zeros(0, 4, device=device)
    indices = torch.zeros(0, 4, 3, dtype=torch.int32, device=device)
    out = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, 2)
    assert out.shape == (0, 4, 64) and out.dtype == torch.float32


def test_empty_cache(device):
    """A cache of no rows (S = 0) over several sequences and heads: zeros, as the reference."""
    _, _, seq_lens, codes, meta = make_case(2, 2, 2, 0, 64, 2, torch.float32, device, [0, 0])
    scores = torch.zeros(2, 4, 0, device=device)  # [B, Hq, S]
    lse = torch.full((2, 4), float("-inf"), device=device)  # [B, Hq]
    indices = torch.full((2, 4, 3), -1, dtype=torch.int32, device=device)  # [B, Hq, N]
    out = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, 2)
    assert torch.equal(out.cpu(), torch.zeros(2, 4, 64))
    check_tail(scores, seq_lens, lse, indices, codes, meta, 2, out)


def test_check_values_off(device):
    """check_values=False (no value read-back on CUDA) changes no output and passes opcheck (with
    hot rows too)."""
    q, k, seq_lens, codes, meta = make_case(2, 2, 4, 97, 64, 2, torch.float32, device, [97, 30])
    scores, indices, lse = selection(q, k, seq_lens, 16, True, 0.125)
    want = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, 2)
    got = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, 2,
                                 check_values=False)
    assert torch.equal(got, want)
    for skips in ((0, 0), (3, 20)):
        torch.library.opcheck(torch.ops.kcache_ops.lowbit_tail.default,
                              (scores, seq_lens, lse, indices, codes, meta, 2, False, *skips))
    hot_v, hot_pos = hot_rows_case(2, 2, 23, 64, 97, [97, 30], torch.bfloat16, device)
    torch.library.opcheck(torch.ops.kcache_ops.lowbit_tail.default,
                          (scores, seq_lens, lse, indices, codes, meta, 2, False, 3, 20, hot_v,
                           hot_pos))


def test_compile_decode_step_with_tail(device):
    """torch.compile (fullgraph) over qk_topn, sparse_attn_v with full-softmax weights and the
    tail: the same output as eager."""
    def decode(q, k, v, lens, codes, meta):
        scores, indices, lse, every = kcache_ops.qk_topn(q, k, lens, 8, return_scores=True)
        head = kcache_ops.sparse_attn_v(scores, indices, v, lse, renormalize=False)
        return head.float() + kcache_ops.lowbit_tail(every, lens, lse, indices, codes, meta, 4)

    q, k, lens, codes, meta = make_case(3, 1, 4, 97, 128, 4, torch.float32, device, [97, 5, 0])
    v = host_tensor(torch.randn(3, 1, 97, 128), device)
    compiled = torch.compile(decode, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, lens, codes, meta),
                               decode(q, k, v, lens, codes, meta))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4, 8]),
       S=st.integers(1, 600), n=st.integers(1, 80), D=st.sampled_from([64, 128]),
       bits=st.sampled_from([2, 4]), dtype=st.sampled_from(DTYPES), group_select=st.booleans(),
       skip_first=st.integers(0, 70), skip_last=st.integers(0, 70), data=st.data())
def test_random_shapes(B, Hkv, G, S, n, D, bits, dtype, group_select, skip_first, skip_last,
                       data):
    lens = data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    for device in DEVICES:
        args = skipped_case(B, Hkv, G, S, D, bits, dtype, device, lens, n, skip_first,
                            skip_last, group_select)
        out = kcache_ops.lowbit_tail(*args, bits, skip_first=skip_first, skip_last=skip_last)
        check_tail(*args, bits, out, skip_first, skip_last)


@requires_cuda
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("shape", [(32, 8, 128), (9, 3, 64)], ids=str)
def test_cuda_long_rows_deterministic(shape, group_select):
    """128K keys at batch 1 and 32K at batch 4 (keys split across blocks, partials reduced in a
    fixed order): the reference's output, bit-identical on a second run."""
    Hq, Hkv, D = shape
    for B, S in ((1, 131072), (4, 32768)):
        lens = [S] + [S - 1001 * b for b in range(1, B)]
        q, k, seq_lens, codes, meta = make_case(B, Hkv, Hq // Hkv, S, D, 2, torch.bfloat16,
                                                "cuda", lens)
        scores, indices, lse = selection(q, k, seq_lens, 64, group_select)
        out = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, 2)
        check_tail(scores, seq_lens, lse, indices, codes, meta, 2, out)
        again = kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, 2)
        assert torch.equal(out, again), "not deterministic"


@requires_cuda
def test_cuda_graph_replay():
    """qk_topn and lowbit_tail with check_values=False captured in a CUDA graph, replayed on new
    values in the static buffers (lengths included)."""
    B, Hkv, G, S, D, n, bits = 3, 2, 4, 4096, 128, 64, 4
    q, k, seq_lens, codes, meta = make_case(B, Hkv, G, S, D, bits, torch.bfloat16, "cuda",
                                            [S] * B)

    def step():
        _, indices, lse, every = kcache_ops.qk_topn(q, k, seq_lens, n, None, True,
                                                    check_values=False, return_scores=True)
        out = kcache_ops.lowbit_tail(every, seq_lens, lse, indices, codes, meta, bits,
                                     check_values=False)
        return out, every, indices, lse

    graph, (out, every, indices, lse) = capture_graph(step)
    for lens in ([S, 3000, 17], [0, 64, 4095]):
        fresh = make_case(B, Hkv, G, S, D, bits, torch.bfloat16, "cuda", lens)
        for static, new in zip((q, k, seq_lens, codes, meta), fresh):
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        check_tail(every, seq_lens, lse, indices, codes, meta, bits, out)
