"""Bad input gets a Python exception naming the argument, what was expected and what came."""
import math
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import host_tensor, seq_lens_tensor
from cuda_checks import requires_cuda

import kcache_ops

B, HKV, G, S, D, N = 2, 2, 2, 16, 64, 4
NOT_DENSE = r"must be a dense \(strided\) tensor, got layout"  # check_tensors' refusals
NOT_QUANTIZED = "must not be a quantized tensor, got dtype torch.qint8"


def quantized(shape):
    """A qint8 tensor of ``shape`` (random values), without torch 2.14's deprecation warning of
    quantize_per_tensor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        return torch.quantize_per_tensor(torch.randn(shape), 0.1, 0, torch.qint8)


@pytest.fixture
def qk(device):
    """Valid qk_topn arguments: q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B]."""
    return (torch.randn(B, HKV * G, D, device=device), torch.randn(B, HKV, S, D, device=device),
            seq_lens_tensor([S, 3], device))


@pytest.fixture
def attn(device):
    """Valid sparse_attn_v arguments: scores, indices [B, Hq, N], v_cache [B, Hkv, S, D], lse."""
    return (torch.randn(B, HKV * G, N, device=device),
            torch.randint(0, S, (B, HKV * G, N), dtype=torch.int32, device=device),
            host_tensor(torch.randn(B, HKV, S, D), device), torch.randn(B, HKV * G, device=device))


def change(args, i, value):
    return tuple(value if j == i else a for j, a in enumerate(args))


def refused(op, message):
    """pytest.raises for a RuntimeError whose message names ``op`` first ("qk_topn: ...") and then
    says ``message`` (a regex): whichever check refused, in Python or C++ (csrc/named_op.h)."""
    return pytest.raises(RuntimeError, match=rf"(?s)^{op}: .*(?:{message})")


@pytest.mark.parametrize("i, bad, message", [
    (0, lambda q: q.double(), "q must be float32, float16 or bfloat16, got float64"),
    (1, lambda k: k.half(), "q and k_cache must have the same dtype, got float32 and float16"),
    (2, lambda lens: lens.long(), "seq_lens must be int32, got int64"),
    (0, lambda q: q[0], r"q must have 3 dims, got shape \[4, 64\]"),
    (1, lambda k: k[0], r"k_cache must have 4 dims, got shape \[2, 16, 64\]"),
    (2, lambda lens: lens[None], r"seq_lens must have 1 dims, got shape \[1, 2\]"),
    (1, lambda k: k[:1], r"k_cache batch \(1\) must equal q batch \(2\)"),
    (2, lambda lens: lens[:1], r"seq_lens must have shape \[2\] \(q batch\), got \[1\]"),
    (1, lambda k: k[:, :, :, :32], r"k_cache head dim \(32\) must equal q head dim \(64\)"),
    (0, lambda q: q[:, :3], r"q heads \(3\) must be a multiple of k_cache heads \(2\)"),
    (2, lambda lens: lens - 4, r"seq_lens\[1\] must be in \[0, 16\] \(k_cache capacity\), got -1"),
    (2, lambda lens: lens + 1, r"seq_lens\[0\] must be in \[0, 16\] \(k_cache capacity\), got 17"),
    (1, lambda k: k.transpose(2, 3).contiguous().transpose(2, 3),
     "k_cache must be contiguous in its last dim"),
    (0, lambda q: q.transpose(1, 2).contiguous().transpose(1, 2),
     "q must be contiguous in its last dim"),
])
def test_qk_topn_bad_arguments(qk, i, bad, message):
    with refused("qk_topn", message):
        kcache_ops.qk_topn(*change(qk, i, bad(qk[i])), N)


def test_qk_topn_bad_n_and_head_dim(device, qk):
    with pytest.raises(RuntimeError, match="n must be in \\[1, 2\\^31\\), got 0"):
        kcache_ops.qk_topn(*qk, 0)
    with pytest.raises(RuntimeError, match=r"q must have 3 dims, got shape \[\]"):
        kcache_ops.qk_topn(torch.tensor(1.0, device=device), *qk[1:], N)  # the default scale
    q, k = torch.randn(B, 4, 80, device=device), torch.randn(B, 2, S, 80, device=device)
    with pytest.raises(RuntimeError, match="q: head dim must be 64 or 128, got 80"):
        kcache_ops.qk_topn(q, k, qk[2], N)


def test_qk_topn_n_past_host_memory_is_refused(qk):
    """On the CPU a large n ("keep every key"; past S it pads) whose outputs exceed the free host
    memory is refused naming n and the bytes: Linux handed the outputs out lazily and killed the
    process writing their padding. Outputs that fit, any n past S, run."""
    q, k, lens = (t.cpu() for t in qk)
    available = kcache_ops.host_bytes_available()
    if available is None:
        pytest.skip("this machine does not report MemAvailable")
    n = min(2 * available // (B * HKV * G * 8) + 1, 2**31 - 1)  # twice what is free (it moves)
    with pytest.raises(RuntimeError, match=rf"qk_topn: n = {n} \(scores and indices \[2, 4, n\]"
                                           rf"\) needs {B * HKV * G * n * 8} bytes of host memory"
                                           r", more than the \d+ bytes the machine reports"):
        kcache_ops.qk_topn(q, k, lens, n)
    _, indices, _ = kcache_ops.qk_topn(q, k, lens, 5 * S)
    assert indices[:, :, S:].eq(-1).all()


def spread(t, *sizes):
    """A row of t's first sizes[-1] elements seen as a tensor of ``sizes`` (stride 0 in the
    other dims: no memory of their own)."""
    return t.flatten()[:sizes[-1]].view([1] * (len(sizes) - 1) + [-1]).expand(*sizes)


@pytest.mark.parametrize("op", ["gather_rows", "sparse_attn_v", "lowbit_tail", "quantize_rows",
                                "reuse_rows", "qk_topn scratch"])
def test_outputs_past_host_memory_are_refused(op):
    """On the CPU an output or scratch larger than the inputs (gather_rows: a row for each 4-byte
    index; any op over inputs expanded with stride 0) that exceeds the free host memory is refused
    naming it and its bytes: Linux handed the memory out lazily and killed the process writing
    it."""
    available = kcache_ops.host_bytes_available()
    if available is None:
        pytest.skip("this machine does not report MemAvailable")
    n = 1 << 20
    many = 2 * available // (n * D * 4) + 1  # heads (or rows of heads): twice what is free
    rows = 2 * available // (D // 4 + 4) + 1  # quantize_rows' rows: 2-bit codes and meta
    entries = 2 * available // (n * 4) + 1  # reuse_rows' heads of n int32 slots
    keys = 2 ** 31 - 1  # the most seq_lens can say; 8 heads' scores: 64 GiB of scratch
    if op == "qk_topn scratch" and 8 * keys * 4 <= 2 * available:
        pytest.skip("the machine has more than half of the largest scratch available")
    v = torch.randn(1, 1, S, D)  # [1, 1, S, D]
    zero = torch.zeros(n, dtype=torch.int32)  # [n]
    scores, lse = torch.randn(S), torch.randn(1)
    call, what, bytes_ = {
        "gather_rows": (
            lambda: kcache_ops.gather_rows(v, spread(zero, 1, many, n)),
            rf"gather_rows: dst \[1, {many}, {n}, {D}\]", many * n * D * 4),
        "sparse_attn_v": (
            lambda: kcache_ops.sparse_attn_v(spread(scores, n, many, 1), spread(zero, n, many, 1),
                                             spread(v, n, 1, S, D)),
            rf"sparse_attn_v: out \[{n}, {many}, {D}\]", n * many * D * 4),
        "lowbit_tail": (
            lambda: kcache_ops.lowbit_tail(
                spread(scores, n, many, S), zero + S, spread(lse, n, many),
                spread(zero, n, many, 1),
                spread(torch.zeros(D // 4, dtype=torch.uint8), n, 1, S, D // 4),
                spread(torch.zeros(2, dtype=torch.bfloat16), n, 1, S, 2), 2),
            rf"lowbit_tail: out \[{n}, {many}, {D}\] float32", n * many * D * 4),
        "quantize_rows": (
            lambda: kcache_ops.quantize_rows(spread(v, rows, D), 2),
            rf"quantize_rows: codes \[rows, {D // 4}\] and meta \[rows, 2\] of {rows} rows",
            rows * (D // 4 + 4)),
        "reuse_rows": (  # a pool of n slots of 4 floats, the group's one list of n entries
            lambda: kcache_ops.reuse_rows(
                spread(zero, 1, entries, n), v[..., :4], zero[:1], torch.zeros(1, 1, n, 4),
                *torch.full((2, 1, 1, n), -1, dtype=torch.int32), zero[:1], True),
            rf"reuse_rows: pool_indices \[1, {entries}, {n}\] int32", entries * n * 4),
        "qk_topn scratch": (
            lambda: kcache_ops.qk_topn(torch.randn(1, 8, D), spread(v, 1, 1, keys, D),
                                       torch.tensor([keys], dtype=torch.int32), 1),
            r"qk_topn: its scratch scores \[G, L\] float32", 8 * keys * 4),
    }[op]
    reason = r" needs (\d+) bytes of host memory, more than the \d+ bytes the machine reports"
    with pytest.raises(RuntimeError, match=what + reason) as info:
        call()
    assert int(re.search(reason, str(info.value))[1]) == bytes_


def test_qk_topn_bad_skips(device, qk):
    with pytest.raises(RuntimeError, match=r"skip_first must be in \[0, 2\^31\), got -1"):
        kcache_ops.qk_topn(*qk, N, skip_first=-1)
    with pytest.raises(RuntimeError, match=r"skip_last must be in \[0, 2\^31\), got 2147483648"):
        kcache_ops.qk_topn(*qk, N, skip_last=2 ** 31)
    with pytest.raises(RuntimeError, match=r"n must be in \[1, 2\^31\), got 2147483648"):
        kcache_ops.qk_topn(*qk, 2 ** 31)
    # 1e39 and 3.4028236e38 (just past float32's largest): inf as a float32
    for scale in (float("nan"), float("inf"), 1e39, 3.4028236e38):
        with pytest.raises(RuntimeError, match=r"scale must be finite \(as a float32\)") as e:
            kcache_ops.qk_topn(*qk, N, scale)
        assert_reads_back(str(e.value), scale)
    # 1e-46: 0 as a float32; 1.0000001: above 1 as a float32
    for top_p in (0.0, -0.5, 1.5, float("nan"), 1e-46, 1.0000001):
        with pytest.raises(RuntimeError, match=r"top_p must be in \(0, 1\] \(as a float32\)") as e:
            kcache_ops.qk_topn(*qk, N, top_p=top_p)
        assert_reads_back(str(e.value), top_p)


def assert_reads_back(message, value):
    """The value a message says it got is the value given, to the last bit: 6 digits would print
    a refused top_p of 1.0000001 as 1 and a scale of 3.4028236e38 as 3.40282e+38, both allowed."""
    got = float(re.search(r", got (\S+)$", message)[1])
    assert got == value or math.isnan(got) and math.isnan(value), message


@pytest.mark.parametrize("i, bad, message", [
    (0, lambda s: s.half(), "scores must be float32, got float16"),
    (1, lambda idx: idx.long(), "indices must be int32, got int64"),
    (2, lambda v: v.int(), "v_cache must be float32, float16 or bfloat16, got int32"),
    (0, lambda s: s[0], r"scores must have 3 dims, got shape \[4, 4\]"),
    (2, lambda v: v[0], r"v_cache must have 4 dims, got shape \[2, 16, 64\]"),
    (1, lambda idx: idx[:, :, :3], r"indices must have the shape of scores \[2, 4, 4\], got"),
    (2, lambda v: v[:1], r"v_cache batch \(1\) must equal scores batch \(2\)"),
    (2, lambda v: v[:, :, :, :48], "v_cache: head dim must be 64 or 128, got 48"),
    (1, lambda idx: idx - S - 1, r"indices\[0, 0, 0\] must be -1 \(padding\) or in \[0, 16\)"),
    (1, lambda idx: idx + S, r"must be -1 \(padding\) or in \[0, 16\) \(v_cache capacity\)"),
    (3, lambda lse: lse[:, :2], r"lse must have shape \[2, 4\] \(scores batch, heads\)"),
    (3, lambda lse: lse.double(), r"(?<!\*)lse must be float32, got float64"),
    (2, lambda v: v.transpose(2, 3).contiguous().transpose(2, 3),
     "v_cache must be contiguous in its last dim"),
])
def test_sparse_attn_v_bad_arguments(attn, i, bad, message):
    with refused("sparse_attn_v", message):
        kcache_ops.sparse_attn_v(*change(attn, i, bad(attn[i])), renormalize=False)


def test_sparse_attn_v_heads_and_lse(attn):
    scores, indices, v, lse = attn
    with pytest.raises(RuntimeError, match=r"scores heads \(3\) must be a multiple of v_cache"):
        kcache_ops.sparse_attn_v(scores[:, :3], indices[:, :3], v, lse[:, :3])
    with pytest.raises(RuntimeError, match="lse is required when renormalize=False, got None"):
        kcache_ops.sparse_attn_v(scores, indices, v, None, renormalize=False)


@pytest.fixture
def mean_tail(device):
    """Valid mean-tail arguments of sparse_attn_v: v_sum [B, Hkv, D] float32, seq_lens [B]."""
    return torch.randn(B, HKV, D, device=device), seq_lens_tensor([S, 3], device)


@pytest.mark.parametrize("i, bad, message", [
    (0, lambda vs: vs.half(), "v_sum must be float32, got float16"),
    (0, lambda vs: vs[:, :1], r"v_sum must have shape \[2, 2, 64\] \(v_cache batch, heads, head "
     r"dim\), got \[2, 1, 64\]"),
    (0, lambda vs: vs[0], r"v_sum must have shape \[2, 2, 64\] .*, got \[2, 64\]"),
    (0, lambda vs: vs.transpose(1, 2).contiguous().transpose(1, 2),
     "v_sum must be contiguous in its last dim"),
    (1, lambda lens: lens.long(), "seq_lens must be int32, got int64"),
    (1, lambda lens: lens[:1], r"seq_lens must have shape \[2\] \(scores batch\), got \[1\]"),
    (1, lambda lens: lens - 4,
     r"seq_lens\[1\] must be in \[0, 16\] \(v_cache capacity\), got -1"),
    (1, lambda lens: lens + 1,
     r"seq_lens\[0\] must be in \[0, 16\] \(v_cache capacity\), got 17"),
])
def test_sparse_attn_v_bad_tail_arguments(attn, mean_tail, i, bad, message):
    v_sum, seq_lens = change(mean_tail, i, bad(mean_tail[i]))
    with refused("sparse_attn_v", message):
        kcache_ops.sparse_attn_v(*attn, renormalize=False, v_sum=v_sum, seq_lens=seq_lens)


def test_sparse_attn_v_tail_indices_past_the_length(attn, mean_tail):
    """With the mean tail an index must also lie below its sequence's length: v_sum holds the
    rows j < L_b only, so a row past it (in the capacity, so not out of range otherwise) would be
    taken from a sum it is not in. Without the tail the same indices are accepted."""
    scores, indices, v, lse = attn
    v_sum, seq_lens = mean_tail  # seq_lens [S, 3]
    indices = indices.clone()
    indices[1] = indices[1] % 3  # [Hq, N], all below L_1 = 3
    kcache_ops.sparse_attn_v(scores, indices, v, lse, False, v_sum=v_sum, seq_lens=seq_lens)
    indices[1, 2, 1] = 3
    kcache_ops.sparse_attn_v(scores, indices, v, lse, False)
    with refused("sparse_attn_v", r"indices\[1, 2, 1\] must be -1 \(padding\) or in \[0, 3\) "
                 r"\(seq_lens\[1\]: the mean tail's v_sum holds the rows j < L_b\), got 3"):
        kcache_ops.sparse_attn_v(scores, indices, v, lse, False, v_sum=v_sum, seq_lens=seq_lens)
    padded = torch.full_like(indices, -1)  # [B, Hq, N]: nothing selected, with L_b = 0
    kcache_ops.sparse_attn_v(scores, padded, v, lse, False, v_sum=v_sum,
                             seq_lens=torch.zeros_like(seq_lens))
    # one row of indices for every sequence (stride 0 in B): checked against each one's length
    row = indices[1:] % 3  # [1, Hq, N]
    row[0, 3, 2] = 5
    with refused("sparse_attn_v", r"indices\[1, 3, 2\] must be -1 \(padding\) or in \[0, 3\) "):
        kcache_ops.sparse_attn_v(scores, row.expand(B, -1, -1), v, lse, False, v_sum=v_sum,
                                 seq_lens=seq_lens)
    # a bad length and a bad index: the length is named first, on either device
    with refused("sparse_attn_v", r"seq_lens\[1\] must be in \[0, 16\] \(v_cache capacity\), "
                 r"got 17"):
        kcache_ops.sparse_attn_v(scores, indices + S, v, lse, False, v_sum=v_sum,
                                 seq_lens=seq_lens_tensor([S, S + 1], seq_lens.device))


def test_expanded_indices_with_a_bad_value(device):
    """indices expanded from one row to 2^41 entries, one of them out of range: the error names it
    at once, on CUDA from a host copy of that row alone (a copy of the whole would be 8 TiB)."""
    n, hq = 2 ** 20, 2 ** 20
    row = torch.randint(0, S, (1, 1, n), dtype=torch.int32)  # [1, 1, n]
    row[0, 0, 5] = S
    indices = row.to(device).expand(B, hq, n)  # [B, hq, n], stride 0 in B and hq
    scores = torch.randn(1, 1, n, device=device).expand(B, hq, n)  # [B, hq, n]
    v = host_tensor(torch.randn(B, 1, S, D), device)  # [B, 1, S, D]
    with refused("sparse_attn_v", rf"indices\[0, 0, 5\] must be -1 \(padding\) or in \[0, {S}\) "
                 rf"\(v_cache capacity\), got {S}"):
        kcache_ops.sparse_attn_v(scores, indices, v)


def test_sparse_attn_v_tail_combinations(attn, mean_tail):
    """v_sum and seq_lens only together, only with renormalize=False, and with lse."""
    scores, indices, v, lse = attn
    v_sum, seq_lens = mean_tail
    cases = [
        (dict(lse=lse, renormalize=False, v_sum=v_sum),
         r"v_sum and seq_lens must be given together \(the mean tail\), got v_sum without "
         "seq_lens"),
        (dict(lse=lse, renormalize=False, seq_lens=seq_lens),
         "v_sum and seq_lens must be given together .*, got seq_lens without v_sum"),
        (dict(lse=lse, renormalize=True, v_sum=v_sum, seq_lens=seq_lens),
         r"the mean tail \(v_sum\) needs renormalize=False, got renormalize=True"),
        (dict(renormalize=False, v_sum=v_sum, seq_lens=seq_lens),
         "lse is required when renormalize=False, got None"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RuntimeError, match=message):
            kcache_ops.sparse_attn_v(scores, indices, v, **kwargs)


def test_gather_rows_bad_arguments(attn):
    _, indices, src, _ = attn
    cases = [
        ((src, indices.long()), "indices must be int32, got int64"),
        ((src[0], indices), r"src must have 4 dims, got shape \[2, 16, 64\]"),
        ((src, indices[0]), r"indices must have 3 dims, got shape \[4, 4\]"),
        ((src[:1], indices), r"src batch \(1\) must equal indices batch \(2\)"),
        ((src, indices[:, :3]), r"indices heads \(3\) must be a multiple of src heads \(2\)"),
        ((src, indices - S - 1), r"indices\[0, 0, 0\] must be -1 \(padding\) or in \[0, 16\)"),
        ((src, indices + S), r"\(src capacity\)"),
        ((src.transpose(2, 3).contiguous().transpose(2, 3), indices),
         "src must be contiguous in its last dim"),
    ]
    for args, message in cases:
        with refused("gather_rows", message):
            kcache_ops.gather_rows(*args)


def test_errors_through_torch_ops_name_the_op(device):
    """Called as torch.ops.kcache_ops.<op> (no Python wrapper: as a compiled graph or a user's
    code calls it), each op's C++ checks name the op first too."""
    ops, i32 = torch.ops.kcache_ops, torch.int32
    q, k = torch.randn(B, HKV * G, D, device=device), torch.randn(B, HKV, S, D, device=device)
    lens = seq_lens_tensor([S, 3], device)  # [B]
    scores = torch.randn(B, HKV * G, N, device=device)  # [B, Hq, N]
    indices = torch.randint(0, S, (B, HKV * G, N), dtype=i32, device=device)  # [B, Hq, N]
    v = host_tensor(torch.randn(B, HKV, S, D), device)  # [B, Hkv, S, D]
    codes, meta = ops.quantize_rows(k, 2)  # [B, Hkv, S, D / 4], [B, Hkv, S, 2]
    every = torch.randn(B, HKV * G, S, device=device)  # [B, Hq, S]
    lse = torch.randn(B, HKV * G, device=device)  # [B, Hq]
    held = torch.full((B, HKV, G * N), -1, dtype=i32, device=device)  # [B, Hkv, C]
    calls = [
        ("qk_topn", lambda: ops.qk_topn(q, k[:1], lens, N, 0.125),
         r"k_cache batch \(1\) must equal q batch \(2\)"),
        ("sparse_attn_v", lambda: ops.sparse_attn_v(scores, indices.long(), v),
         "indices must be int32, got int64"),
        ("gather_rows", lambda: ops.gather_rows(v[0], indices), "src must have 4 dims"),
        ("lowbit_tail", lambda: ops.lowbit_tail(every, lens, lse, indices, codes, meta, 3),
         "bits must be 2 or 4, got 3"),
        ("quantize_rows", lambda: ops.quantize_rows(k, 3), "bits must be 2 or 4, got 3"),
        ("reuse_rows", lambda: ops.reuse_rows(
            indices, v, lens, torch.zeros(B, HKV, G * N, D, device=device), held, held.clone(),
            lens[:1].long(), False), "step must be int32, got int64"),
        ("alloc_host", lambda: ops.alloc_host([-1], torch.float32),
         r"shape must have no negative size, got \[-1\]"),
    ]
    for op, call, message in calls:
        with refused(op, message):
            call()


