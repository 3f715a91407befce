"""torch.library.opcheck on each op (schema, fake implementation, dispatch agree), torch.compile
over a decode step that calls qk_topn and sparse_attn_v, and the fake implementations refusing
(on meta tensors, while torch.compile traces) what the eager ops refuse."""
import numpy as np
import pytest
import torch
from conftest import host_tensor, seq_lens_tensor
from torch._subclasses.fake_tensor import FakeTensorMode

import kcache_ops
from kcache_ops.ops import MAX_GROUP_SELECT, MAX_REUSE, MAX_TOPN


def clones_stay_pinned():
    """Whether opcheck's copies of a pinned tensor are pinned (torch._dynamo's clone_input pins
    them since pytorch PR 185047; before it they are pageable, which the CUDA ops refuse)."""
    from torch._dynamo.utils import clone_input

    return clone_input(kcache_ops.alloc_host([1], torch.float32)).is_pinned()


def test_opcheck(device):
    """On CUDA V is given in device memory, which sparse_attn_v and reuse_rows also read, so
    opcheck's copies of it are readable whatever the torch (gather_rows: the next test)."""
    q = torch.randn(2, 8, 64, device=device)  # [B, Hq, D]
    k = torch.randn(2, 2, 40, 64, device=device)  # [B, Hkv, S, D]
    v = torch.randn(2, 2, 40, 64, device=device)  # [B, Hkv, S, D]
    lens = seq_lens_tensor([40, 7], device)  # [B]
    ops = torch.ops.kcache_ops
    torch.library.opcheck(ops.qk_topn.default, (q, k, lens, 16, 0.125, True))
    scores, indices, lse, _ = ops.qk_topn(q, k, lens, 16, 0.125, False)
    torch.library.opcheck(ops.sparse_attn_v.default, (scores, indices, v, lse, False))
    pool = (torch.zeros(2, 2, 64, 64, device=device),
            torch.full((2, 2, 64), -1, dtype=torch.int32, device=device),
            torch.full((2, 2, 64), -1, dtype=torch.int32, device=device))  # rows, held, used
    torch.library.opcheck(ops.reuse_rows.default,
                          (indices, v, lens, *pool, torch.zeros(1, dtype=torch.int32,
                                                                device=device), False))
    torch.library.opcheck(ops.alloc_host.default, ([2, 3], torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_of_gather_rows(device):
    """gather_rows reads host memory only: on CUDA opcheck's copies of src must stay pinned."""
    if device != "cpu" and not clones_stay_pinned():
        pytest.skip("this torch's opcheck copies pinned memory into pageable memory (before "
                    "pytorch PR 185047), which the CUDA gather_rows refuses")
    src = host_tensor(torch.randn(2, 2, 40, 64), device)  # [B, Hkv, S, D]
    indices = torch.randint(0, 40, (2, 8, 16), dtype=torch.int32, device=device)  # [B, Hq, N]
    torch.library.opcheck(torch.ops.kcache_ops.gather_rows.default, (src, indices))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_opcheck_of_a_half_precision_v(dtype):
    """sparse_attn_v's output has V's dtype in its fake implementation as in the eager op (only
    float32 V was checked, where it is also the scores' dtype). On the CPU: the fake is the same
    for every device."""
    q = torch.randn(2, 8, 64)  # [B, Hq, D]
    k = torch.randn(2, 2, 40, 64)  # [B, Hkv, S, D]
    v = torch.randn(2, 2, 40, 64).to(dtype)  # [B, Hkv, S, D]
    scores, indices, lse = kcache_ops.qk_topn(q, k, seq_lens_tensor([40, 7], "cpu"), 16)
    torch.library.opcheck(torch.ops.kcache_ops.sparse_attn_v.default,
                          (scores, indices, v, lse, False))


def test_compile_decode_step(device):
    def decode(q, k, v, lens):
        scores, indices, lse = kcache_ops.qk_topn(q, k, lens, 8)
        return kcache_ops.sparse_attn_v(scores, indices, v, lse), lse

    q = torch.randn(3, 4, 128, device=device)  # [B, Hq, D]
    k = torch.randn(3, 1, 97, 128, device=device)  # [B, Hkv, S, D]
    v = host_tensor(torch.randn(3, 1, 97, 128), device)  # [B, Hkv, S, D]
    lens = seq_lens_tensor([97, 5, 0], device)  # [B]
    compiled = torch.compile(decode, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, lens), decode(q, k, v, lens))


def test_fake_checks_name_the_argument():
    """Under FakeTensorMode (torch.compile's tracing) a bad shape or bits gets the eager op's
    message, not an error from inside the fake implementation."""
    ops = torch.ops.kcache_ops
    with FakeTensorMode():
        q, k, lens = torch.randn(2, 4, 64), torch.randn(2, 2, 10, 64), torch.zeros(2).int()
        with pytest.raises(RuntimeError, match=r"q must have 3 dims, got shape \[4, 64\]"):
            ops.qk_topn(q[0], k, lens, 3, 0.1)
        with pytest.raises(RuntimeError, match="n must be in \\[1, 2\\^31\\), got -1"):
            ops.qk_topn(q, k, lens, -1, 0.1)
        scores, indices = torch.randn(2, 4, 3), torch.zeros(2, 4, 3).int()
        with pytest.raises(RuntimeError, match=r"scores must have 3 dims, got shape \[4, 3\]"):
            ops.sparse_attn_v(scores[0], indices, torch.randn(2, 2, 10, 64))
        with pytest.raises(RuntimeError, match=r"indices must have 3 dims, got shape \[4, 3\]"):
            ops.gather_rows(torch.randn(2, 2, 10, 64), indices[0])
        with pytest.raises(RuntimeError, match=r"held must have 3 dims, got shape \[3\]"):
            ops.reuse_rows(indices, torch.randn(2, 2, 10, 64), lens, torch.randn(2, 2, 3, 64),
                           lens.new_zeros(3), lens.new_zeros(2, 2, 3), lens.new_zeros(1), False)
        with pytest.raises(RuntimeError, match="bits must be 2 or 4, got 0"):
            ops.quantize_rows(torch.randn(3, 64), 0)
        with pytest.raises(RuntimeError, match="alloc_host: shape must have no negative size"):
            ops.alloc_host([3, -1], torch.float32)


def _mismatched_calls():
    """(call, message): an op called on arguments whose shapes disagree with each other (each
    argument's rank is right), and what the fake implementation says of it."""
    ops = torch.ops.kcache_ops
    q, k, lens = torch.randn(2, 4, 64), torch.randn(2, 2, 10, 64), torch.zeros(2).int()
    scores, indices, lse = torch.randn(2, 4, 3), torch.zeros(2, 4, 3).int(), torch.zeros(2, 4)
    codes = torch.zeros(2, 2, 10, 16, dtype=torch.uint8)  # [B, Hkv, S, D * bits / 8]
    meta = torch.zeros(2, 2, 10, 2, dtype=torch.bfloat16)  # [B, Hkv, S, 2]
    pool = (torch.randn(2, 2, 3, 64), torch.zeros(2, 2, 3).int(), torch.zeros(2, 2, 3).int())
    step = torch.zeros(1).int()
    return [
        (lambda: ops.qk_topn(q, k[:1], lens, 3, 0.1),
         r"qk_topn: k_cache must have 2 in dim 0 \(B, as in q\), got shape \[1, 2, 10, 64\]"),
        (lambda: ops.qk_topn(q, k[..., :32], lens, 3, 0.1), r"k_cache must have 64 in dim 3 \(D"),
        (lambda: ops.qk_topn(q, k, lens[:1], 3, 0.1), r"seq_lens must have 2 in dim 0 \(B"),
        (lambda: ops.qk_topn(q[:, :3], k, lens, 3, 0.1),
         r"q heads \(3\) must be a multiple of k_cache heads \(2\)"),
        (lambda: ops.sparse_attn_v(scores, indices[..., :2], k, lse),
         r"indices must have 3 in dim 2 \(N, as in scores\)"),
        (lambda: ops.sparse_attn_v(scores, indices, k, lse[:, :3]),
         r"lse must have 4 in dim 1 \(Hq, as in scores\)"),
        (lambda: ops.gather_rows(k[:1], indices), r"src must have 2 in dim 0 \(B, as in indices"),
        (lambda: ops.lowbit_tail(torch.randn(2, 4, 10), lens, lse, indices, codes,
                                 meta[..., :1], 2), r"v_meta must have 2 in dim 3, got shape"),
        (lambda: ops.lowbit_tail(torch.randn(2, 4, 9), lens, lse, indices, codes, meta, 2),
         r"v_codes must have 9 in dim 2 \(S, as in scores\)"),
        (lambda: ops.reuse_rows(indices, k, lens, *pool[:2], pool[2][..., :2], step, False),
         r"used must have 3 in dim 2 \(C, as in rows\)"),
        (lambda: ops.reuse_rows(indices, k, lens, *pool, step.repeat(2), False),
         r"step must have 1 in dim 0, got shape \[2\]"),
    ]


@pytest.mark.parametrize("case", range(len(_mismatched_calls())))
def test_fake_checks_shapes_against_each_other(case):
    """Shapes that disagree with each other are refused while torch.compile traces (under
    FakeTensorMode), naming the argument, the size expected and where it comes from, as the eager
    op refuses them when it runs."""
    call, message = _mismatched_calls()[case]
    with pytest.raises(RuntimeError, match="must have|must equal|must be a multiple|heads"):
        call()  # eager, on the CPU: refused for its shapes (not, say, a dtype)
    with FakeTensorMode(), pytest.raises(RuntimeError, match=message):
        _mismatched_calls()[case][0]()


def _metadata_calls():
    """(op, args, kwargs, message): a call that the eager CPU op refuses for an argument's dtype,
    dims, strides or a scalar alone (no tensor value read), for each check that the fake
    implementation makes besides the shapes' agreement (``_mismatched_calls``), and a phrase of
    what both say. Every other argument is valid: q [2, 4, 64], K and V [2, 2, 10, 64], N = 3."""
    i32 = torch.int32
    q, k, lens = torch.randn(2, 4, 64), torch.randn(2, 2, 10, 64), torch.full((2,), 5, dtype=i32)
    scores, indices, lse = torch.randn(2, 4, 3), torch.zeros(2, 4, 3, dtype=i32), torch.zeros(2, 4)
    v_sum = torch.zeros(2, 2, 64)  # [B, Hkv, D]
    every, codes = torch.randn(2, 4, 10), torch.zeros(2, 2, 10, 16, dtype=torch.uint8)
    meta = torch.zeros(2, 2, 10, 2, dtype=torch.bfloat16)  # [B, Hkv, S, 2]
    tail = (every, lens, lse, indices, codes, meta, 2)  # lowbit_tail's, 2 bits
    hot_v, hot_pos = torch.zeros(2, 2, 5, 64), torch.full((2, 5), -1, dtype=i32)
    rows, held = torch.zeros(2, 2, 6, 64), torch.full((2, 2, 6), -1, dtype=i32)  # C = G x N
    step = torch.zeros(1, dtype=i32)

    def strided(t):  # t with a last dim of stride > 1 (dense, so a meta copy keeps the strides)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    def pool(**changed):  # reuse_rows' arguments, those named in changed replaced
        args = dict(indices=indices, v_host=k, new_pos=lens, rows=rows, held=held,
                    used=held.clone(), step=step, group_select=False)
        return tuple({**args, **changed}.values())

    small = held[..., :5].contiguous()  # [B, Hkv, 5], a slot fewer than a step's rows
    topn, attn, gather = kcache_ops.qk_topn, kcache_ops.sparse_attn_v, kcache_ops.gather_rows
    quantize, low, reuse = kcache_ops.quantize_rows, kcache_ops.lowbit_tail, kcache_ops.reuse_rows
    floating = "must be float32, float16 or bfloat16, got"
    return [
        (topn, (q.double(), k.double(), lens, 3), {}, f"q {floating} float64"),
        (topn, (q, k.half(), lens, 3), {}, "q and k_cache must have the same dtype, got "
         "float32 and float16"),
        (topn, (q, k, lens.long(), 3), {}, "seq_lens must be int32, got int64"),
        (topn, (q[..., :32], k[..., :32], lens, 3), {}, "q: head dim must be 64 or 128, got 32"),
        (topn, (q, strided(k), lens, 3), {}, "k_cache must be contiguous in its last dim"),
        (topn, (q, k, lens, 0), {}, r"n must be in \[1, 2\^31\), got 0"),
        (topn, (q, k, lens, 3, 1e39), {}, r"scale must be finite \(as a float32\)"),
        (topn, (q, k, lens, 3), dict(skip_last=-1), r"skip_last must be in \[0, 2\^31\)"),
        (topn, (q, k, lens, 3), dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (attn, (scores.half(), indices, k, lse), {}, "scores must be float32, got float16"),
        (attn, (scores, indices.long(), k, lse), {}, "indices must be int32, got int64"),
        (attn, (scores, indices, k.int(), lse), {}, f"v_cache {floating} int32"),
        (attn, (scores, indices, k, lse.double(), False), {}, "lse must be float32, got float64"),
        (attn, (scores, indices, k[..., :48], lse), {}, "v_cache: head dim must be 64 or 128, got "
         "48"),
        (attn, (scores, indices, strided(k), lse), {}, "v_cache must be contiguous in its last"),
        (attn, (scores, indices, k, None, False), {}, "lse is required when renormalize=False"),
        (attn, (scores, indices, k, lse, False), dict(v_sum=v_sum), "v_sum and seq_lens must be "
         "given together"),
        (attn, (scores, indices, k, lse, False), dict(seq_lens=lens), "v_sum and seq_lens must be "
         "given together"),
        (attn, (scores, indices, k, lse, True), dict(v_sum=v_sum, seq_lens=lens),
         r"the mean tail \(v_sum\) needs renormalize=False"),
        (attn, (scores, indices, k, lse, False), dict(v_sum=v_sum.half(), seq_lens=lens),
         "v_sum must be float32, got float16"),
        (attn, (scores, indices, k, lse, False), dict(v_sum=v_sum, seq_lens=lens.long()),
         "seq_lens must be int32, got int64"),
        (gather, (k, indices.long()), {}, "indices must be int32, got int64"),
        (gather, (strided(k), indices), {}, "src must be contiguous in its last dim"),
        (reuse, pool(indices=indices.long()), {}, "indices must be int32, got int64"),
        (reuse, pool(new_pos=lens.long()), {}, "new_pos must be int32, got int64"),
        (reuse, pool(rows=rows.half()), {}, "rows and v_host must have the same dtype, got float16 "
         "and float32"),
        (reuse, pool(used=held.long()), {}, "used must be int32, got int64"),
        (reuse, pool(step=step.long()), {}, "step must be int32, got int64"),
        (reuse, pool(rows=rows[:, :, :5].contiguous(), held=small, used=small.clone()), {},
         r"rows must have at least 6 slots \(the rows of one step: G x N\), got 5"),
        (reuse, pool(held=held.transpose(0, 1).contiguous().transpose(0, 1)), {},
         r"held must be contiguous \(the pool, updated in place\), got strides \["),
        (quantize, (torch.randn(4, 3), 4), {}, r"v: last dim \(D\) must be a positive multiple "
         r"of 2 \(8 / bits\) for bits=4, got 3"),
        (quantize, (torch.zeros(4, 8, dtype=i32), 4), {}, f"v {floating} int32"),
        (quantize, (torch.randn(4, 8), 3), {}, "bits must be 2 or 4, got 3"),
        (quantize, (torch.tensor(1.0), 2), {}, "v must have at least 1 dim"),
        (quantize, (strided(torch.randn(4, 8)), 2), {}, "v must be contiguous in its last dim"),
        (low, (every.double(), *tail[1:]), {}, "scores must be float32, got float64"),
        (low, (every, lens.long(), *tail[2:]), {}, "seq_lens must be int32, got int64"),
        (low, (*tail[:2], lse.double(), *tail[3:]), {}, "lse must be float32, got float64"),
        (low, (*tail[:3], indices.long(), *tail[4:]), {}, "indices must be int32, got int64"),
        (low, (*tail[:4], codes.int(), meta, 2), {}, "v_codes must be uint8, got int32"),
        (low, (*tail[:4], codes[..., :12], meta, 2), {}, r"v_codes last dim must be D \* bits / "
         r"8 with D 64 or 128 \(16 or 32 bytes for bits = 2\), got 12"),
        (low, (*tail[:4], strided(codes), meta, 2), {}, "v_codes must be contiguous in its last"),
        (low, (*tail[:5], meta.float(), 2), {}, "v_meta must be bfloat16, got float32"),
        (low, (*tail[:6], 3), {}, "bits must be 2 or 4, got 3"),
        (low, tail, dict(skip_first=-1), r"skip_first must be in \[0, 2\^31\)"),
        (low, tail, dict(hot_v=hot_v), "hot_v and hot_pos must be given together"),
        (low, tail, dict(hot_v=hot_v.double(), hot_pos=hot_pos), f"hot_v {floating} float64"),
        (low, tail, dict(hot_v=hot_v[..., :32], hot_pos=hot_pos), "hot_v must have"),
        (low, tail, dict(hot_v=hot_v, hot_pos=hot_pos.long()), "hot_pos must be int32, got int64"),
    ]


def _on_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("case", range(len(_metadata_calls())))
def test_fake_refuses_what_eager_refuses(case):
    """A call the eager CPU op refuses for what it can see without reading a tensor's values is
    refused, with the same message, on meta tensors (the fake implementation, which
    torch.compile traces with): it gets no shapes to trace on. Both name the op first."""
    op, args, kwargs, message = _metadata_calls()[case]
    with pytest.raises(RuntimeError, match=message) as eager:
        op(*args, **kwargs)
    meta_args = [_on_meta(a) for a in args]
    meta_kwargs = {name: _on_meta(a) for name, a in kwargs.items()}
    with pytest.raises(RuntimeError, match=message) as fake:
        op(*meta_args, **meta_kwargs)
    assert str(eager.value).startswith(f"{op.__name__}: ")
    assert str(fake.value) == str(eager.value)


@pytest.mark.parametrize("top_p", [0, -0.0, 2, 1.5, -0.1, 1e-50, 1e5, 123456.0, 1e16, 2.0 ** 60,
                                   1.7976931348623157e308, float("inf"), float("nan"),
                                   -float("nan")])
def test_fake_writes_a_refused_float_as_eager_does(top_p):
    """The fake implementation writes a refused float as the eager op's C++ does (its shortest
    round-trip text, fixed or scientific: 0, 2, 1e+05, 1e+16, 1152921504606846976)."""
    q, k, lens = torch.randn(2, 4, 64), torch.randn(2, 2, 10, 64), torch.full((2,), 5).int()
    messages = []
    for device in ("cpu", "meta"):
        with pytest.raises(RuntimeError, match=r"^qk_topn: top_p must be in \(0, 1\]") as info:
            kcache_ops.qk_topn(q.to(device), k.to(device), lens.to(device), 3, top_p=top_p)
        messages.append(str(info.value))
    assert messages[1] == messages[0]


@pytest.mark.parametrize("call, args, message", [
    (lambda q, k, lens: kcache_ops.qk_topn(q, k, lens, 3),
     (torch.randn(2, 4, 64), torch.randn(1, 2, 10, 64), torch.zeros(2).int()),
     r"k_cache must have 2 in dim 0 \(B, as in q\)"),
    (lambda q, k, lens: kcache_ops.qk_topn(q, k, lens, 3),
     (torch.randn(2, 4, 32), torch.randn(2, 2, 10, 32), torch.zeros(2).int()),
     "q: head dim must be 64 or 128, got 32"),
    (lambda scores, indices, v: kcache_ops.sparse_attn_v(scores, indices, v),
     (torch.randn(2, 4, 3), torch.zeros(2, 4, 3, dtype=torch.int64), torch.randn(2, 2, 10, 64)),
     "indices must be int32, got int64"),
    (lambda scores, indices, v: kcache_ops.sparse_attn_v(scores, indices, v),
     (torch.randn(2, 4, 3), torch.zeros(2, 4, 3, dtype=torch.int32), torch.randn(2, 3, 10, 64)),
     r"scores heads \(4\) must be a multiple of v_cache heads \(3\)"),
    (lambda scores, indices, v: kcache_ops.sparse_attn_v(scores, indices, v),
     (torch.randn(2, 4, 3), torch.zeros(2, 4, 3, dtype=torch.int32), torch.randn(2, 2, 10, 96)),
     "v_cache: head dim must be 64 or 128, got 96"),
    (lambda v: kcache_ops.quantize_rows(v, 4), (torch.randn(4, 3),),
     r"v: last dim \(D\) must be a positive multiple of 2"),
])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_refuses_bad_arguments_while_tracing(call, args, message, dynamic):
    """torch.compile refuses a bad call while it traces, before any graph is compiled or run;
    with dynamic shapes too, whose messages give the sizes' values (not symbols such as s3)."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph

    compiled = torch.compile(call, fullgraph=True, backend=backend, dynamic=dynamic)
    with pytest.raises(Exception, match=message):
        compiled(*args)
    assert not graphs


@pytest.mark.parametrize("call, value, message", [
    (lambda q, k, lens, n: kcache_ops.qk_topn(q, k, lens, n), np.int64(3),
     "qk_topn: n must be a Python int under torch.compile"),
    (lambda q, k, lens, n: kcache_ops.qk_topn(q, k, lens, n), torch.tensor(3),
     "qk_topn: n must be a Python int under torch.compile .* got Tensor"),
    (lambda q, k, lens, s: kcache_ops.qk_topn(q, k, lens, 3, scale=s), torch.tensor(0.1),
     "qk_topn: scale must be a Python int or float under torch.compile"),
    (lambda q, k, lens, g: kcache_ops.qk_topn(q, k, lens, 3, group_select=g), np.bool_(True),
     "qk_topn: group_select must be a Python bool under torch.compile"),
])
def test_compile_names_a_numpy_or_tensor_scalar(call, value, message):
    """A NumPy or 0-d tensor scalar, which eager takes, is refused by name under
    torch.compile(fullgraph=True) (Dynamo failed on NumPy's dtype, inductor on the schema's
    int); without fullgraph the call falls back to eager, which takes it."""
    q, k, lens = torch.randn(2, 4, 64), torch.randn(2, 2, 10, 64), seq_lens_tensor([10, 3], "cpu")
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message):
        torch.compile(call, fullgraph=True)(q, k, lens, value)
    expected = call(q, k, lens, value)
    for got, want in zip(torch.compile(call)(q, k, lens, value), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape, dtype, message", [
    ([2], torch.qint8, r"dtype must be a plain \(not quantized, not bits\) dtype, got"),
    ([2], torch.bits8, r"dtype must be a plain \(not quantized, not bits\) dtype, got"),
    ([2**62, 4], torch.float16, r"needs more than 9223372036854775807 bytes \(its size "
                                r"overflows int64\)"),
    ([2**40, 2**40, 0], torch.float16, "has sizes or strides whose product overflows"),
    ([0, 2**40, 2**40], torch.float16, "has sizes or strides whose product overflows"),
])
def test_alloc_host_fake_refuses_what_eager_refuses(shape, dtype, message):
    """alloc_host's fake implementation (torch.compile's) refuses the dtypes and the sizes that
    the eager op does, with its message (it raised torch's own errors on them)."""
    with pytest.raises(RuntimeError, match=message):
        kcache_ops.alloc_host(shape, dtype)
    with FakeTensorMode(), pytest.raises(RuntimeError, match=message):
        kcache_ops.alloc_host(shape, dtype)


def test_fake_refuses_past_the_cuda_ops_limits():
    """On fake CUDA tensors (no GPU needed) the fake implementations refuse, with the CUDA op's
    message, what only the CUDA op refuses (csrc/cuda/qk_topn.cu, reuse_rows.cu,
    sparse_attn_v.cu, lowbit_tail.cu, gather_rows.cu, quantize_rows.cu): N past MAX_TOPN,
    group_select past MAX_GROUP_SELECT heads per KV head, a reuse pool or step past MAX_REUSE,
    sizes past the kernels' (each at its bound passes); on fake CPU tensors the same calls give
    shapes."""
    def qk_topn(device, B=1, Hq=4, Hkv=2, S=8, n=3, group_select=False):
        return kcache_ops.qk_topn(torch.empty(B, Hq, 64, device=device),
                                  torch.empty(B, Hkv, S, 64, device=device),
                                  torch.empty(B, dtype=torch.int32, device=device), n,
                                  group_select=group_select)

    def reuse_rows(device, N, C):  # G = 2 without group_select: a step of 2N entries
        i32 = dict(dtype=torch.int32, device=device)
        return kcache_ops.reuse_rows(torch.empty(1, 4, N, **i32), torch.empty(1, 2, 16, 64),
                                     torch.empty(1, **i32), torch.empty(1, 2, C, 64, device=device),
                                     torch.empty(1, 2, C, **i32), torch.empty(1, 2, C, **i32),
                                     torch.empty(1, **i32), False)

    def sparse_attn_v(device, B=1, S=8, N=3):
        return kcache_ops.sparse_attn_v(torch.empty(B, 4, N, device=device),
                                        torch.empty(B, 4, N, dtype=torch.int32, device=device),
                                        torch.empty(B, 2, S, 64))

    def lowbit_tail(device, B=1, Hq=4, S=8, N=3, H=None):
        f32, i32 = dict(device=device), dict(dtype=torch.int32, device=device)
        hot = {} if H is None else dict(hot_v=torch.empty(B, 2, H, 64, **f32),
                                        hot_pos=torch.empty(B, H, **i32))
        return kcache_ops.lowbit_tail(torch.empty(B, Hq, S, **f32), torch.empty(B, **i32),
                                      torch.empty(B, Hq, **f32), torch.empty(B, Hq, N, **i32),
                                      torch.empty(B, 2, S, 16, dtype=torch.uint8, device=device),
                                      torch.empty(B, 2, S, 2, dtype=torch.bfloat16, device=device),
                                      2, **hot)

    refused = [
        (dict(n=MAX_TOPN + 1),
         f"qk_topn: n must be at most {MAX_TOPN} on CUDA, got {MAX_TOPN + 1}$"),
        (dict(Hq=MAX_GROUP_SELECT + 1, Hkv=1, group_select=True),
         f"qk_topn: group_select supports at most {MAX_GROUP_SELECT} query heads per KV head, got "
         f"{MAX_GROUP_SELECT + 1}$"),
        (dict(S=2**30 + 1), r"qk_topn: sizes out of range for the CUDA kernels \(B, Hq < 65536, "
                            r"S <= 2\^30\): B=1, Hq=4, S=1073741825$"),
        (dict(B=65536), "B=65536, Hq=4, S=8$"), (dict(Hq=65536), "B=1, Hq=65536, S=8$")]
    with FakeTensorMode():
        for args, message in refused:
            assert qk_topn("cpu", **args)[0].device.type == "cpu"
            with pytest.raises(RuntimeError, match=message):
                qk_topn("cuda", **args)
        assert qk_topn("cuda", n=MAX_TOPN)[0].shape == (1, 4, MAX_TOPN)
        most = qk_topn("cuda", Hq=MAX_GROUP_SELECT, Hkv=1, group_select=True)[0]
        assert most.shape[1] == MAX_GROUP_SELECT
        per_head = qk_topn("cuda", Hq=MAX_GROUP_SELECT + 1, Hkv=1)[0]  # no limit per head
        assert per_head.shape[1] == MAX_GROUP_SELECT + 1
        assert qk_topn("cuda", S=2**30)[0].shape == (1, 4, 3)
        for N, C in ((MAX_REUSE // 2 + 1, MAX_REUSE + 2), (4, MAX_REUSE + 1)):
            assert reuse_rows("cpu", N, C)[0].shape == (1, 4, N)
            with pytest.raises(RuntimeError, match=(
                    f"reuse_rows: the CUDA kernel holds a pool of at most {MAX_REUSE} slots and a "
                    f"step of at most {MAX_REUSE} entries .* got {C} slots and {2 * N} entries$")):
                reuse_rows("cuda", N, C)
        assert reuse_rows("cuda", MAX_REUSE // 2, MAX_REUSE)[0].shape == (1, 4, MAX_REUSE // 2)
        for args, message in (
                (dict(S=2**31), r"the CUDA kernel \(B < 65536, S < 2\^31, N < 2\^24\): B=1, "
                                r"S=2147483648, N=3$"),
                (dict(B=65536), "B=65536, S=8, N=3$"),
                (dict(N=2**24), "B=1, S=8, N=16777216$")):
            assert sparse_attn_v("cpu", **args).device.type == "cpu"
            with pytest.raises(RuntimeError, match="sparse_attn_v: sizes out of range for .*" +
                               message):
                sparse_attn_v("cuda", **args)
        assert sparse_attn_v("cuda", S=2**31 - 1, N=2**24 - 1).shape == (1, 4, 64)
        for args, message in (
                (dict(S=2**30 + 1), r"the CUDA kernels \(B, Hq < 65536, S <= 2\^30, "
                                    r"N < 2\^24\): B=1, Hq=4, S=1073741825, N=3$"),
                (dict(N=2**24), "B=1, Hq=4, S=8, N=16777216$"),
                (dict(B=65536), "B=65536, Hq=4, S=8, N=3$"),
                (dict(Hq=65536), "B=1, Hq=65536, S=8, N=3$")):
            assert lowbit_tail("cpu", **args).device.type == "cpu"
            with pytest.raises(RuntimeError, match="lowbit_tail: sizes out of range for .*" +
                               message):
                lowbit_tail("cuda", **args)
        assert lowbit_tail("cpu", H=2**30).device.type == "cpu"
        with pytest.raises(RuntimeError, match=r"lowbit_tail: hot_v rows out of range for the "
                                               r"CUDA kernels \(below 2\^30\): H=1073741824$"):
            lowbit_tail("cuda", H=2**30)
        assert lowbit_tail("cuda", S=2**30, N=2**24 - 1, H=2**30 - 1).shape == (1, 4, 64)
        for src, indices, message in (
                ([1, 1, 2**31, 64], [1, 2, 3], "H=2, S=2147483648, N=3, a row's bytes=256$"),
                ([1, 1, 8, 64], [1, 2**31, 3], "H=2147483648, S=8, N=3, a row's bytes=256$"),
                ([1, 1, 8, 64], [1, 2, 2**31], "H=2, S=8, N=2147483648, a row's bytes=256$"),
                ([1, 1, 8, 2**29], [1, 2, 3], "H=2, S=8, N=3, a row's bytes=2147483648$")):
            ints = dict(dtype=torch.int32)
            assert kcache_ops.gather_rows(torch.empty(src), torch.empty(indices, **ints)).ndim == 4
            with pytest.raises(RuntimeError, match=r"gather_rows: sizes out of range for the CUDA "
                                                   r"kernel \(each below 2\^31\): " + message):
                kcache_ops.gather_rows(torch.empty(src),
                                       torch.empty(indices, **ints, device="cuda"))
        for src, indices in (([1, 1, 2**31 - 1, 2**29 - 1], [1, 2**31 - 1, 1]),
                             ([1, 1, 8, 64], [1, 1, 2**31 - 1])):  # each size at its edge
            edge = kcache_ops.gather_rows(torch.empty(src), torch.empty(indices, dtype=torch.int32,
                                                                        device="cuda"))
            assert edge.shape == (*indices, src[-1])
        for shape, message in (([2**33 - 3, 64], "rows=8589934589, D=64$"),  # 2^31 blocks
                               ([1, 2**30 + 4], "rows=1, D=1073741828$")):
            assert kcache_ops.quantize_rows(torch.empty(shape), 2)[0].shape[0] == shape[0]
            with pytest.raises(RuntimeError, match=(
                    r"quantize_rows: sizes out of range for the CUDA kernel \(D <= 2\^30, rows "
                    r"below 4 x 2\^31\): " + message)):
                kcache_ops.quantize_rows(torch.empty(shape, device="cuda"), 2)
        for shape in ([4 * (2**31 - 1), 64], [1, 2**30]):  # each size at its edge
            assert kcache_ops.quantize_rows(torch.empty(shape, device="cuda"), 2)[0].ndim == 2


def test_meta_argument_among_real_ones():
    """A meta tensor among real ones is refused (the fake implementation would otherwise make
    uninitialised outputs on the real tensors' device); every argument on meta gives the shapes.
    Host memory is offered as the only place where the op runs on the CPU, and beside the device
    where it runs on CUDA (fake CUDA tensors: no GPU needed), but for gather_rows' src, which its
    CUDA op reads from host memory only."""
    q, k, lens = torch.randn(2, 4, 64), torch.randn(2, 2, 10, 64), seq_lens_tensor([10, 3], "cpu")
    with pytest.raises(RuntimeError, match="seq_lens must be on cpu .* got meta"):
        kcache_ops.qk_topn(q, k, lens.to("meta"), 3)
    with pytest.raises(RuntimeError, match=r"src must be in host memory \(on cpu\), got meta$"):
        kcache_ops.gather_rows(k.to("meta"), torch.zeros(2, 4, 3, dtype=torch.int32))
    with FakeTensorMode(), pytest.raises(RuntimeError, match=(
            r"v_cache must be in host memory \(on cpu\) or on cuda:0 \(the device of scores\), "
            r"got meta$")):
        kcache_ops.sparse_attn_v(torch.empty(2, 4, 3, device="cuda"),
                                 torch.empty(2, 4, 3, dtype=torch.int32, device="cuda"),
                                 torch.empty(2, 2, 10, 64, device="meta"))
    for src in ("meta", "cuda"):  # the CUDA gather_rows reads host memory only
        with FakeTensorMode(), pytest.raises(RuntimeError, match=(
                f"src must be in host memory \\(on cpu\\), got {src}")):
            kcache_ops.gather_rows(torch.empty(2, 2, 10, 64, device=src),
                                   torch.empty(2, 4, 3, dtype=torch.int32, device="cuda"))
    with FakeTensorMode():  # its CUDA call: src in host memory, indices on the device
        dst = kcache_ops.gather_rows(torch.empty(2, 2, 10, 64),
                                     torch.empty(2, 4, 3, dtype=torch.int32, device="cuda"))
    assert dst.shape == (2, 4, 3, 64) and dst.device == torch.device("cuda", 0)
    scores, indices, lse = kcache_ops.qk_topn(q.to("meta"), k.to("meta"), lens.to("meta"), 3)
    assert scores.shape == indices.shape == (2, 4, 3) and lse.shape == (2, 4)
    assert scores.device.type == "meta"


def test_fake_outputs_have_the_eager_outputs_metadata():
    """On meta tensors (the fakes torch.compile traces with) each op gives outputs of the eager
    op's shapes, dtypes and strides, where the fakes' rules are least plain: qk_topn's all_scores
    rows padded to 4 floats (S = 5), gather_rows' rows in src's dtype (bfloat16), reuse_rows under
    group_select with a pool of only N slots (one row per selected position of the group)."""
    def meta(args):
        return [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]

    i32 = dict(dtype=torch.int32)
    ops = torch.ops.kcache_ops
    reuse = (torch.tensor([[[3, 5]] * 4], **i32),  # [1, Hq 4, N 2]: one selection per group
             torch.randn(1, 1, 8, 64), torch.zeros(1, **i32), torch.zeros(1, 1, 2, 64),
             torch.full((1, 1, 2), -1, **i32), torch.full((1, 1, 2), -1, **i32),
             torch.zeros(1, **i32), True)
    cases = [(ops.qk_topn, (torch.randn(1, 2, 64), torch.randn(1, 1, 5, 64),
                            torch.tensor([5], **i32), 2, 0.125, False, True, True, 0, 0, 1.0)),
             (ops.gather_rows, (torch.randn(1, 1, 4, 64, dtype=torch.bfloat16),
                                torch.zeros(1, 2, 3, **i32), True)),
             (ops.reuse_rows, reuse)]
    for op, args in cases:
        fake = op(*meta(args))
        for e, f in zip(op(*args), fake):
            assert (f.shape, f.dtype, f.stride()) == (e.shape, e.dtype, e.stride()), op


def test_compiled_reuse_rows_refuses_a_pool_sharing_memory():
    """Under torch.compile reuse_rows runs on copies of the pool it updates, where the eager op's
    check finds nothing to refuse: overlapping views of one buffer were taken, and gave other
    results than eager. The fake refuses them, as eager does, naming the two; views that do not
    overlap run, as in eager."""
    def step(*args):
        return kcache_ops.reuse_rows(*args, False)

    indices = torch.tensor([[[3, 5, -1]]], dtype=torch.int32)  # [1, 1, 3]
    v, rows = torch.randn(1, 1, 8, 64), torch.zeros(1, 1, 6, 64)
    held, used = torch.full((2, 1, 1, 6), -1, dtype=torch.int32)  # [1, 1, C] each
    zero = torch.zeros(1, dtype=torch.int32)  # new_pos, step
    big = torch.randn(1, 1, 12, 64)
    cases = [((indices, big[:, :, :8], zero, big[:, :, 6:], held, used, zero), "rows and v_host"),
             ((held[..., :3], v, zero, rows, held, used, zero), "held and indices"),
             ((indices, v, used[0, 0, :1], rows, held, used, zero), "used and new_pos"),
             ((indices, v, zero, rows, held, held, zero), "held and used")]
    for args, names in cases:
        torch._dynamo.reset()
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        with pytest.raises(Exception, match=f"{names} must not share memory"):
            compiled(*args)
    assert held.eq(-1).all() and used.eq(-1).all() and rows.eq(0).all()
    torch._dynamo.reset()
    pair = torch.full((2, 1, 1, 6), -1, dtype=torch.int32)  # held and used, one buffer
    eager_pair = pair.clone()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(indices, v, zero, rows.clone(), pair[0], pair[1], zero)
    want = step(indices, v, zero, rows.clone(), eager_pair[0], eager_pair[1], zero)
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and torch.equal(pair, eager_pair)


def test_ops_are_not_differentiable(device):
    """A backward through an op's output raises instead of leaving the gradient None."""
    q = torch.randn(2, 4, 64, device=device, requires_grad=True)
    k = torch.randn(2, 2, 10, 64, device=device)
    _, _, lse = kcache_ops.qk_topn(q, k, seq_lens_tensor([10, 3], device), 3)
    with pytest.raises(RuntimeError, match="kcache_ops::qk_topn.*not implemented|not implemented"
                                           ".*kcache_ops::qk_topn"):
        lse.sum().backward()
