"""One KCache decode step (qk_topn + sparse_attn_v) captured in a CUDA graph and replayed with new
inputs copied into its static buffers: the ops launch on the current stream, allocate through the
caching allocator and never synchronise with the host while capturing."""
import pytest
import torch

import kcache_ops
from kcache_ops import reference
from cuda_checks import capture_graph, requires_cuda

pytestmark = requires_cuda


@pytest.mark.parametrize("group_select", [False, True])
@pytest.mark.parametrize("renormalize", [True, False])
def test_decode_step_graph_replay(group_select, renormalize):
    B, Hq, Hkv, S, D, n = 4, 32, 8, 4096, 128, 64
    dtype = torch.bfloat16
    q = torch.empty(B, Hq, D, device="cuda", dtype=dtype)       # static inputs
    k = torch.empty(B, Hkv, S, D, device="cuda", dtype=dtype)
    lens = torch.empty(B, device="cuda", dtype=torch.int32)
    v = kcache_ops.alloc_host((B, Hkv, S, D), dtype)             # host RAM, read in place
    q.normal_()
    k.normal_()
    v.normal_()
    lens.copy_(torch.tensor([S, 3000, 17, 0]))

    def step():
        scores, idx, lse = kcache_ops.qk_topn(q, k, lens, n, None, group_select)
        return kcache_ops.sparse_attn_v(scores, idx, v, lse, renormalize), idx

    graph, (out, idx) = capture_graph(step)

    for trial in range(3):
        q.copy_(torch.randn(B, Hq, D, device="cuda", dtype=dtype))
        k.copy_(torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype))
        v.copy_(torch.randn(B, Hkv, S, D, dtype=dtype))
        lens.copy_(torch.randint(0, S + 1, (B,), dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        want_scores, want_idx, want_lse = reference.qk_topn(q, k, lens, n, None, group_select)
        want = reference.sparse_attn_v(want_scores.cpu(), want_idx.cpu(), v, want_lse.cpu(),
                                       renormalize)
        # same selections up to near-ties; the outputs agree to bf16 rounding
        agree = (idx == want_idx).float().mean().item()
        assert agree > 0.99, f"trial {trial}: only {agree:.3f} of the indices agree"
        torch.testing.assert_close(out.cpu().float(), want.float(), atol=2e-2, rtol=2e-2)