@requires_cuda
def test_cuda_out_of_memory_stays_torch_out_of_memory():
    """An output larger than the GPU raises torch.OutOfMemoryError naming the op: a caller that
    catches it to back off (a smaller batch) still does."""
    src = kcache_ops.alloc_host((1, 1, S, D), torch.float32)  # [1, 1, S, D]
    heads = 1 << 20
    indices = torch.zeros(1, 1, heads, dtype=torch.int32, device="cuda").expand(1, heads, heads)
    with pytest.raises(torch.OutOfMemoryError, match="^gather_rows: CUDA out of memory"):
        kcache_ops.gather_rows(src, indices, check_values=False)  # dst [1, 2^20, 2^20, D]: 256 TiB


def test_reuse_rows_bad_arguments(attn):
    """reuse_rows: each argument's rank, dtype and shape against the others; a pool smaller than
    a step."""
    _, indices, v, _ = attn
    dev = indices.device
    C = G * N  # a step's rows per KV head
    pool = [torch.zeros(B, HKV, C, D, device=dev), torch.full((B, HKV, C), -1, device=dev).int(),
            torch.full((B, HKV, C), -1, device=dev).int()]  # rows, held, used
    new_pos, step = torch.zeros(B, device=dev).int(), torch.zeros(1, device=dev).int()
    args = (indices, v, new_pos, *pool, step, False)
    cases = [
        (change(args, 0, indices.long()), "indices must be int32, got int64"),
        (change(args, 2, new_pos.long()), "new_pos must be int32, got int64"),
        (change(args, 5, pool[2].long()), "used must be int32, got int64"),
        (change(args, 3, pool[0].half()), "rows and v_host must have the same dtype"),
        (change(args, 2, new_pos[:1]), r"new_pos must have shape \[2\] \(indices batch\)"),
        (change(args, 6, step.expand(2)), r"step must have shape \[1\], got \[2\]"),
        (change(args, 3, pool[0][..., :32]), r"rows must have shape \[2, 2, C, 64\]"),
        (change(args, 4, pool[1][:1]), r"held must have shape \[2, 2, 8\]"),
        (change(args, 5, pool[2][..., :3]), r"used must have shape \[2, 2, 8\]"),
        (change(args, 1, v[:, :1]), r"rows must have shape \[2, 1, C, 64\]"),
        (change(args, 4, pool[1].transpose(0, 1).contiguous().transpose(0, 1)),
         r"held must be contiguous \(the pool, updated in place\), got strides \[8, 16, 1\] "
         r"for shape \[2, 2, 8\]"),
        (change(args, 3, pool[0].transpose(1, 2).contiguous().transpose(1, 2)),
         r"rows must be contiguous .*, got strides \[1024, 64, 128, 1\]"),
        (change(args, 5, pool[2].transpose(0, 1).contiguous().transpose(0, 1)),
         "used must be contiguous"),
        ((indices, v, new_pos, *[t[:, :, :C - 1] for t in pool], step, False),
         r"rows must have at least 8 slots \(the rows of one step: G x N\), got 7"),
    ]
    for args_, message in cases:
        with refused("reuse_rows", message):
            kcache_ops.reuse_rows(*args_)
    # group_select: a step is N rows, so N slots do
    small = [t[:, :, :N] for t in pool]
    kcache_ops.reuse_rows(indices, v, new_pos, *[t.contiguous() for t in small], step, True)


