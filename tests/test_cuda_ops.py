"""The CUDA kernels against the float32 reference: odd sizes, GQA slices, N up to 4096, exact ties,
NaN inputs, strided inputs, long sequences (32K-128K tokens, batch up to 64, N up to 1024), the
mean tail of sparse_attn_v and the value checks."""
import pytest
import torch

import kcache_ops
from kcache_ops import reference
from cuda_checks import (capture_graph, check_topn, default_scale, host_random, random_case,
                         ref_scores, requires_cuda)
from test_sparse_attn_v import assert_rounded_close

# conftest: outputs start as NaN (the ops' at::empty, scratch included, fills them under torch's
# deterministic mode; a fill is a kernel on the current stream, captured into a CUDA graph like
# the op, so every replay poisons the outputs again: no host sync, nothing value-dependent)
pytestmark = [requires_cuda, pytest.mark.usefixtures("poisoned_outputs")]

# (Hq, Hkv, D): Llama-3-8B, SmolLM2, MHA, a group of 16 (two slices of 8 query heads)
SHAPES = [(32, 8, 128), (9, 3, 64), (4, 4, 64), (16, 1, 128)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# sparse_attn_v's output against the reference, whose float32 result is rounded to the dtype of V
# (reference.sparse_attn_v rounds it; light_sparse_attn_v's is rounded by the check): as the
# device-generic tests check it on the CPU and on CUDA, test_sparse_attn_v.assert_rounded_close,
# within 1e-5 plus one unit in the dtype's last place. The kernel's arithmetic gives it: weights
# exp(s - bias) by expf (no fast math), the p_i v_i, the mean tail's c_h v_sum and the sums of
# lanes and warps all in float32, and the float32 sum rounded once to the dtype (__float2half_rn,
# __float2bfloat16_rn); so it differs from the reference's float32 result by summation order and
# expf's ulps alone (about 1e-6 of the sum of |p_i v_i| here, under 1e-5), and the two rounded
# values by at most that plus one unit. The dtype's own tolerance (1.6e-2 for bfloat16, the bound
# these tests had) let an entry of weight 0.005 be dropped unseen (test_sparse_attn_v).


def host_copy(t):
    """t as pinned, device-mapped host memory (kcache_ops.alloc_host)."""
    h = kcache_ops.alloc_host(t.shape, t.dtype)
    h.copy_(t)
    return h


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("S", [1, 97, 1025, 5000])
@pytest.mark.parametrize("n", [1, 64, 1024])
@pytest.mark.parametrize("group_select", [False, True])
def test_qk_topn_matches_reference(dtype, shape, S, n, group_select):
    Hq, Hkv, D = shape
    q, k, lens = random_case(3, Hq, Hkv, S, D, dtype, lens=[S, S // 2, 0], seed=S * n + Hq)
    scale = default_scale(D)
    scores, idx, lse = kcache_ops.qk_topn(q, k, lens, n, scale, group_select)
    s_ref, lse_ref = ref_scores(q, k, lens, scale)
    check_topn(scores, idx, lse, s_ref, lse_ref, lens.cpu(), n, Hq // Hkv if group_select else None)


@pytest.mark.parametrize("group_select", [False, True])
@pytest.mark.parametrize("n", [1, 7, 300, 4096])
def test_qk_topn_exact_ties(group_select, n):
    """Integer-valued scores (many ties): exactly the reference's indices, ties to the lower
    index."""
    Hq, Hkv, D, S = 8, 2, 64, 6000
    q, k, lens = random_case(2, Hq, Hkv, S, D, torch.float32, lens=[S, 4500], integer=True, seed=n)
    if group_select:  # identical queries in a group keep the group mass a function of s alone
        q = q.view(2, Hkv, Hq // Hkv, D)[:, :, :1].expand(2, Hkv, Hq // Hkv, D).reshape(2, Hq, D)
    got = kcache_ops.qk_topn(q, k, lens, n, 1.0, group_select)
    want = reference.qk_topn(q, k, lens, n, 1.0, group_select)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("group_select", [False, True])
@pytest.mark.parametrize("shape", [(2, 8, 2, 64, 6000, 7), (8, 32, 8, 128, 32768, 64)],
                         ids=["6000x2_n7", "32Kx8_n64"])
def test_a_split_row_merges_the_same_every_run(shape, group_select):
    """A long row's selection is split over several blocks and merged by whichever finishes last
    (a ticket from an atomic counter between fences, the other blocks' picks read through L2): a
    lost or early merge would be a race, rare in any one run. 200 runs, each exactly the
    reference's selection (integer scores: exact ties, ties to the lower index). The first shape
    sorts its 7 picks in one warp; the second is 32K x 8 per head, unstaged, and group_select."""
    B, Hq, Hkv, D, S, n = shape
    q, k, lens = random_case(B, Hq, Hkv, S, D, torch.float32, lens=[S] * (B - 1) + [S - 1001],
                             integer=True, seed=S + n)
    if group_select:  # identical queries in a group keep the group mass a function of s alone
        G = Hq // Hkv
        q = q.view(B, Hkv, G, D)[:, :, :1].expand(B, Hkv, G, D).reshape(B, Hq, D)
    want = reference.qk_topn(q.cpu(), k.cpu(), lens.cpu(), n, 1.0, group_select)
    wrong = 0
    for _ in range(200):
        scores, indices, _ = kcache_ops.qk_topn(q, k, lens, n, 1.0, group_select)
        wrong += int(not (torch.equal(indices.cpu(), want[1])
                          and torch.equal(scores.cpu(), want[0])))
    assert wrong == 0, f"{wrong} of 200 runs selected other rows than the reference"


@pytest.mark.parametrize("group_select", [False, True])
def test_qk_topn_nan_across_chunks(group_select):
    """A NaN in q, or in one K row far into a long row (another chunk of the score pass, another
    warp of the merges), gives NaN lse for the heads it reaches and otherwise the reference's exact
    outputs; a NaN past L_b is never read."""
    Hq, Hkv, D, S, n = 8, 2, 128, 6000, 300
    q, k, lens = random_case(3, Hq, Hkv, S, D, torch.float32, lens=[S, 4500, S], integer=True,
                             seed=7)
    q = q.view(3, Hkv, Hq // Hkv, D)[:, :, :1].expand(3, Hkv, Hq // Hkv, D).reshape(3, Hq, D)
    q = q.clone()
    q[2, 6, 100] = float("nan")
    k[0, 1, 5321, 7] = float("nan")
    k[1, 0, 4700, 0] = float("nan")  # past L_1 = 4500
    got = kcache_ops.qk_topn(q, k, lens, n, 1.0, group_select)
    want = reference.qk_topn(q.cpu(), k.cpu(), lens.cpu(), n, 1.0, group_select)
    assert got[2].isnan().sum() == Hq // Hkv + 1
    torch.testing.assert_close(got[2].cpu(), want[2], equal_nan=True)
    assert torch.equal(got[1].cpu(), want[1])
    torch.testing.assert_close(got[0].cpu(), want[0], atol=0, rtol=0, equal_nan=True)


def test_qk_topn_strided_inputs():
    """k_cache a slice of a larger cache along S, q a slice along D: strides are honoured."""
    q_big = torch.randn(2, 8, 192, device="cuda", dtype=torch.bfloat16)
    k_big = torch.randn(2, 2, 3000, 128, device="cuda", dtype=torch.bfloat16)
    q, k = q_big[:, :, :128], k_big[:, :, :2500]
    lens = torch.tensor([2500, 1999], device="cuda", dtype=torch.int32)
    scores, idx, lse = kcache_ops.qk_topn(q, k, lens, 50)
    s_ref, lse_ref = ref_scores(q, k, lens, default_scale(128))
    check_topn(scores, idx, lse, s_ref, lse_ref, lens.cpu(), 50)


# (B, S, n, (Hq, Hkv, D)): long sequences, large batch, N up to 1024
LONG = [(1, 131072, 1024, (32, 8, 128)), (4, 65536, 64, (32, 8, 128)),
        (64, 32768, 1024, (32, 8, 128)), (16, 32768, 256, (9, 3, 64))]


@pytest.mark.parametrize("B,S,n,shape", LONG, ids=str)
@pytest.mark.parametrize("group_select", [False, True])
def test_qk_topn_long(B, S, n, shape, group_select):
    Hq, Hkv, D = shape
    q, k, lens = random_case(B, Hq, Hkv, S, D, torch.bfloat16, seed=B + S)
    lens[0] = S
    scores, idx, lse = kcache_ops.qk_topn(q, k, lens, n, default_scale(D), group_select)
    s_ref, lse_ref = ref_scores(q, k, lens, default_scale(D))
    check_topn(scores, idx, lse, s_ref, lse_ref, lens.cpu(), n, Hq // Hkv if group_select else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("group_select", [False, True])
@pytest.mark.parametrize("renormalize", [True, False])
def test_sparse_attn_v_matches_reference(dtype, shape, group_select, renormalize):
    Hq, Hkv, D = shape
    B, S, n = 3, 777, 100
    q, k, lens = random_case(B, Hq, Hkv, S, D, dtype, lens=[S, 40, 0], seed=Hq * D)
    v = host_copy(torch.randn(B, Hkv, S, D, dtype=dtype))
    scores, idx, lse = kcache_ops.qk_topn(q, k, lens, n, None, group_select)
    out = kcache_ops.sparse_attn_v(scores, idx, v, lse, renormalize)
    want = reference.sparse_attn_v(scores.cpu(), idx.cpu(), v, lse.cpu(), renormalize)
    assert out.is_cuda and out.dtype == dtype and out.shape == (B, Hq, D)
    assert_rounded_close(out, want.float())
    assert (out[2] == 0).all()  # no valid entry: zeros


def row_sums(v_cache, seq_lens):
    """v_sum [B, Hkv, D] float32 on the GPU: the sum of the rows j < L_b of host v_cache."""
    return torch.stack([v_cache[b, :, :L].float().sum(1)
                        for b, L in enumerate(seq_lens.tolist())]).cuda()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("group_select", [False, True])
def test_sparse_attn_v_mean_tail(dtype, shape, group_select):
    """The decode step as the cache runs it with tail="mean": L_b > n, L_b <= n (exact attention)
    and L_b = 0 (zeros)."""
    Hq, Hkv, D = shape
    B, S, n = 3, 777, 100
    q, k, lens = random_case(B, Hq, Hkv, S, D, dtype, lens=[S, 40, 0], seed=Hq * D + 1)
    v = host_copy(torch.randn(B, Hkv, S, D, dtype=dtype))
    v_sum = row_sums(v, lens)
    scores, idx, lse = kcache_ops.qk_topn(q, k, lens, n, None, group_select, check_values=False)
    out = kcache_ops.sparse_attn_v(scores, idx, v, lse, False, check_values=False, v_sum=v_sum,
                                   seq_lens=lens)
    want = reference.sparse_attn_v(scores.cpu(), idx.cpu(), v, lse.cpu(), False, v_sum.cpu(),
                                   lens.cpu())
    assert out.is_cuda and out.dtype == dtype and out.shape == (B, Hq, D)
    assert_rounded_close(out, want.float())
    exact = kcache_ops.sparse_attn_v(scores, idx, v, lse, False)
    torch.testing.assert_close(out[1], exact[1])  # every row selected: no tail
    assert (out[2] == 0).all()


def test_sparse_attn_v_mean_tail_graph_replay():
    """The decode step with the mean tail captured in a CUDA graph (no sync, no value-dependent
    allocation) and replayed on new lengths, V and v_sum copied into its static buffers."""
    B, Hq, Hkv, S, D, n = 4, 8, 2, 1000, 128, 64
    dtype = torch.bfloat16
    q = torch.randn(B, Hq, D, device="cuda", dtype=dtype)  # static inputs
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype)
    lens = torch.tensor([S, 700, 40, 0], device="cuda", dtype=torch.int32)
    v = host_copy(torch.randn(B, Hkv, S, D, dtype=dtype))
    v_sum = row_sums(v, lens)

    def step():
        scores, idx, lse = kcache_ops.qk_topn(q, k, lens, n, None, True, check_values=False)
        out = kcache_ops.sparse_attn_v(scores, idx, v, lse, False, check_values=False,
                                       v_sum=v_sum, seq_lens=lens)
        return out, scores, idx, lse

    graph, (out, scores, idx, lse) = capture_graph(step)
    for trial in range(3):
        lens.copy_(torch.randint(0, S + 1, (B,), dtype=torch.int32))
        v.copy_(torch.randn(B, Hkv, S, D, dtype=dtype))
        v_sum.copy_(row_sums(v, lens))
        graph.replay()
        torch.cuda.synchronize()
        want = reference.sparse_attn_v(scores.cpu(), idx.cpu(), v, lse.cpu(), False, v_sum.cpu(),
                                       lens.cpu())
        assert not out.isnan().any(), f"trial {trial}: an output the replay did not write"
        assert_rounded_close(out, want.float())


@pytest.mark.parametrize("N", [1, 33, 1024])
def test_sparse_attn_v_random_indices(N):
    """Indices with padding anywhere, per-head rows, scores strided on the heads (the last dim
    must be contiguous)."""
    B, Hq, Hkv, S, D = 2, 6, 2, 3000, 128
    v = host_copy(torch.randn(B, Hkv, S, D, dtype=torch.float16))
    idx = torch.randint(-1, S, (B, Hq, N), device="cuda", dtype=torch.int32)
    scores = torch.randn(B, 2 * Hq, N, device="cuda")[:, ::2]
    out = kcache_ops.sparse_attn_v(scores, idx, v)
    want = reference.sparse_attn_v(scores.cpu(), idx.cpu(), v)
    assert_rounded_close(out, want.float())


def light_sparse_attn_v(scores, indices, v_cache, lse, renormalize):
    """reference.sparse_attn_v without its [B, Hq, S, D] copy of V: gathers only the N rows."""
    p = reference.attn_weights(scores, indices, lse, renormalize)  # [B, Hq, N]
    B, Hq, _ = indices.shape
    bi = torch.arange(B)[:, None, None]
    hi = (torch.arange(Hq) // (Hq // v_cache.shape[1]))[None, :, None]
    rows = v_cache[bi, hi, indices.long().clamp(min=0)].float()  # [B, Hq, N, D]
    return torch.einsum("bhn,bhnd->bhd", p, rows)


@pytest.mark.parametrize("B,S,n", [(4, 131072, 1024), (32, 32768, 64)], ids=str)
def test_decode_long(B, S, n):
    """qk_topn + sparse_attn_v at long context, group mode, V only in host RAM."""
    Hq, Hkv, D = 32, 8, 128
    q, k, lens = random_case(B, Hq, Hkv, S, D, torch.bfloat16, seed=S)
    v = host_random((B, Hkv, S, D), torch.bfloat16)
    scores, idx, lse = kcache_ops.qk_topn(q, k, lens, n, None, True)
    out = kcache_ops.sparse_attn_v(scores, idx, v, lse)
    want = light_sparse_attn_v(scores.cpu(), idx.cpu(), v, lse.cpu(), True)
    assert_rounded_close(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int16], ids=str)
@pytest.mark.parametrize("D", [8, 64, 128, 1024])
def test_gather_rows_is_a_copy(dtype, D):
    """Any row of a multiple of 16 bytes; -1 gives zeros; GQA head mapping."""
    B, Hs, H, S, N = 2, 3, 9, 500, 77
    src = host_copy(torch.randn(B, Hs, S, D).to(dtype))
    idx = torch.randint(-1, S, (B, H, N), device="cuda", dtype=torch.int32)
    got = kcache_ops.gather_rows(src, idx)
    assert torch.equal(got.cpu(), reference.gather_rows(src, idx.cpu()))


def test_torch_pinned_memory_stays_until_the_kernel_has_read_it():
    """Rows in torch's own pinned memory (Tensor.pin_memory(), mapped under UVA), freed while the
    op's kernel is still queued: the block is not handed to the next pinned tensor, whose writes
    would reach the kernel (the op tells torch's pinned allocator the stream, as torch's
    non_blocking copies do). The allocator hands back a block no stream uses at once."""
    n = 2 * 8 * 1024 * 64  # floats of one block: src [2, 8, 1024, 64]
    first = torch.randn(n).pin_memory()
    ptr = first.data_ptr()
    del first
    assert torch.empty(n).pin_memory().data_ptr() == ptr
    src = torch.randn(n).pin_memory().view(2, 8, 1024, 64)  # [B, Hs, S, D]
    idx = torch.randint(0, 1024, (2, 8, 64), device="cuda", dtype=torch.int32)  # [B, H, N]
    want = reference.gather_rows(src, idx.cpu())  # [B, H, N, D]
    ptr = src.data_ptr()
    torch.cuda._sleep(500_000_000)  # the current stream: ~0.25 s before the gather runs
    got = kcache_ops.gather_rows(src, idx, check_values=False)  # [B, H, N, D], not synced
    del src
    again = torch.full((n,), 7.0).pin_memory()  # written while the gather waits
    assert again.data_ptr() != ptr
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_reuse_rows_matches_reference(shape, group_select):
    """reuse_rows over decode steps at the model shapes, N = 64, a pool of two steps' rows (of
    the group of 16 per head: 2048, the limit): slots, counts and the pool equal the
    reference's (test_reuse_rows.Twins); a pool one slot larger than the limit is refused."""
    from test_reuse_rows import Twins, run_steps
    Hq, Hkv, D = shape
    N = 64
    C = 2 * (N if group_select else Hq // Hkv * N)
    twins = Twins(2, Hkv, 300, D, C, "cuda", torch.bfloat16)
    reads, hits = run_steps(twins, 2, Hq, Hkv, N, 200, group_select)
    assert 0 < hits < reads
    rows, held, used = (t.new_zeros(2, Hkv, 2049, *t.shape[3:]) for t in twins.op)
    with pytest.raises(RuntimeError, match="at most 2048 slots"):
        kcache_ops.reuse_rows(torch.zeros(2, Hq, N, dtype=torch.int32, device="cuda"),
                              twins.v_host, torch.zeros(2, dtype=torch.int32, device="cuda"),
                              rows, held, used, torch.zeros(1, dtype=torch.int32, device="cuda"),
                              group_select)


def test_sizes_past_the_kernels_int_offsets_are_refused():
    """What the kernels would index past an int is refused, not read at a wrapped offset
    (helper 155's audit): gather_rows' and reuse_rows' rows of 2 GiB or more (a row's 16-byte
    pieces), reuse_rows' G x N of 2^31 with group_select (a KV head's outputs), quantize_rows' D
    past 2^30 (a lane's d += 32). About 4 GiB of pinned host and 4 GiB of device memory."""
    D = (1 << 29) + 4  # float32: 2^31 + 16 bytes a row
    big = kcache_ops.alloc_host((1, 1, 1, D), torch.float32)  # [B, Hs, S, D], one row
    one = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=r"gather_rows: sizes out of range .*a row's "
                                           r"bytes=2147483664"):
        kcache_ops.gather_rows(big, one.view(1, 1, 1))
    pool = (torch.empty(1, 1, 1, D, device="cuda"), torch.full((1, 1, 1), -1, device="cuda",
                                                               dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"reuse_rows: sizes out of range .*2147483664 bytes"):
        kcache_ops.reuse_rows(one.view(1, 1, 1), big, one, pool[0], pool[1], pool[1].clone(), one,
                              False)
    del big, pool
    v = kcache_ops.alloc_host((1, 1, 4, 8), torch.float32)  # [B, Hkv, S, D]
    indices = torch.zeros(1, 1, 2048, dtype=torch.int32, device="cuda").expand(1, 1 << 20, 2048)
    rows, held = torch.zeros(1, 1, 2048, 8, device="cuda"), torch.full(
        (1, 1, 2048), -1, device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"reuse_rows: sizes out of range .*G=1048576, N=2048"):
        kcache_ops.reuse_rows(indices, v, one, rows, held, held.clone(), one, True)
    with pytest.raises(RuntimeError, match=r"quantize_rows: sizes out of range .*D=1073741832"):
        kcache_ops.quantize_rows(torch.empty(1, (1 << 30) + 8, dtype=torch.bfloat16,
                                             device="cuda"), 4)


def test_value_checks():
    q, k, lens = random_case(2, 4, 2, 100, 64, torch.float16)
    with pytest.raises(RuntimeError, match="seq_lens"):
        kcache_ops.qk_topn(q, k, torch.tensor([101, 5], device="cuda", dtype=torch.int32), 8)
    with pytest.raises(RuntimeError, match="seq_lens"):
        kcache_ops.qk_topn(q, k, torch.tensor([-1, 5], device="cuda", dtype=torch.int32), 8)
    with pytest.raises(RuntimeError, match="at most 4096"):
        kcache_ops.qk_topn(q, k, lens, 4097)
    v = host_copy(torch.randn(2, 2, 100, 64, dtype=torch.float16))
    bad = torch.full((2, 4, 8), 100, device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match="indices"):
        kcache_ops.sparse_attn_v(torch.zeros(2, 4, 8, device="cuda"), bad, v)
    with pytest.raises(RuntimeError, match="indices"):
        kcache_ops.gather_rows(v, bad)
    lse = torch.zeros(2, 4, device="cuda")
    good = torch.zeros(2, 4, 8, device="cuda", dtype=torch.int32)
    v_sum = torch.randn(2, 2, 64, device="cuda")
    for lens in ([101, 5], [-1, 5]):
        with pytest.raises(RuntimeError, match=r"seq_lens\[0\] .*\(v_cache capacity\)"):
            kcache_ops.sparse_attn_v(torch.zeros(2, 4, 8, device="cuda"), good, v, lse, False,
                                     v_sum=v_sum, seq_lens=torch.tensor(lens, device="cuda",
                                                                        dtype=torch.int32))


def test_value_checks_with_no_query_head():
    """Hq = 0 leaves the ops nothing to compute, but seq_lens [B] and hot_pos hold values: bad ones
    are refused as on the CPU, not passed over by an early return."""
    def cuda(*shape, dtype=torch.float32):
        return torch.zeros(*shape, device="cuda", dtype=dtype)

    bad = torch.tensor([101, 5], device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"qk_topn: seq_lens\[0\] must be in \[0, 100\]"):
        kcache_ops.qk_topn(cuda(2, 0, 64), cuda(2, 2, 100, 64), bad, 8)
    v = host_copy(torch.randn(2, 2, 100, 64))
    with pytest.raises(RuntimeError, match=r"sparse_attn_v: seq_lens\[0\] must be in"):
        kcache_ops.sparse_attn_v(cuda(2, 0, 8), cuda(2, 0, 8, dtype=torch.int32), v, cuda(2, 0),
                                 False, v_sum=cuda(2, 2, 64), seq_lens=bad)
    codes, meta = cuda(2, 2, 100, 16, dtype=torch.uint8), cuda(2, 2, 100, 2, dtype=torch.bfloat16)
    tail = (cuda(2, 0, 100), bad, cuda(2, 0), cuda(2, 0, 8, dtype=torch.int32), codes, meta, 2)
    with pytest.raises(RuntimeError, match=r"lowbit_tail: seq_lens\[0\] must be in"):
        kcache_ops.lowbit_tail(*tail)
    hot_pos = torch.tensor([[0, 1, 200]] * 2, device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"lowbit_tail: hot_pos\[0, 2\] must be -1"):
        kcache_ops.lowbit_tail(*tail[:1], bad.clamp(max=100), *tail[2:], hot_v=cuda(2, 2, 3, 64),
                               hot_pos=hot_pos)


def test_no_host_sync_without_value_checks(monkeypatch):
    """check_values=False, as the KCache decode path passes it: qk_topn and sparse_attn_v run under
    torch.cuda.set_sync_debug_mode("error"); with the checks on, the same call synchronises."""
    monkeypatch.delenv("KCACHE_OPS_VALIDATE", raising=False)
    q, k, lens = random_case(2, 8, 2, 500, 128, torch.bfloat16, lens=[500, 123])
    v = host_copy(torch.randn(2, 2, 500, 128, dtype=torch.bfloat16))
    v_sum = row_sums(v, lens)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scores, idx, lse = kcache_ops.qk_topn(q, k, lens, 64, None, True, check_values=False)
        out = kcache_ops.sparse_attn_v(scores, idx, v, lse, check_values=False)
        tail = kcache_ops.sparse_attn_v(scores, idx, v, lse, False, check_values=False,
                                        v_sum=v_sum, seq_lens=lens)
        with pytest.raises(RuntimeError, match="synchroniz"):
            kcache_ops.qk_topn(q, k, lens, 64, None, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = reference.sparse_attn_v(scores.cpu(), idx.cpu(), v, lse.cpu())
    assert_rounded_close(out, want.float())
    want = reference.sparse_attn_v(scores.cpu(), idx.cpu(), v, lse.cpu(), False, v_sum.cpu(),
                                   lens.cpu())
    assert_rounded_close(tail, want.float())


def test_unchecked_values_never_read_out_of_bounds():
    """check_values=False with seq_lens past S and indices outside [-1, S): clamped and skipped."""
    q, k, _ = random_case(1, 4, 2, 100, 64, torch.float16)
    big = torch.tensor([10**6], device="cuda", dtype=torch.int32)
    scores, idx, lse = kcache_ops.qk_topn(q, k, big, 8, check_values=False)
    want = kcache_ops.qk_topn(q, k, torch.tensor([100], device="cuda", dtype=torch.int32), 8)
    assert torch.equal(idx, want[1]) and torch.equal(lse, want[2])
    v = host_copy(torch.randn(1, 2, 100, 64, dtype=torch.float16))
    bad = torch.tensor([[[5, 100, -7, 10**9]] * 4], device="cuda", dtype=torch.int32)
    w = torch.randn(1, 4, 4, device="cuda")
    out = kcache_ops.sparse_attn_v(w, bad, v, check_values=False)
    only = kcache_ops.sparse_attn_v(w, torch.tensor([[[5, -1, -1, -1]] * 4], device="cuda",
                                                    dtype=torch.int32), v)
    torch.testing.assert_close(out, only)
    lse, v_sum = torch.randn(1, 4, device="cuda") + 3, torch.randn(1, 2, 64, device="cuda")
    out = kcache_ops.sparse_attn_v(w, bad, v, lse, False, check_values=False, v_sum=v_sum,
                                   seq_lens=big)
    only = kcache_ops.sparse_attn_v(w, torch.tensor([[[5, -1, -1, -1]] * 4], device="cuda",
                                                    dtype=torch.int32), v, lse, False,
                                    v_sum=v_sum, seq_lens=torch.tensor([100], device="cuda",
                                                                       dtype=torch.int32))
    torch.testing.assert_close(out, only)


def test_out_of_range_values_never_read_out_of_bounds(monkeypatch):
    """With the value checks off (as under graph capture) the kernels clamp seq_lens and skip bad
    indices instead of reading outside the tensors."""
    monkeypatch.setenv("KCACHE_OPS_VALIDATE", "0")
    q, k, _ = random_case(1, 4, 2, 100, 64, torch.float16)
    scores, idx, lse = kcache_ops.qk_topn(q, k, torch.tensor([10**6], device="cuda",
                                                             dtype=torch.int32), 8)
    want = kcache_ops.qk_topn(q, k, torch.tensor([100], device="cuda", dtype=torch.int32), 8)
    assert torch.equal(idx, want[1])
    v = host_copy(torch.randn(1, 2, 100, 64, dtype=torch.float16))
    bad = torch.tensor([[[5, 100, -7, 10**9]] * 4], device="cuda", dtype=torch.int32)
    out = kcache_ops.gather_rows(v, bad)
    assert (out[:, :, 1:] == 0).all() and torch.equal(out[0, 0, 0].cpu(), v[0, 0, 5])
    monkeypatch.delenv("KCACHE_OPS_VALIDATE")
    assert torch.equal(kcache_ops.gather_rows(v, bad, check_values=False), out)  # no check
    torch.cuda.synchronize()
