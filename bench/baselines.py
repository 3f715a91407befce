"""The PyTorch baselines the benchmarks in bench/ compare against, one definition each.

* :func:`torch_qk_topn` and :func:`torch_decode`: the plain PyTorch way of the two KCache ops
  (matmul, mask, logsumexp, topk; then index V, softmax, matmul) on whatever device the inputs are;
  :func:`torch_qk_topn_group` the same selection with group_select (topk of the group's mass).
* :func:`torch_lowbit_tail`: the PyTorch way of the low-bit tail (weigh, dequantise the rows a
  chunk at a time, matmul).
* :func:`torch_gather_rows`: the PyTorch way of reading rows of host memory into the GPU (indices
  to the host, CPU gather into pinned memory, asynchronous copy).
* :func:`dense_attention` and :func:`split_kv_attention`: exact dense decode attention over K and V
  in device memory through SDPA with one chosen back-end, or split along the tokens and merged by
  logsumexp; :func:`dense_candidates` lists every variant worth timing on a machine, so that the
  KCache step is compared with the fastest one.

Shapes follow DESIGN.md: q [B, Hq, D], k_cache and v_cache [B, Hkv, S, D], seq_lens [B] int32,
G = Hq / Hkv query heads per KV head.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA back-ends tried for the dense baseline, by the name reported in the results
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
SPLIT_KV_CHUNK = 4096  # tokens per chunk of split_kv_attention (fewer where S is smaller)


def _scores(q, k_cache, seq_lens, scale):
    """Every key's score, -inf past L_b: q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B] int32
    -> s [B, Hq, S] float32."""
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    s = torch.matmul(q.view(B, Hkv, Hq // Hkv, D), k_cache.transpose(-1, -2))  # [B, Hkv, G, S]
    s = s.view(B, Hq, S).float() * scale  # [B, Hq, S]
    invalid = torch.arange(S, device=q.device) >= seq_lens[:, None].long()  # [B, S]
    return s.masked_fill_(invalid[:, None], float("-inf"))


def torch_qk_topn(q, k_cache, seq_lens, n, scale):
    """qk_topn the PyTorch way (per-head selection).

    q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B] int32, n >= 1, scale float ->
    scores [B, Hq, min(n, S)] float32, indices [B, Hq, min(n, S)] int64, lse [B, Hq] float32.
    """
    s = _scores(q, k_cache, seq_lens, scale)  # [B, Hq, S]
    scores, indices = s.topk(min(n, s.shape[-1]), dim=-1)  # [B, Hq, n]
    return scores, indices, s.logsumexp(dim=-1)


def torch_qk_topn_group(q, k_cache, seq_lens, n, scale):
    """qk_topn with group_select the PyTorch way: each head's lse, each key's mass
    Σ_h exp(s_h − lse_h) over the G heads of its KV head, the top n keys of that mass per KV head,
    given to each of its heads with their own scores.

    q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B] int32, n >= 1, scale float ->
    scores [B, Hq, min(n, S)] float32, indices [B, Hq, min(n, S)] int64, lse [B, Hq] float32.
    """
    B, Hq, _ = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G, n = Hq // Hkv, min(n, S)
    s = _scores(q, k_cache, seq_lens, scale)  # [B, Hq, S]
    lse = s.logsumexp(dim=-1)  # [B, Hq]
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # [B, Hq, S]; L_b = 0 gives 0
    mass = p.view(B, Hkv, G, S).sum(dim=2)  # [B, Hkv, S]
    indices = mass.topk(n, dim=-1).indices  # [B, Hkv, n]
    indices = indices[:, :, None].expand(B, Hkv, G, n).reshape(B, Hq, n)  # [B, Hq, n]
    return torch.gather(s, -1, indices), indices, lse


def torch_decode(q, k_cache, v_cache, seq_lens, n, scale):
    """One KCache decode step the PyTorch way: :func:`torch_qk_topn`, the picked V rows by
    indexing, softmax over the picked scores, weighted sum.

    q [B, Hq, D], k_cache and v_cache [B, Hkv, S, D] (one device), seq_lens [B] int32 ->
    out [B, Hq, D] in the dtype of v_cache.
    """
    scores, indices, _ = torch_qk_topn(q, k_cache, seq_lens, n, scale)  # [B, Hq, n]
    B, Hq, _ = indices.shape
    Hkv = v_cache.shape[1]
    b = torch.arange(B, device=q.device)[:, None, None]
    h = (torch.arange(Hq, device=q.device) // (Hq // Hkv))[None, :, None]
    v = v_cache[b, h, indices].float()  # [B, Hq, n, D]
    p = torch.softmax(scores, dim=-1)  # [B, Hq, n]
    return torch.matmul(p[..., None, :], v).squeeze(-2).to(v_cache.dtype)


def torch_lowbit_tail(scores, seq_lens, lse, indices, v_codes, v_meta, bits, skip=(0, 0),
                      chunk=4096):
    """lowbit_tail the PyTorch way: each key's weight exp(s - lse), 0 where a head selected the
    key or it is skipped or past L_b; then, ``chunk`` keys at a time (no float copy of the whole
    V), their rows of the low-bit copy dequantised (shifts and masks) and one batched matmul per
    KV head's group.

    scores [B, Hq, S] float32, seq_lens [B] int32, lse [B, Hq], indices [B, Hq, N] int32 (-1
    padding), v_codes [B, Hkv, S, D * bits / 8] uint8, v_meta [B, Hkv, S, 2] bfloat16 (scale,
    min), skip (first, last) keys left out -> out [B, Hq, D] float32.
    """
    B, Hq, S = scores.shape
    Hkv = v_codes.shape[1]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=v_codes.device)  # [8 / bits]
    pos = torch.arange(S, device=scores.device)  # [S]
    kept = (pos >= skip[0]) & (pos < seq_lens[:, None].long() - skip[1])  # [B, S]
    p = torch.exp(scores - lse[..., None]).nan_to_num(0.0) * kept[:, None]  # [B, Hq, S]
    p = torch.cat([p, p.new_zeros(B, Hq, 1)], -1)  # [B, Hq, S + 1]: slot S takes the padding
    p.scatter_(-1, torch.where(indices >= 0, indices, S).long(), 0.0)
    p = p[..., :S].reshape(B, Hkv, Hq // Hkv, S)  # [B, Hkv, G, S]
    out = p.new_zeros(B, Hkv, Hq // Hkv, v_codes.shape[-1] * 8 // bits)  # [B, Hkv, G, D]
    for j in range(0, S, chunk):
        codes = (v_codes[:, :, j:j + chunk, :, None] >> shifts) & ((1 << bits) - 1)
        meta = v_meta[:, :, j:j + chunk].float()  # [B, Hkv, c, 2]
        v = codes.flatten(-2).float() * meta[..., :1] + meta[..., 1:]  # [B, Hkv, c, D]
        out = out + torch.matmul(p[..., j:j + chunk], v)  # [B, Hkv, G, D]
    return out.reshape(B, Hq, -1)  # [B, Hq, D]


def torch_gather_rows(src, indices):
    """gather_rows the PyTorch way: indices to the host, a CPU gather into pinned memory (where
    the indices are on a GPU; torch's pinned-memory cache keeps the buffer between calls), an
    asynchronous copy from there to their device.

    src [B, Hs, S, D] contiguous in host memory, indices [B, H, N] int32 (H a multiple of Hs,
    every index in [0, S)) -> rows [B, H, N, D] on the device of indices.
    """
    i = indices.cpu().long()  # [B, H, N]; a device->host sync
    B, H, N = i.shape
    Hs, S, D = src.shape[1:]
    head = torch.arange(H) // (H // Hs)  # [H] the KV head each head reads
    rows = (torch.arange(B)[:, None, None] * Hs + head[None, :, None]) * S + i  # [B, H, N]
    out = torch.empty(B * H * N, D, dtype=src.dtype, pin_memory=indices.is_cuda)  # [B*H*N, D]
    torch.index_select(src.view(B * Hs * S, D), 0, rows.view(-1), out=out)
    return out.view(B, H, N, D).to(indices.device, non_blocking=True)


def dense_attention(q, k, v, backend=None):
    """Exact decode attention of every sequence over all S tokens, by SDPA.

    q [B, Hq, D], k and v [B, Hkv, S, D] -> out [B, Hq, D]. The G query heads of a KV head go in
    as G query rows of that head (no mask is needed for a full cache), so K and V are read once per
    KV head. ``backend`` (a :class:`torch.nn.attention.SDPBackend`) restricts SDPA to that kernel;
    a back-end that cannot serve the inputs raises RuntimeError ("No available kernel").
    """
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]
    if backend is None:
        return F.scaled_dot_product_attention(qg, k, v).reshape(B, Hq, D)
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(qg, k, v).reshape(B, Hq, D)


def split_kv_attention(q, k, v, chunk=SPLIT_KV_CHUNK):
    """Exact decode attention split along the tokens: each chunk of ``chunk`` tokens attended on
    its own (float32 scores and softmax statistics), the chunks merged by their logsumexp. Batch 1
    gives SDPA's kernels only Hkv blocks of work; the chunks give the GPU B·Hkv·S/chunk.

    q [B, Hq, D], k and v [B, Hkv, S, D] with S a multiple of min(chunk, S) -> out [B, Hq, D].
    """
    B, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    chunk = min(chunk, S)
    if S % chunk:
        raise ValueError(f"split_kv_attention: S ({S}) must be a multiple of chunk ({chunk})")
    C = S // chunk  # chunks
    qg = q.view(B, Hkv, 1, Hq // Hkv, D)  # [B, Hkv, 1, G, D]
    kc = k.view(B, Hkv, C, chunk, D)  # [B, Hkv, C, chunk, D]
    vc = v.view(B, Hkv, C, chunk, D)
    s = torch.matmul(qg, kc.transpose(-1, -2)).float() * D ** -0.5  # [B, Hkv, C, G, chunk]
    lse = s.logsumexp(dim=-1)  # [B, Hkv, C, G]
    p = torch.exp(s - lse[..., None]).to(v.dtype)  # [B, Hkv, C, G, chunk]
    part = torch.matmul(p, vc).float()  # [B, Hkv, C, G, D]
    w = torch.softmax(lse, dim=2)  # [B, Hkv, C, G]: exp(lse_chunk - lse_all)
    out = (w[..., None] * part).sum(dim=2)  # [B, Hkv, G, D]
    return out.to(v.dtype).reshape(B, Hq, D)


def dense_candidates(batch):
    """Every dense decode attention worth timing for ``batch`` sequences -> {name: fn(q, k, v)}:
    SDPA restricted to each of its fused back-ends, and split_kv at batch 1."""
    found = {name: (lambda q, k, v, b=b: dense_attention(q, k, v, b))
             for name, b in SDPA_BACKENDS.items()}
    if batch == 1:
        found["split_kv"] = split_kv_attention
    return found