@pytest.mark.parametrize("dev", ["meta", "cpu"])
def test_reuse_rows_pool_of_2_31_slots_is_refused(dev):
    """A pool of 2^31 slots, whose slot numbers pool_indices (int32) cannot hold, is refused
    before any is read: by the fake on meta tensors and by the CPU op (its pool 18 GiB of
    untouched memory, which the OS only reserves)."""
    C = 1 << 31
    try:
        rows = torch.empty(1, 1, C, 1, dtype=torch.uint8, device=dev)  # [B, Hkv, C, D]
        held, used = (torch.empty(1, 1, C, dtype=torch.int32, device=dev) for _ in range(2))
    except RuntimeError as e:  # an OS that reserves no memory it may not have
        pytest.skip(f"no 18 GiB of address space for the pool: {e}")
    v = torch.zeros(1, 1, 4, 1, dtype=torch.uint8, device=dev)  # [B, Hkv, S, D]
    one = torch.zeros(1, dtype=torch.int32, device=dev)
    with pytest.raises(RuntimeError, match=r"rows must have fewer than 2\^31 slots \(pool_indices "
                                           r"are int32\), got 2147483648"):
        kcache_ops.reuse_rows(one.view(1, 1, 1), v, one, rows, held, used, one, False)


def at_byte_offset(like):
    """An uninitialised tensor of ``like``'s shape and dtype whose address is 1 byte past a
    multiple of its element size: a view of a storage sliced at byte 1 (Tensor.set_); no torch
    op makes one."""
    raw = torch.empty(like.numel() * like.element_size() + 1, dtype=torch.uint8,
                      device=like.device)
    t = torch.empty(0, dtype=like.dtype, device=like.device).set_(
        raw.untyped_storage()[1:], 0, like.shape, like.contiguous().stride())
    assert t.data_ptr() % like.element_size() == 1
    return t


