"""Plain-PyTorch versions of every op, computed in float32: the oracle for the tests and the
baseline ("the PyTorch way") for the benchmarks. Same semantics as DESIGN.md §3."""
import math

import torch


def _valid_mask(seq_lens, length):
    """[B] lengths -> [B, 1, length] bool, True for j < L_b."""
    j = torch.arange(length, device=seq_lens.device)
    return (j[None, :] < seq_lens.long()[:, None])[:, None, :]


def qk_scores(q, k_cache, seq_lens, scale=None):
    """Masked scores and their log-sum-exp.

    q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B]
    -> s [B, Hq, S] float32 (-inf for j >= L_b), lse [B, Hq] float32.
    """
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k_cache.float().repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, S, D]
    s = torch.einsum("bhd,bhsd->bhs", q.float(), k) * scale  # [B, Hq, S]
    s = s.masked_fill(~_valid_mask(seq_lens, S), float("-inf"))
    return s, torch.logsumexp(s, dim=-1)


def _top(keys, n):
    """Descending order of keys [..., S], ties to the lower index -> order [..., min(n, S)]."""
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :n]


def qk_topn(q, k_cache, seq_lens, n, scale=None, group_select=False):
    """Reference of kcache_ops.qk_topn.

    q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B]
    -> scores [B, Hq, n] float32, indices [B, Hq, n] int32, lse [B, Hq] float32.
    Entries past L_b are padding: index -1, score -inf.
    """
    B, Hq, _ = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    s, lse = qk_scores(q, k_cache, seq_lens, scale)  # [B, Hq, S], [B, Hq]
    if group_select:
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # [B, Hq, S]; L_b = 0 gives 0
        c = p.view(B, Hkv, G, S).sum(dim=2)  # [B, Hkv, S]
        c = c.masked_fill(~_valid_mask(seq_lens, S), float("-inf"))
        idx = _top(c, n).repeat_interleave(G, dim=1)  # [B, Hq, min(n, S)]
    else:
        idx = _top(s, n)  # [B, Hq, min(n, S)]
    scores = torch.gather(s, -1, idx)  # [B, Hq, min(n, S)]
    pad = n - idx.shape[-1]
    if pad > 0:
        idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    slot = torch.arange(n, device=q.device)  # [n]
    padding = slot[None, None, :] >= seq_lens.long().to(q.device)[:, None, None]  # [B, 1, n]
    idx = idx.masked_fill(padding, -1).to(torch.int32)
    scores = scores.masked_fill(padding, float("-inf"))
    return scores, idx, lse


def attn_weights(scores, indices, lse=None, renormalize=True):
    """Weights p [B, Hq, N] float32 of the selected entries; 0 at padding (index -1)."""
    valid = indices >= 0  # [B, Hq, N]
    s = scores.float().masked_fill(~valid, float("-inf"))
    if renormalize:
        p = torch.softmax(s, dim=-1)
    else:
        if lse is None:
            raise ValueError("lse is required when renormalize=False")
        p = torch.exp(s - lse.float()[..., None])
    return p.nan_to_num(0.0).masked_fill(~valid, 0.0)


def gather_rows(src, indices):
    """Reference of kcache_ops.gather_rows.

    src [B, Hs, S, D], indices [B, H, N] -> dst [B, H, N, D] on the device of indices (dtype of
    src); rows for index -1 are zero.
    """
    B, H, N = indices.shape
    Hs, D = src.shape[1], src.shape[3]
    src = src.to(indices.device).repeat_interleave(H // Hs, dim=1)  # [B, H, S, D]
    idx = indices.long().clamp(min=0)[..., None].expand(B, H, N, D)  # [B, H, N, D]
    dst = torch.gather(src, 2, idx)  # [B, H, N, D]
    return dst.masked_fill((indices < 0)[..., None], 0)


def sparse_attn_v(scores, indices, v_cache, lse=None, renormalize=True):
    """Reference of kcache_ops.sparse_attn_v.

    scores [B, Hq, N] float32, indices [B, Hq, N] int32, v_cache [B, Hkv, S, D], lse [B, Hq]
    -> out [B, Hq, D] (dtype of v_cache) on the device of scores.
    """
    p = attn_weights(scores, indices, lse, renormalize)  # [B, Hq, N]
    v = gather_rows(v_cache, indices).float()  # [B, Hq, N, D]
    return torch.einsum("bhn,bhnd->bhd", p, v).to(v_cache.dtype)


def decode_attention(q, k_cache, v_cache, seq_lens, n, scale=None, group_select=False,
                     renormalize=True):
    """KCache attention for one decode step: qk_topn then sparse_attn_v -> out [B, Hq, D]."""
    scores, indices, lse = qk_topn(q, k_cache, seq_lens, n, scale, group_select)
    return sparse_attn_v(scores, indices, v_cache, lse, renormalize)
