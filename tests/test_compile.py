"""torch.library.opcheck on each op (schema, fake implementation, dispatch agree), and
torch.compile over a decode step that calls qk_topn and sparse_attn_v."""
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
