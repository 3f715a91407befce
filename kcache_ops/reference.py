"""Plain-PyTorch versions of every op, computed in float32: the oracle for the tests and the
baseline ("the PyTorch way") for the benchmarks. Same semantics as DESIGN.md §3."""
import math

import torch


def _valid_mask(seq_lens, length, skip_first=0, skip_last=0):
    """[B] lengths -> [B, 1, length] bool, True for ``skip_first <= j < L_b − skip_last`` (L_b
    clamped to [0, length]): the valid keys, less KCache's hot rows where skips are given."""
    j = torch.arange(length, device=seq_lens.device)  # [length]
    end = seq_lens.long().clamp(0, length) - skip_last  # [B]
    return ((j[None, :] >= skip_first) & (j[None, :] < end[:, None]))[:, None, :]


_SCORE_CHUNK_ELEMENTS = 1 << 24  # products qk_scores forms at once (64 MiB of float32)


def qk_scores(q, k_cache, seq_lens, scale=None):
    """Masked scores and their log-sum-exp.

    q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B]
    -> s [B, Hq, S] float32 (-inf for j >= L_b), lse [B, Hq] float32.
    """
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.float().view(B, Hkv, Hq // Hkv, 1, D)  # [B, Hkv, G, 1, D]: head h reads KV head h // G
    # each key's products summed the same way (a matmul rounds the rows of different tiles
    # differently: equal keys scored unequally, and their tie went off the lower index), in
    # chunks of keys to bound the [B, Hkv, G, chunk, D] products
    chunk = max(1, _SCORE_CHUNK_ELEMENTS // max(1, B * Hq * D))
    s = torch.cat([(qg * k[:, :, None].float()).sum(-1)  # [B, Hkv, G, chunk]
                   for k in k_cache.split(chunk, dim=2)], dim=-1)
    s = s.view(B, Hq, S) * scale  # [B, Hq, S]
    s = s.masked_fill(~_valid_mask(seq_lens, S), float("-inf"))
    return s, torch.logsumexp(s, dim=-1)


def _top(keys, ranked, n):
    """The keys [..., S] where ranked [..., S] (bool, broadcast) in descending order, ties to the
    lower index, then the others -> order [..., min(n, S)]."""
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices  # [..., S]
    ranked = torch.gather(ranked.expand_as(keys), -1, order)  # [..., S] in that order
    first = torch.sort(ranked.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return torch.gather(order, -1, first)[..., :n]


def qk_topn(q, k_cache, seq_lens, n, scale=None, group_select=False, skip_first=0, skip_last=0,
            top_p=1.0):
    """Reference of kcache_ops.qk_topn.

    q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B]
    -> scores [B, Hq, n] float32, indices [B, Hq, n] int32, lse [B, Hq] float32.
    The top n of the keys skip_first <= j < L_b - skip_last; lse over all j < L_b. Entries past
    those keys are padding: index -1, score -inf. Each head then keeps the :func:`mass_prefix` of
    its entries (all of them at top_p = 1).
    """
    B, Hq, _ = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    s, lse = qk_scores(q, k_cache, seq_lens, scale)  # [B, Hq, S], [B, Hq]
    ranked = _valid_mask(seq_lens.to(q.device), S, skip_first, skip_last)  # [B, 1, S]
    count = ranked.sum(-1)  # [B, 1]: ranked keys per sequence
    if group_select:
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # [B, Hq, S]; L_b = 0 gives 0
        # the heads added one after another: the same adds at every key, so equal keys tie (a
        # sum over dim 2 rounds keys differently as its vector lanes fall, 1 ulp apart)
        heads = p.view(B, Hkv, G, S).unbind(2)  # G x [B, Hkv, S]
        c = heads[0]
        for head in heads[1:]:
            c = c + head  # [B, Hkv, S]
        idx = _top(c, ranked, n).repeat_interleave(G, dim=1)  # [B, Hq, min(n, S)]
    else:
        idx = _top(s, ranked, n)  # [B, Hq, min(n, S)]
    scores = torch.gather(s, -1, idx)  # [B, Hq, min(n, S)]
    pad = n - idx.shape[-1]
    if pad > 0:
        idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    slot = torch.arange(n, device=q.device)  # [n]
    padding = slot[None, None, :] >= count[:, :, None]  # [B, 1, n]
    idx = idx.masked_fill(padding, -1).to(torch.int32)
    scores = scores.masked_fill(padding, float("-inf"))
    scores, idx = mass_prefix(scores, idx, lse, top_p)
    return scores, idx, lse


def mass_prefix(scores, indices, lse, top_p):
    """Per head, the shortest prefix of the selected entries (in their order) whose full-softmax
    mass ``Σ exp(score − lse)`` (NaN counting 0) reaches ``top_p``; the rest marked padding.

    scores [B, Hq, N] float32, indices [B, Hq, N] int32 (-1 padding), lse [B, Hq] float32
    -> (scores [B, Hq, N] with -inf, indices [B, Hq, N] with -1 past the prefix). ``top_p`` is
    taken as a float32, as the ops take it: 1 keeps every entry; the masses are float32, added in
    float64. The first entry is always kept (nothing is ahead of it).
    """
    # as the ops take it (ops.as_float32)
    top_p = float(torch.tensor(top_p, dtype=torch.float32, device="cpu"))
    if top_p >= 1:
        return scores, indices
    mass = torch.exp(scores - lse[..., None]).nan_to_num(0.0).double()  # [B, Hq, N]; 0: padding
    before = mass.cumsum(-1) - mass  # [B, Hq, N] the mass of the entries ahead of each
    drop = before >= top_p  # [B, Hq, N]
    return scores.masked_fill(drop, float("-inf")), indices.masked_fill(drop, -1)


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
    Hs, S, D = src.shape[1:]
    if S == 0:  # an empty cache: every index is padding
        return torch.zeros(B, H, N, D, dtype=src.dtype, device=indices.device)
    # head h reads source head h // G: a group's G x N rows gathered from its one source head
    idx = indices.long().clamp(min=0).reshape(B, Hs, H // Hs * N, 1)  # [B, Hs, G * N, 1]
    dst = torch.gather(src.to(indices.device), 2, idx.expand(-1, -1, -1, D))  # [B, Hs, G * N, D]
    return dst.view(B, H, N, D).masked_fill((indices < 0)[..., None], 0)


def reuse_rows(indices, v_host, new_pos, rows, held, used, step, group_select):
    """Reference of kcache_ops.reuse_rows: one decode step of KCache's pool of reused V rows.
    Updates ``rows``, ``held`` and ``used`` in place, as the op does.

    indices [B, Hq, N] int32 (outside [0, S): padding), v_host [B, Hkv, S, D], new_pos [B] int32,
    rows [B, Hkv, C, D], held [B, Hkv, C] int32, used [B, Hkv, C] int32, step [1] int32
    -> pool_indices [B, Hq, N] int32, counts [B, Hkv, 2] int32 (distinct positions read, found)
    """
    B, Hq, N = indices.shape
    Hkv, S, D = v_host.shape[1:]
    C, G = held.shape[-1], Hq // Hkv
    if N == 0:  # no entry: nothing read
        return indices.new_empty(B, Hq, 0), indices.new_zeros(B, Hkv, 2)
    valid = (indices >= 0) & (indices < S)  # [B, Hq, N]
    by_kv = torch.where(valid, indices, -1).view(B, Hkv, G, N)  # [B, Hkv, G, N]
    pos = by_kv.amax(2) if group_select else by_kv.reshape(B, Hkv, G * N)  # [B, Hkv, E]
    E = pos.shape[-1]
    # each entry's first entry of its position (max gives the first of equal maxima)
    first = (pos[..., :, None] == pos[..., None, :]).max(-1).indices  # [B, Hkv, E]
    reads = (first == torch.arange(E, device=pos.device)) & (pos >= 0)  # [B, Hkv, E]
    found, slot = (pos[..., :, None] == held[..., None, :]).max(-1)  # [B, Hkv, E] x2
    hit = found & reads  # [B, Hkv, E]; slot: the first slot holding it
    # refill order: ascending step last read (below -1 as -1), ties to the lower slot; the slots
    # found never (after every int32). Slot C takes the writes of entries that write nothing.
    last = torch.cat([used.long().clamp(min=-1), used.new_zeros(B, Hkv, 1).long()], -1)
    last = last.scatter(2, torch.where(hit, slot, C), 1 << 32)  # [B, Hkv, C + 1]
    victims = last[..., :C].argsort(dim=-1, stable=True)[..., :E]  # [B, Hkv, E]
    fetch = reads & ~hit  # [B, Hkv, E]: rows read from host RAM, the i-th into victim i
    rank = (fetch.cumsum(-1) - 1).clamp(min=0)  # [B, Hkv, E]
    slot = torch.where(hit, slot, victims.gather(2, rank))  # [B, Hkv, E]
    kept = reads & (pos != new_pos[:, None, None].to(pos.device))  # the new token: this step only
    dest = torch.where(fetch, slot, C)  # [B, Hkv, E]
    fetched = gather_rows(v_host, torch.where(fetch, pos, -1).to(rows.device))  # [B, Hkv, E, D]
    pool = torch.cat([rows, rows.new_zeros(B, Hkv, 1, D)], 2)  # [B, Hkv, C + 1, D]
    pool.scatter_(2, dest[..., None].expand(B, Hkv, E, D), fetched)
    pos_of = torch.cat([held, held.new_zeros(B, Hkv, 1)], -1)  # [B, Hkv, C + 1]
    pos_of.scatter_(2, dest, torch.where(kept, pos, -1).int())
    last_of = torch.cat([used, used.new_zeros(B, Hkv, 1)], -1)  # [B, Hkv, C + 1]
    last_of.scatter_(2, torch.where(reads, slot, C), torch.where(kept, step, -1).int())
    rows.copy_(pool[:, :, :C])
    held.copy_(pos_of[..., :C])
    used.copy_(last_of[..., :C])
    local = slot.gather(2, first).int()  # [B, Hkv, E]: an entry reads its first entry's slot
    local = (local.view(B, Hkv, 1, N).expand(B, Hkv, G, N) if group_select
             else local.view(B, Hkv, G, N))  # [B, Hkv, G, N]
    pool_indices = torch.where(valid, local.reshape(B, Hq, N), -1)  # [B, Hq, N]
    counts = torch.stack([reads.sum(-1), hit.sum(-1)], -1).int()  # [B, Hkv, 2]
    return pool_indices, counts


def sparse_attn_v(scores, indices, v_cache, lse=None, renormalize=True, v_sum=None,
                  seq_lens=None):
    """Reference of kcache_ops.sparse_attn_v.

    scores [B, Hq, N] float32, indices [B, Hq, N] int32, v_cache [B, Hkv, S, D], lse [B, Hq]
    -> out [B, Hq, D] (dtype of v_cache) on the device of scores.

    With ``v_sum`` [B, Hkv, D] float32 (the sum of the V rows ``j < L_b``) and ``seq_lens`` [B]
    (``renormalize=False`` only), the mean tail is added: the mass the selected rows miss,
    ``1 − Σ_i p_i``, times the mean of the rows not selected (:func:`mean_tail`).
    """
    p = attn_weights(scores, indices, lse, renormalize)  # [B, Hq, N]
    v = gather_rows(v_cache, indices).float()  # [B, Hq, N, D]; zero rows at padding
    out = torch.einsum("bhn,bhnd->bhd", p, v)  # [B, Hq, D]
    if v_sum is not None:
        if renormalize:
            raise ValueError("the mean tail (v_sum) needs renormalize=False")
        out = out + mean_tail(p, v, indices, v_sum, seq_lens)
    return out.to(v_cache.dtype)


def mean_tail(p, v, indices, v_sum, seq_lens):
    """The mean tail: ``(1 − Σ_i p_i) · (v_sum − Σ_i v_i) / (L_b − n)`` per head, where the sums
    run over the ``n`` valid selected entries; zero where no row is left (``L_b <= n``).

    p [B, Hq, N] float32 (0 at padding), v [B, Hq, N, D] float32 (the selected rows, 0 at
    padding), indices [B, Hq, N], v_sum [B, Hkv, D] float32, seq_lens [B] -> [B, Hq, D] float32.
    The mass is clamped at 0 (rounding can make ``Σ p_i`` exceed 1 by an ulp).
    """
    Hq, Hkv = p.shape[1], v_sum.shape[1]
    n = (indices >= 0).sum(-1)  # [B, Hq]
    rest = seq_lens.long().to(p.device)[:, None] - n  # [B, Hq] rows not selected
    total = v_sum.float().to(p.device).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, D]
    mean = (total - v.sum(2)) / rest.clamp(min=1)[..., None]  # [B, Hq, D]
    mass = (1.0 - p.sum(-1)).clamp(min=0.0)  # [B, Hq]
    return torch.where(rest[..., None] > 0, mass[..., None] * mean, 0.0)


# A row's min and max are taken within [-QUANT_RANGE, QUANT_RANGE] (where finite): scale <=
# 2^126 / (2^bits - 1) and |min| <= 2^125, so every dequantised value, and the low-bit tail's sums
# of them, stay finite for finite V; a value beyond it gets an end code.
QUANT_RANGE = 2.0 ** 125


def quantize_rows(v, bits):
    """Reference of kcache_ops.quantize_rows: each row of ``D`` values to ``bits``-bit codes
    with its own scale and offset (asymmetric min/max, the low-bit copy of V).

    v [..., D] (float32, float16 or bfloat16), bits in {2, 4}
    -> codes [..., D * bits / 8] uint8, meta [..., 2] bfloat16 (scale, min).

    ``scale = (max − min) / (2^bits − 1)`` and ``min`` are rounded to bfloat16 first (a finite max
    and min clamped to ``±QUANT_RANGE``, a zero one taken as +0); then
    ``code_d = clamp(round_half_even((v_d − min) / scale), 0, 2^bits − 1)`` in float32 with the
    rounded values (0 where scale is 0). Code ``d`` sits in byte ``d // (8 / bits)`` at bit
    ``(d % (8 / bits)) * bits``.
    """
    x = v.float()  # [..., D]
    levels = (1 << bits) - 1
    lo, hi = (torch.where(t.isfinite(), t.clamp(-QUANT_RANGE, QUANT_RANGE) + 0.0, t)
              for t in (x.amin(-1), x.amax(-1)))  # [...] each; finite ones within the range, +0
    meta = torch.stack([(hi - lo) / levels, lo], -1).to(torch.bfloat16)  # [..., 2]
    step, base = meta[..., 0].float()[..., None], meta[..., 1].float()[..., None]  # [..., 1]
    code = torch.where(step > 0, torch.round((x - base) / step), 0.0).clamp(0, levels)
    per = 8 // bits
    code = code.to(torch.int32).unflatten(-1, (x.shape[-1] // per, per))  # [..., D/per, per]
    shift = torch.arange(per, device=v.device, dtype=torch.int32) * bits  # [per]
    return (code << shift).sum(-1).to(torch.uint8), meta


def dequantize_rows(codes, meta, dim):
    """The inverse of :func:`quantize_rows`: codes [..., dim * bits / 8] uint8, meta [..., 2]
    -> v [..., dim] float32, ``min + scale · code``."""
    bits = codes.shape[-1] * 8 // dim
    per = 8 // bits
    shift = torch.arange(per, device=codes.device, dtype=torch.int32) * bits  # [per]
    code = (codes.int()[..., None] >> shift) & ((1 << bits) - 1)  # [..., dim/per, per]
    meta = meta.float()
    return meta[..., 1:2] + meta[..., 0:1] * code.flatten(-2).float()


def lowbit_tail(scores, seq_lens, lse, indices, v_codes, v_meta, bits, skip_first=0, skip_last=0,
                hot_v=None, hot_pos=None):
    """Reference of kcache_ops.lowbit_tail: the low-bit tail, the attention of every valid row
    that is not selected, with its exact full-softmax weight, over the low-bit copy of V; plus,
    with ``hot_v`` [B, Hkv, H, D] and ``hot_pos`` [B, H] int32, the exact rows given on the device
    (:func:`hot_rows`).

    scores [B, Hq, S] float32 (every score, as :func:`qk_scores` gives them; entries
    ``j >= L_b`` are never read), seq_lens [B], lse [B, Hq] float32 (from qk_topn), indices
    [B, Hq, N] int32 (-1 padding), v_codes [B, Hkv, S, D * bits / 8] uint8, v_meta [B, Hkv, S, 2]
    -> out [B, Hq, D] float32:
    ``Σ_{skip_first <= j < L_b − skip_last, j ∉ indices[b, h]} exp(s_bhj − lse_bh) ·
    dequant(v)[b, h / G, j]``. A row left out (selected by the head, skipped, ``j >= L_b``, or of
    weight 0: a score of -inf, NaN or one whose exp underflows) adds nothing, whatever its copy
    holds (NaN included).
    """
    B, Hq, S = scores.shape
    Hkv, D = v_codes.shape[1], v_codes.shape[-1] * 8 // bits
    cold = _valid_mask(seq_lens.to(scores.device), S, skip_first, skip_last)  # [B, 1, S]
    s = scores.float().masked_fill(~cold, float("-inf"))  # [B, Hq, S]
    p = torch.exp(s - lse.float()[..., None]).nan_to_num(0.0)  # [B, Hq, S]; 0 past L_b
    chosen = torch.zeros(B, Hq, S + 1, dtype=torch.bool, device=scores.device)  # slot S: padding
    chosen.scatter_(-1, torch.where(indices >= 0, indices, S).long(), True)
    left_out = chosen[..., :S] | ~cold | (p == 0)  # [B, Hq, S]: selected, skipped, past L_b, 0
    p = p.masked_fill(left_out, 0.0)
    v = dequantize_rows(v_codes, v_meta, D).to(scores.device)  # [B, Hkv, S, D]
    v = v.repeat_interleave(Hq // Hkv, dim=1).masked_fill(left_out[..., None], 0.0)  # [B,Hq,S,D]
    out = torch.einsum("bhs,bhsd->bhd", p, v)  # a row left out adds 0, whatever its copy holds
    return out if hot_v is None else out + hot_rows(scores, seq_lens, lse, hot_v, hot_pos)


def hot_rows(scores, seq_lens, lse, hot_v, hot_pos):
    """The exact rows of lowbit_tail's ``hot_v`` [B, Hkv, H, D] (any float dtype) at positions
    ``hot_pos`` [B, H] int32 -> [B, Hq, D] float32: ``Σ_i exp(s_bh,pos_i − lse_bh) ·
    hot_v[b, h / G, i]`` over the slots ``i`` with ``0 <= pos_i < L_b``; a NaN weight counts 0,
    and a slot left out adds nothing whatever its row holds."""
    B, Hq, S = scores.shape
    Hkv = hot_v.shape[1]
    pos = hot_pos.long().to(scores.device)  # [B, H]
    used = (pos >= 0) & (pos < seq_lens.to(scores.device).long()[:, None])  # [B, H]
    s = torch.gather(scores.float(), 2, pos.clamp(0, max(S - 1, 0))[:, None, :].expand(B, Hq, -1)
                     ) if S else scores.new_zeros(B, Hq, pos.shape[1])  # [B, Hq, H]
    p = torch.exp(s - lse.float()[..., None]).nan_to_num(0.0)  # [B, Hq, H]; inf: the largest
    p = p.masked_fill(~used[:, None, :], 0.0)
    v = hot_v.float().to(scores.device).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, H, D]
    v = v.masked_fill(~used[:, None, :, None] | (p == 0)[..., None], 0.0)
    return torch.einsum("bhi,bhid->bhd", p, v)


def decode_attention(q, k_cache, v_cache, seq_lens, n, scale=None, group_select=False,
                     renormalize=True):
    """KCache attention for one decode step: qk_topn then sparse_attn_v -> out [B, Hq, D]."""
    scores, indices, lse = qk_topn(q, k_cache, seq_lens, n, scale, group_select)
    return sparse_attn_v(scores, indices, v_cache, lse, renormalize)