@requires_cuda
def test_cuda_inputs_at_a_byte_offset_are_refused():
    """An input read one element at a time whose address is not a multiple of its element size
    is refused by name on CUDA, where the kernel's first load of it would fault (and end the CUDA
    context); helper 157's audit. The CPU ops read such inputs as they are."""
    dev = "cuda"
    q = torch.randn(B, HKV * G, D, device=dev, dtype=torch.bfloat16)  # [B, Hq, D]
    k = torch.randn(B, HKV, S, D, device=dev, dtype=torch.bfloat16)  # [B, Hkv, S, D]
    lens = seq_lens_tensor([S, 3], dev)  # [B]
    scores, indices, lse, every = kcache_ops.qk_topn(q.float(), k.float(), lens, N,
                                                     return_scores=True)
    v = host_tensor(torch.randn(B, HKV, S, D), dev)  # [B, Hkv, S, D] pinned, mapped
    codes, meta = kcache_ops.quantize_rows(v.to(dev), 2)
    C = G * N  # the pool's slots: one step's rows
    pool = (torch.zeros(B, HKV, C, D, device=dev),
            *(torch.full((B, HKV, C), -1, dtype=torch.int32, device=dev) for _ in range(2)))
    step = torch.zeros(1, dtype=torch.int32, device=dev)
    cases = [
        ("qk_topn", "q", 2, lambda: kcache_ops.qk_topn(at_byte_offset(q), k, lens, N)),
        ("qk_topn", "seq_lens", 4, lambda: kcache_ops.qk_topn(q, k, at_byte_offset(lens), N)),
        ("sparse_attn_v", "scores", 4,
         lambda: kcache_ops.sparse_attn_v(at_byte_offset(scores), indices, v, lse)),
        ("sparse_attn_v", "lse", 4,
         lambda: kcache_ops.sparse_attn_v(scores, indices, v, at_byte_offset(lse))),
        ("lowbit_tail", "indices", 4,
         lambda: kcache_ops.lowbit_tail(every, lens, lse, at_byte_offset(indices), codes, meta,
                                        2)),
        ("gather_rows", "indices", 4, lambda: kcache_ops.gather_rows(v, at_byte_offset(indices))),
        ("reuse_rows", "held", 4,
         lambda: kcache_ops.reuse_rows(indices, v, lens, pool[0], at_byte_offset(pool[1]),
                                       pool[2], step, False)),
        ("quantize_rows", "v", 4, lambda: kcache_ops.quantize_rows(at_byte_offset(v.to(dev)), 2)),
    ]
    for op, name, size, call in cases:
        with pytest.raises(RuntimeError, match=rf"^{op}: {name} must start at a multiple of its "
                                               rf"element size \({size} bytes\), got an address "
                                               r"1 byte past one"):
            call()


