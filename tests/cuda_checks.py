"""Helpers of the CUDA-only tests: the skip marker, CUDA graph capture, a memory-light float32
reference of the scores, and the top-N checks that tolerate rounding (values at the picks,
threshold, order, padding)."""
import math

import pytest
import torch

import kcache_ops
from kcache_ops.devices import graphed

requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and kcache_ops.built_with_cuda()),
    reason="needs a CUDA GPU and kcache_ops built with its CUDA kernels")


def capture_graph(step):
    """step() warmed up on a side stream, then captured in a CUDA graph on the current CUDA
    device, as the throughput bench captures a decode step (kcache_ops.devices.graphed) ->
    (graph, what the captured call returned: its static outputs, rewritten by each
    graph.replay())."""
    return graphed(step, torch.cuda.current_device())


def ref_scores(q, k_cache, seq_lens, scale):
    """Float32 scores one sequence at a time (no [B, Hq, S, D] copy of K).

    q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B] -> s [B, Hq, S] (-inf for j >= L_b),
    lse [B, Hq].
    """
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    s = torch.empty(B, Hq, S, device=q.device)
    for b in range(B):
        qg = q[b].float().view(Hkv, Hq // Hkv, D)  # [Hkv, G, D]
        s[b] = (qg @ k_cache[b].float().transpose(-1, -2)).reshape(Hq, S) * scale
    past = torch.arange(S, device=q.device)[None, None, :] >= seq_lens.long()[:, None, None]
    s.masked_fill_(past, float("-inf"))  # [B, Hq, S]
    return s, torch.logsumexp(s, dim=-1)


def random_case(B, Hq, Hkv, S, D, dtype, device="cuda", lens=None, integer=False, seed=0):
    """q [B, Hq, D], k [B, Hkv, S, D], seq_lens [B] int32 with fresh values (small integers when
    `integer`, so that scores are exact and ties happen)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if integer:
        q = torch.randint(-2, 3, (B, Hq, D), generator=g, device=device).to(dtype)
        k = torch.randint(-2, 3, (B, Hkv, S, D), generator=g, device=device).to(dtype)
    else:
        q = torch.randn(B, Hq, D, generator=g, device=device).to(dtype)
        k = torch.randn(B, Hkv, S, D, generator=g, device=device).to(dtype)
    if lens is None:
        lens = torch.randint(0, S + 1, (B,), generator=g, device=device)
    return q, k, torch.as_tensor(lens, device=device).to(torch.int32)


def check_topn(scores, indices, lse, s_ref, lse_ref, seq_lens, n, group=None, atol=1e-4):
    """Checks qk_topn output against float32 reference scores s_ref [B, Hq, S] without requiring
    the same choice among near-ties: padding, lse, scores equal s_ref at the picks, picks distinct
    and in range, every pick clears the n-th key, keys non-increasing."""
    B, Hq, S = s_ref.shape
    G = group
    assert scores.shape == (B, Hq, n) and indices.shape == (B, Hq, n) and lse.shape == (B, Hq)
    torch.testing.assert_close(lse, lse_ref, atol=atol, rtol=1e-5)
    for b in range(B):
        L = int(seq_lens[b])
        cnt = min(n, L)
        assert (indices[b, :, cnt:] == -1).all() and (scores[b, :, cnt:] == float("-inf")).all()
        if cnt == 0:
            assert (lse[b] == float("-inf")).all()
            continue
        idx = indices[b, :, :cnt].long()  # [Hq, cnt]
        assert (idx >= 0).all() and (idx < L).all()
        assert (idx.sort(dim=-1).values.diff(dim=-1) > 0).all(), "repeated index"
        torch.testing.assert_close(scores[b, :, :cnt], s_ref[b].gather(-1, idx), atol=atol,
                                   rtol=1e-4)
        if G is None:  # per head: rank by s
            keys = s_ref[b, :, :L]  # [Hq, L]
        else:  # group mode: same indices in the group, rank by group mass
            assert (indices[b].view(-1, G, n) == indices[b].view(-1, G, n)[:, :1]).all()
            p = torch.exp(s_ref[b, :, :L] - lse_ref[b, :, None])
            keys = p.view(-1, G, L).sum(1).repeat_interleave(G, 0)  # [Hq, L]
        picked = keys.gather(-1, idx)  # [Hq, cnt]
        kth = keys.topk(cnt, dim=-1).values[:, -1:]  # [Hq, 1]
        if G is None:  # scores: absolute rounding
            assert (picked >= kth - atol).all(), "a pick below the n-th score"
            assert (picked.diff(dim=-1) <= atol).all(), "scores not descending"
        else:  # group mass: relative rounding of exp(s - lse)
            rel = 3 * atol
            assert (picked >= kth * (1 - rel) - 1e-30).all(), "a pick below the n-th group mass"
            assert (picked[:, 1:] <= picked[:, :-1] * (1 + rel) + 1e-30).all(), "not descending"

def host_random(shape, dtype, block=1 << 24):
    """Pinned mapped host tensor (kcache_ops.alloc_host) of random values, filled by repeating one
    random block of `block` elements (a serial CPU generator would take seconds per GiB)."""
    t = kcache_ops.alloc_host(shape, dtype)
    flat = t.view(-1)
    pattern = torch.randn(min(block, flat.numel())).to(dtype)
    for start in range(0, flat.numel(), pattern.numel()):
        end = min(flat.numel(), start + pattern.numel())
        flat[start:end] = pattern[: end - start]
    return t


def default_scale(D):
    return 1.0 / math.sqrt(D)
