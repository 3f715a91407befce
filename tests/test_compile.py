"""torch.library.opcheck on each op (schema, fake implementation, dispatch agree), and
torch.compile over a decode step that calls qk_topn and sparse_attn_v."""
import pytest
import torch
from conftest import host_tensor, seq_lens_tensor

import kcache_ops


def test_opcheck(device):
    q = torch.randn(2, 8, 64, device=device)  # [B, Hq, D]
    k = torch.randn(2, 2, 40, 64, device=device)  # [B, Hkv, S, D]
    v = host_tensor(torch.randn(2, 2, 40, 64), device)  # [B, Hkv, S, D]
    lens = seq_lens_tensor([40, 7], device)  # [B]
    ops = torch.ops.kcache_ops
    torch.library.opcheck(ops.qk_topn.default, (q, k, lens, 16, 0.125, True))
    scores, indices, lse, _ = ops.qk_topn(q, k, lens, 16, 0.125, False)
    torch.library.opcheck(ops.sparse_attn_v.default, (scores, indices, v, lse, False))
    torch.library.opcheck(ops.gather_rows.default, (v, indices))
    pool = (torch.zeros(2, 2, 64, 64, device=device),
            torch.full((2, 2, 64), -1, dtype=torch.int32, device=device),
            torch.full((2, 2, 64), -1, dtype=torch.int32, device=device))  # rows, held, used
    torch.library.opcheck(ops.reuse_rows.default,
                          (indices, v, lens, *pool, torch.zeros(1, dtype=torch.int32,
                                                                device=device), False))
    torch.library.opcheck(ops.alloc_host.default, ([2, 3], torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))


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
    from torch._subclasses.fake_tensor import FakeTensorMode

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
    from torch._subclasses.fake_tensor import FakeTensorMode

    call, message = _mismatched_calls()[case]
    with pytest.raises(RuntimeError, match="must have|must equal|must be a multiple|heads"):
        call()  # eager, on the CPU: refused for its shapes (not, say, a dtype)
    with FakeTensorMode(), pytest.raises(RuntimeError, match=message):
        _mismatched_calls()[case][0]()


def test_compile_refuses_mismatched_shapes_while_tracing():
    compiled = torch.compile(lambda q, k, lens: kcache_ops.qk_topn(q, k, lens, 3), fullgraph=True,
                             backend="eager")
    with pytest.raises(Exception, match=r"k_cache must have 2 in dim 0 \(B, as in q\)"):
        compiled(torch.randn(2, 4, 64), torch.randn(1, 2, 10, 64), torch.zeros(2).int())


def test_meta_argument_among_real_ones():
    """A meta tensor among real ones is refused (the fake implementation would otherwise make
    uninitialised outputs on the real tensors' device); every argument on meta gives the shapes."""
    q, k, lens = torch.randn(2, 4, 64), torch.randn(2, 2, 10, 64), seq_lens_tensor([10, 3], "cpu")
    with pytest.raises(RuntimeError, match="seq_lens must be on cpu .* got meta"):
        kcache_ops.qk_topn(q, k, lens.to("meta"), 3)
    with pytest.raises(RuntimeError, match="src must be in host memory .* got meta"):
        kcache_ops.gather_rows(k.to("meta"), torch.zeros(2, 4, 3, dtype=torch.int32))
    scores, indices, lse = kcache_ops.qk_topn(q.to("meta"), k.to("meta"), lens.to("meta"), 3)
    assert scores.shape == indices.shape == (2, 4, 3) and lse.shape == (2, 4)
    assert scores.device.type == "meta"


def test_ops_are_not_differentiable(device):
    """A backward through an op's output raises instead of leaving the gradient None."""
    q = torch.randn(2, 4, 64, device=device, requires_grad=True)
    k = torch.randn(2, 2, 10, 64, device=device)
    _, _, lse = kcache_ops.qk_topn(q, k, seq_lens_tensor([10, 3], device), 3)
    with pytest.raises(RuntimeError, match="kcache_ops::qk_topn.*not implemented|not implemented"
                                           ".*kcache_ops::qk_topn"):
        lse.sum().backward()