@pytest.mark.parametrize("v, bits, message", [
    (lambda d: torch.randn(4, 64, device=d), 3, "bits must be 2 or 4, got 3"),
    (lambda d: torch.randn(4, 64, device=d), 8, "bits must be 2 or 4, got 8"),
    (lambda d: torch.randn(4, 6, device=d), 2,
     r"v: last dim \(D\) must be a positive multiple of 4 \(8 / bits\) for bits=2, got 6"),
    (lambda d: torch.randn(4, 5, device=d), 4,
     r"v: last dim \(D\) must be a positive multiple of 2 \(8 / bits\) for bits=4, got 5"),
    (lambda d: torch.randn(4, 0, device=d), 4,
     r"v: last dim \(D\) must be a positive multiple of 2 \(8 / bits\) for bits=4, got 0"),
    (lambda d: torch.randn(4, 64, device=d).double(), 2,
     "v must be float32, float16 or bfloat16, got float64"),
    (lambda d: torch.randint(0, 9, (4, 64), device=d), 2,
     "v must be float32, float16 or bfloat16, got int64"),
    (lambda d: torch.tensor(1.5, device=d), 2,
     r"v must have at least 1 dim \(\[\.\.\., D\]\), got a 0-dim tensor"),
    (lambda d: torch.randn(64, 4, device=d).t(), 2, "v must be contiguous in its last dim"),
])
def test_quantize_rows_bad_arguments(device, v, bits, message):
    with refused("quantize_rows", message):
        kcache_ops.quantize_rows(v(device), bits)


@pytest.mark.parametrize("device", ["cpu"])
def test_cpu_checks_values_whatever_check_values(qk, attn):
    """check_values=False only skips the CUDA read-back: the CPU ops still name a bad value (and
    reuse_rows leaves its pool as it was)."""
    q, k, lens = qk
    with pytest.raises(RuntimeError, match=r"seq_lens\[0\] must be in \[0, 16\]"):
        kcache_ops.qk_topn(q, k, lens + 1, N, check_values=False)
    scores, indices, v, lse = attn
    with pytest.raises(RuntimeError, match=r"indices\[0, 0, 0\] must be -1 \(padding\)"):
        kcache_ops.sparse_attn_v(scores, indices - S - 1, v, lse, check_values=False)
    with pytest.raises(RuntimeError, match=r"seq_lens\[0\] must be in \[0, 16\]"):
        kcache_ops.sparse_attn_v(scores, indices, v, lse, False, False,
                                 torch.randn(B, HKV, D), seq_lens_tensor([S + 1, 3], "cpu"))
    indices = indices.clone()
    indices[1, 2, 3] = S  # one past the capacity
    message = r"indices\[1, 2, 3\] must be -1 \(padding\) or in \[0, 16\) \(%s capacity\), got 16"
    strided = indices.transpose(0, 1).contiguous().transpose(0, 1)  # read by its strides
    for idx in (indices, strided):
        with pytest.raises(RuntimeError, match=message % "src"):
            kcache_ops.gather_rows(v, idx, check_values=False)
    C = G * N  # a step's rows per KV head
    pool = [torch.zeros(B, HKV, C, D), torch.full((B, HKV, C), -1).int(),
            torch.full((B, HKV, C), -1).int()]  # rows, held, used
    with pytest.raises(RuntimeError, match=message % "v_host"):
        kcache_ops.reuse_rows(indices, v, torch.zeros(B).int(), *pool, torch.zeros(1).int(),
                              False, check_values=False)
    assert all(t.eq(w).all() for t, w in zip(pool, (0, -1, -1))), "the pool left as it was"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices():
    q = torch.randn(B, 4, D, device="cuda")
    k = torch.randn(B, 2, S, D)
    with pytest.raises(RuntimeError, match="k_cache|cuda|CUDA"):
        kcache_ops.qk_topn(q, k, seq_lens_tensor([S, 3], "cuda"), N)
    scores, indices = torch.randn(B, 4, N, device="cuda"), torch.zeros(B, 4, N, dtype=torch.int32,
                                                                       device="cuda")
    v, lse = host_tensor(torch.randn(B, 2, S, D), "cuda"), torch.randn(B, 4, device="cuda")
    for v_sum, lens, name in [(torch.randn(B, 2, D), seq_lens_tensor([S, 3], "cuda"), "v_sum"),
                              (torch.randn(B, 2, D, device="cuda"), seq_lens_tensor([S, 3], "cpu"),
                               "seq_lens")]:
        with pytest.raises(RuntimeError, match=f"{name} must be on cuda:0"):
            kcache_ops.sparse_attn_v(scores, indices, v, lse, False, v_sum=v_sum, seq_lens=lens)
    with pytest.raises(RuntimeError, match=r"sparse_attn_v: lse must be on cuda:0 \(the device "
                                           r"of scores\), got cpu"):
        kcache_ops.sparse_attn_v(scores, indices, v, lse.cpu(), False)


@pytest.fixture
def low_tail(device):
    """Valid lowbit_tail arguments: scores [B, Hq, S] float32, seq_lens [B], lse [B, Hq],
    indices [B, Hq, N], v_codes [B, Hkv, S, D / 4] (2 bits), v_meta [B, Hkv, S, 2] bfloat16,
    bits."""
    return (torch.randn(B, HKV * G, S, device=device), seq_lens_tensor([S, 3], device),
            torch.randn(B, HKV * G, device=device),
            torch.randint(0, S, (B, HKV * G, N), dtype=torch.int32, device=device),
            torch.randint(0, 256, (B, HKV, S, D // 4), dtype=torch.uint8, device=device),
            torch.randn(B, HKV, S, 2, device=device).bfloat16(), 2)


@pytest.mark.parametrize("i, bad, message", [
    (0, lambda s: s.double(), "scores must be float32, got float64"),
    (0, lambda s: s[0], r"scores must have 3 dims, got shape \[4, 16\]"),
    (1, lambda lens: lens + 1, r"seq_lens\[0\] must be in \[0, 16\] \(v_codes capacity\), got 17"),
    (1, lambda lens: lens[:1], r"seq_lens must have shape \[2\] \(scores batch\), got \[1\]"),
    (2, lambda lse: lse.double(), r"(?<!\*)lse must be float32, got float64"),
    (2, lambda lse: lse[:, :2], r"lse must have shape \[2, 4\] \(scores batch, heads\), got "
     r"\[2, 2\]"),
    (3, lambda idx: idx.long(), "indices must be int32, got int64"),
    (3, lambda idx: idx[0], r"indices must have 3 dims, got shape \[4, 4\]"),
    (3, lambda idx: idx[:, :3], r"indices must have shape \[2, 4, N\] \(scores batch, heads\), "
     r"got \[2, 3, 4\]"),
    (3, lambda idx: idx - S - 1, r"indices\[0, 0, 0\] must be -1 \(padding\) or in \[0, 16\) "
     r"\(v_codes capacity\)"),
    (4, lambda c: c.int(), "v_codes must be uint8, got int32"),
    (4, lambda c: c[0], r"v_codes must have 4 dims, got shape \[2, 16, 16\]"),
    (4, lambda c: c[:, :, :15], r"v_codes must have shape \[2, Hkv, 16, D \* bits / 8\] "
     r"\(scores batch, -, keys\), got \[2, 2, 15, 16\]"),
    (4, lambda c: torch.cat([c, c], 1)[:, :3], r"scores heads \(4\) must be a multiple of "
     r"v_codes heads \(3\)"),
    (4, lambda c: torch.cat([c, c[..., :8]], -1), r"v_codes last dim must be D \* bits / 8 with "
     r"D 64 or 128 \(16 or 32 bytes for bits = 2\), got 24"),
    (4, lambda c: c.transpose(2, 3).contiguous().transpose(2, 3),
     "v_codes must be contiguous in its last dim"),
    (5, lambda m: m.float(), "v_meta must be bfloat16, got float32"),
    (5, lambda m: m[:, :1], r"v_meta must have shape \[2, 2, 16, 2\] \(v_codes batch, heads, "
     r"keys; scale and min\), got \[2, 1, 16, 2\]"),
    (5, lambda m: m.transpose(2, 3).contiguous().transpose(2, 3),
     "v_meta must be contiguous in its last dim"),
    (6, lambda bits: 3, "bits must be 2 or 4, got 3"),
    (6, lambda bits: 4, r"v_codes last dim must be D \* bits / 8 with D 64 or 128 \(32 or 64 "
     r"bytes for bits = 4\), got 16"),
])
def test_lowbit_tail_bad_arguments(low_tail, i, bad, message):
    with refused("lowbit_tail", message):
        kcache_ops.lowbit_tail(*change(low_tail, i, bad(low_tail[i])))


def test_lowbit_tail_bad_skips(low_tail):
    with pytest.raises(RuntimeError, match=r"skip_first must be in \[0, 2\^31\), got -3"):
        kcache_ops.lowbit_tail(*low_tail, skip_first=-3)
    with pytest.raises(RuntimeError, match=r"skip_last must be in \[0, 2\^31\), got 2147483648"):
        kcache_ops.lowbit_tail(*low_tail, skip_last=2 ** 31)


@pytest.mark.parametrize("hot_v, hot_pos, message", [
    (lambda v: v, lambda p: None, "hot_v and hot_pos must be given together, got hot_v set and "
     "hot_pos None"),
    (lambda v: v.double(), lambda p: p, "hot_v must be float32, float16 or bfloat16, got float64"),
    (lambda v: v[0], lambda p: p, r"hot_v must have 4 dims, got shape \[2, 5, 64\]"),
    (lambda v: v[:, :1], lambda p: p, r"hot_v must have shape \[2, 2, H, 64\] \(scores batch, "
     r"v_codes heads, -, head dim\), got \[2, 1, 5, 64\]"),
    (lambda v: v.transpose(2, 3).contiguous().transpose(2, 3), lambda p: p,
     "hot_v must be contiguous in its last dim"),
    (lambda v: v, lambda p: p.long(), "hot_pos must be int32, got int64"),
    (lambda v: v, lambda p: p[:, :4], r"hot_pos must have shape \[2, 5\] \(scores batch, hot_v "
     r"rows\), got \[2, 4\]"),
    (lambda v: v, lambda p: p - S - 1, r"hot_pos\[0, 0\] must be -1 \(an empty slot\) or in "
     r"\[0, 16\) \(v_codes capacity\)"),
])
def test_lowbit_tail_bad_hot_rows(low_tail, hot_v, hot_pos, message):
    """hot_v [B, Hkv, H, D] and hot_pos [B, H] int32 (KCache's hot rows), checked as the rest."""
    device = low_tail[0].device
    v = torch.randn(B, HKV, 5, D, device=device)
    pos = torch.randint(-1, S, (B, 5), dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=message):
        kcache_ops.lowbit_tail(*low_tail, hot_v=hot_v(v), hot_pos=hot_pos(pos))


@pytest.mark.parametrize("device", ["cpu"])
def test_lowbit_tail_cpu_checks_values(low_tail):
    """check_values=False only skips the CUDA read-back: the CPU op still names a bad value."""
    with pytest.raises(RuntimeError, match=r"indices\[0, 0, 0\] must be -1 \(padding\)"):
        kcache_ops.lowbit_tail(*change(low_tail, 3, low_tail[3] - S - 1), check_values=False)
    hot_v = torch.randn(B, HKV, 5, D)
    for bad in (S, -2):  # hot_pos at the capacity, below -1
        hot_pos = torch.full((B, 5), -1, dtype=torch.int32)
        hot_pos[1, 3] = bad
        with pytest.raises(RuntimeError, match=rf"hot_pos\[1, 3\] must be -1 \(an empty slot\) or "
                                               rf"in \[0, 16\) \(v_codes capacity\), got {bad}"):
            kcache_ops.lowbit_tail(*low_tail, check_values=False, hot_v=hot_v, hot_pos=hot_pos)


@requires_cuda
def test_cuda_limits_on_sizes():
    """Sizes the CUDA kernels cannot take are refused, not computed wrong: rows that are not
    16-byte pieces even in an empty src (gather_rows would copy them in 16-byte steps), N of
    2^24 or more (a block's entry count is an int; one head's 64 MiB viewed as 8), S past 2^30
    (qk_topn's chunk ends are ints; one key viewed as 2^30 + 1)."""
    q = torch.randn(1, 1, D, device="cuda")  # [B, Hq, D]
    k = torch.randn(1, 1, 1, D, device="cuda").expand(1, 1, (1 << 30) + 1, D)  # [B, Hkv, S, D]
    with pytest.raises(RuntimeError, match=r"S <= 2\^30\): B=1, Hq=1, S=1073741825"):
        kcache_ops.qk_topn(q, k, seq_lens_tensor([4], "cuda"), 1, check_values=False)
    src = kcache_ops.alloc_host([1, 1, 0, 3], torch.float32)  # no rows of 12 bytes
    indices = torch.full((1, 1, 1), -1, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="src rows must be 16-byte aligned"):
        kcache_ops.gather_rows(src, indices)
    n = 1 << 24
    scores = torch.zeros(1, 1, n, device="cuda").expand(1, 8, n)  # [B, Hq, N]
    indices = torch.full((1, 1, n), -1, dtype=torch.int32, device="cuda").expand(1, 8, n)
    lse = torch.zeros(1, 8, device="cuda")
    v = host_tensor(torch.randn(1, 1, 4, D), "cuda")
    with pytest.raises(RuntimeError, match=r"N < 2\^24\): B=1, S=4, N=16777216"):
        kcache_ops.sparse_attn_v(scores, indices, v, lse, False, check_values=False)
    codes = torch.zeros(1, 1, 4, D // 4, dtype=torch.uint8, device="cuda")
    meta = torch.zeros(1, 1, 4, 2, dtype=torch.bfloat16, device="cuda")
    lens = seq_lens_tensor([4], "cuda")
    with pytest.raises(RuntimeError, match=r"N < 2\^24\): B=1, Hq=8, S=4, N=16777216"):
        kcache_ops.lowbit_tail(torch.zeros(1, 8, 4, device="cuda"), lens, lse, indices, codes,
                               meta, 2, check_values=False)


@requires_cuda
def test_lowbit_tail_cuda_alignment():
    """The CUDA kernel reads each row's (scale, min) as one 4-byte word and the codes with vector
    loads: misaligned rows are refused with a message that says so."""
    scores = torch.randn(B, HKV * G, S, device="cuda")
    lens = seq_lens_tensor([S, 3], "cuda")
    lse = torch.randn(B, HKV * G, device="cuda")
    indices = torch.randint(0, S, (B, HKV * G, N), dtype=torch.int32, device="cuda")
    codes = torch.randint(0, 256, (B, HKV, S, D // 4), dtype=torch.uint8, device="cuda")
    meta = torch.randn(B, HKV, S, 3, device="cuda").bfloat16()[..., :2]  # rows 6 bytes apart
    with pytest.raises(RuntimeError, match="v_meta rows must be 4-byte aligned"):
        kcache_ops.lowbit_tail(scores, lens, lse, indices, codes, meta, 2)
    meta = meta.contiguous()
    codes = torch.randint(0, 256, (B, HKV, S, D // 4 + 1), dtype=torch.uint8,
                          device="cuda")[..., 1:]  # rows 17 bytes apart
    with pytest.raises(RuntimeError, match="v_codes rows must be 16-byte aligned"):
        kcache_ops.lowbit_tail(scores, lens, lse, indices, codes, meta, 2)


@pytest.mark.parametrize("op, name, bad", [
    ("qk_topn", "n", True), ("qk_topn", "n", 3.0), ("qk_topn", "n", "3"),
    ("qk_topn", "n", torch.tensor([3])),  # 1 dim: torch would index by it
    ("qk_topn", "scale", "0.1"), ("qk_topn", "scale", True), ("qk_topn", "scale", 1j),
    ("qk_topn", "top_p", "0.5"), ("qk_topn", "top_p", np.bool_(True)),
    ("qk_topn", "skip_first", 1.0), ("qk_topn", "skip_last", False),
    ("qk_topn", "group_select", 2), ("qk_topn", "check_values", 1),
    ("qk_topn", "return_scores", "yes"),
    ("sparse_attn_v", "renormalize", 0), ("sparse_attn_v", "check_values", None),
    ("gather_rows", "check_values", 1),
    ("reuse_rows", "group_select", 2), ("reuse_rows", "check_values", "no"),
    ("lowbit_tail", "bits", 2.0), ("lowbit_tail", "bits", torch.tensor(True)),
    ("lowbit_tail", "skip_first", "1"), ("lowbit_tail", "check_values", np.int64(1)),
    ("quantize_rows", "bits", np.float64(4)), ("quantize_rows", "bits", True),
])
def test_scalar_arguments_of_another_kind(qk, attn, low_tail, op, name, bad):
    """A scalar argument of the wrong kind (a bool or a float where an integer goes, a bool or a
    string where a number goes, an int where a flag goes) is refused with a TypeError naming it,
    not converted (torch's schema would run ``n=True`` as n = 1)."""
    scores, indices, v, lse = attn
    dev = indices.device
    pool = (torch.zeros(B, HKV, G * N, D, device=dev),  # rows, held, used
            *torch.full((2, B, HKV, G * N), -1, dtype=torch.int32, device=dev))
    step = torch.zeros(1, dtype=torch.int32, device=dev)
    valid = {"qk_topn": (qk, dict(n=N)), "sparse_attn_v": (attn, {}),
             "gather_rows": ((v, indices), {}),
             "reuse_rows": ((indices, v, step.expand(B).contiguous(), *pool, step),
                            dict(group_select=False)),
             "lowbit_tail": (low_tail[:6], dict(bits=2)),
             "quantize_rows": ((scores,), dict(bits=2))}
    args, kwargs = valid[op]
    call = getattr(kcache_ops, op)
    call(*args, **kwargs)  # runs with scalars of their kind
    with pytest.raises(TypeError, match=rf"{op}: {name} must be .*, got {re.escape(repr(bad))}"):
        call(*args, **{**kwargs, name: bad})


@pytest.mark.parametrize("op, name, bad", [
    ("qk_topn", "n", 2**63), ("qk_topn", "skip_first", 2**64), ("qk_topn", "skip_last", -2**63 - 1),
    ("lowbit_tail", "skip_last", 2**63), ("quantize_rows", "bits", np.uint64(2**63)),
    ("alloc_host", "shape[1]", 2**64),
])
def test_integers_past_int64(qk, low_tail, op, name, bad):
    """An integer outside int64 is refused by name (torch's parser says "Expected a value of type
    'int' ... found type 'int'")."""
    args = {"qk_topn": (qk, dict(n=N)), "lowbit_tail": (low_tail[:6], dict(bits=2)),
            "quantize_rows": ((qk[0][0],), dict(bits=2)),
            "alloc_host": ((), dict(shape=[2, 3], dtype=torch.float32))}[op]
    name_key = name.split("[")[0]
    value = [2, bad] if op == "alloc_host" else bad
    with pytest.raises(ValueError, match=rf"{op}: {re.escape(name)} must fit in int64, the "
                                         rf"schema's int, got {int(bad)}"):
        getattr(kcache_ops, op)(*args[0], **{**args[1], name_key: value})


@pytest.fixture
def tensor_args(qk, attn, low_tail):
    """op -> (valid arguments, the names of its required tensor arguments, in order)."""
    scores, indices, v, lse = attn
    dev = indices.device
    pool = (torch.zeros(B, HKV, G * N, D, device=dev),  # rows, held, used
            *torch.full((2, B, HKV, G * N), -1, dtype=torch.int32, device=dev))
    step = torch.zeros(1, dtype=torch.int32, device=dev)
    return {"qk_topn": ((*qk, N), "q k_cache seq_lens"),
            "sparse_attn_v": (attn[:3], "scores indices v_cache"),
            "gather_rows": ((v, indices), "src indices"),
            "reuse_rows": ((indices, v, step.expand(B).contiguous(), *pool, step, False),
                           "indices v_host new_pos rows held used step"),
            "lowbit_tail": ((*low_tail[:6], 2), "scores seq_lens lse indices v_codes v_meta"),
            "quantize_rows": ((scores, 2), "v")}


@pytest.mark.parametrize("bad, got", [
    (None, "None"), ([[0.0] * D], "an object of type list"),
    (np.zeros((B, HKV * G, D), np.float32), "an object of type numpy.ndarray"),
])
def test_tensor_arguments_that_are_not_tensors(tensor_args, bad, got):
    """Each required tensor argument of each op, given None, a list or an array, is refused by
    name (the schema took None as an undefined tensor, "q must have 3 dims, got shape [0]", and
    quantize_rows(None) found no kernel; qk_topn's default scale read q.dim())."""
    for op, (args, names) in tensor_args.items():
        for i, name in enumerate(names.split()):
            with pytest.raises(TypeError, match=rf"{op}: {name} must be a tensor, got {got}$"):
                getattr(kcache_ops, op)(*change(args, i, bad))


def test_tensor_arguments_that_are_not_dense(tensor_args):
    """A sparse, nested or quantized tensor for a required tensor argument is refused by name
    (torch's dispatcher said it found no kernel for the 'SparseCPU' or 'QuantizedCPU' backend,
    naming no argument)."""
    for op, (args, names) in tensor_args.items():
        for i, name in enumerate(names.split()):
            for bad, message in ((args[i].cpu().to_sparse(), rf"{NOT_DENSE} torch.sparse_coo"),
                                 (torch.nested.nested_tensor([args[i].cpu()],
                                                             layout=torch.jagged),
                                  rf"{NOT_DENSE} torch.jagged \(nested\)"),
                                 (quantized(args[i].shape), NOT_QUANTIZED)):
                with pytest.raises(TypeError, match=rf"{op}: {name} {message}$"):
                    getattr(kcache_ops, op)(*change(args, i, bad))


def test_optional_tensor_arguments_that_are_not_dense_tensors(attn, low_tail):
    """An optional tensor argument given as a sparse or quantized tensor, or not as a tensor, is
    refused by name as a required one is (torch's dispatcher found no kernel, naming none)."""
    for op, args, name in (("sparse_attn_v", attn[:3], "lse"), ("sparse_attn_v", attn[:3], "v_sum"),
                           ("sparse_attn_v", attn[:3], "seq_lens"),
                           ("lowbit_tail", (*low_tail[:6], 2), "hot_v"),
                           ("lowbit_tail", (*low_tail[:6], 2), "hot_pos")):
        for bad, message in ((torch.randn(2, 3).to_sparse(), rf"{NOT_DENSE} torch.sparse_coo"),
                             (quantized((2, 3)), NOT_QUANTIZED),
                             ([1.0], "must be a tensor, got an object of type list")):
            with pytest.raises(TypeError, match=rf"{op}: {name} {message}$"):
                getattr(kcache_ops, op)(*args, **{name: bad})


def test_none_for_a_tensor_through_torch_ops(tensor_args):
    """Called through torch.ops, past the wrappers, None for a required tensor (the schema's
    undefined tensor) is refused by name by the op itself: its checks said "seq_lens must be
    int32, got UNKNOWN_SCALAR" or "q must have 3 dims, got shape [0]". (quantize_rows, whose
    only tensor it is, finds no kernel: torch's dispatcher answers.)"""
    for op, (args, names) in tensor_args.items():
        if op == "quantize_rows":
            continue
        args = (*args, 0.125) if op == "qk_topn" else args  # the schema's scale has no default
        for i, name in enumerate(names.split()):
            with pytest.raises(RuntimeError, match=rf"^{op}: {name} must be a tensor, got None"):
                getattr(torch.ops.kcache_ops, op)(*change(args, i, None))


def test_alloc_host_dtype_not_a_dtype():
    for dtype in (None, "float32", float):
        with pytest.raises(TypeError, match=f"alloc_host: dtype must be a torch.dtype, got "
                                            f"{re.escape(repr(dtype))}"):
            kcache_ops.alloc_host((2, 3), dtype)


def test_scalar_arguments_of_any_type(qk):
    """NumPy scalars and 0-d tensors are taken as the Python number or bool they hold."""
    q, k, lens = qk
    want = kcache_ops.qk_topn(q, k, lens, N, 0.125, True, skip_first=1, top_p=0.5)
    got = kcache_ops.qk_topn(q, k, lens, np.int32(N), np.float32(0.125), np.bool_(True),
                             skip_first=torch.tensor(1), top_p=torch.tensor(0.5))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    v = torch.randn(3, D, device=q.device)
    for w, g in zip(kcache_ops.quantize_rows(v, 4), kcache_ops.quantize_rows(v, np.int8(4))):
        assert torch.equal(g, w)


@pytest.mark.parametrize("name", ["n", "scale", "group_select"])
def test_scalar_argument_on_the_meta_device(qk, name):
    """A 0-d meta tensor has no value to take: refused naming the argument, like any argument of
    another kind (reading it raised "Tensor.item() cannot be called on meta tensors")."""
    value = {"n": torch.tensor(3), "scale": torch.tensor(0.5), "group_select": torch.tensor(True)}
    kwargs = {"n": N, name: value[name].to("meta")}
    with pytest.raises(TypeError, match=rf"qk_topn: {name} must be .*, got tensor\(.*meta"):
        kcache_ops.qk_topn(*qk, **kwargs)


def test_alloc_host_shape_of_integers():
    """alloc_host takes sizes of any integer type, but not a bool (torch would take it as 1)."""
    assert kcache_ops.alloc_host(np.int64(3), torch.float32).shape == (3,)
    assert kcache_ops.alloc_host(torch.tensor([2, 3]), torch.float32).shape == (2, 3)
    with pytest.raises(TypeError, match=r"alloc_host: shape\[1\] must be an integer .*, got "
                                        "True"):
        kcache_ops.alloc_host([2, True], torch.float32)
    with pytest.raises(TypeError, match="alloc_host: shape must be an integer .*, got 2.0"):
        kcache_ops.alloc_host(2.0, torch.float32)
