"""Attention backends of the decoder: the ``dense`` KV cache and the factory that picks a backend.

Every cache object follows one protocol, which the decoder calls layer by layer:

* ``seq_lens`` — [B] int32 on the model's device: tokens cached per sequence.
* ``prefill(layer, q [B,Hq,T,D], k [B,Hkv,T,D], v [B,Hkv,T,D], lens [B] int32) -> [B,Hq,T,D]`` —
  RoPE already applied; causal attention over each sequence's first ``lens[b]`` tokens; stores the
  K/V of positions ``< lens[b]`` (output rows past ``lens[b]`` are don't-care).
* ``finish_prefill(lens)`` after the last layer: ``seq_lens = lens``.
* ``decode(layer, q [B,Hq,D], k [B,Hkv,D], v [B,Hkv,D]) -> [B,Hq,D]`` — stores the new token at
  position ``seq_lens[b]`` and attends over ``seq_lens[b] + 1`` tokens.
* ``finish_decode()`` after the last layer: ``seq_lens += 1``.
* ``device_bytes()``, ``host_bytes()`` — memory held; overflowing the capacity raises ValueError.
"""
import torch
import torch.nn.functional as F

from .config import LlamaConfig

BACKENDS = ("dense", "kcache")
KCACHE_OPTIONS = ("topn", "group_select", "renormalize", "dense_layers")


def exact_decode_attention(q, keys, values, lens):
    """Exact attention of one new token per sequence over its first ``lens[b]`` keys.

    q [B, Hq, D], keys and values [B, Hkv, L, D], lens [B] int (<= L) -> out [B, Hq, D].
    The G query heads of a KV head go in as G query rows of that head, so K and V are read once
    per KV head and any SDPA kernel that takes a mask serves (no GQA support needed).
    """
    b, hq, d = q.shape
    hkv, length = keys.shape[1], keys.shape[2]
    valid = torch.arange(length, device=q.device) < lens[:, None]       # [B, L] bool
    out = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), keys, values,
                                         attn_mask=valid[:, None, None])  # [B, Hkv, G, D]
    return out.reshape(b, hq, d)


class DenseCache:
    """Full K and V of every layer in device memory, attention by SDPA: the baseline backend.

    Parameters
    ----------
    config : LlamaConfig
    batch, capacity : int
        Sequences, and tokens per sequence the cache can hold.
    device, dtype
        Of the cached K and V (the model's).

    Attributes
    ----------
    k, v : list of Tensor [B, Hkv, S, D], one per layer, on ``device``
    seq_lens : Tensor [B] int32 on ``device``
    """

    def __init__(self, config: LlamaConfig, batch: int, capacity: int, device, dtype):
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        # zeros, not empty: masked positions get weight 0, and 0 * NaN from stale memory is NaN
        self.k = [torch.zeros(shape, device=device, dtype=dtype)            # [B, Hkv, S, D] each
                  for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype)            # [B, Hkv, S, D] each
                  for _ in range(config.num_layers)]
        self.capacity = capacity
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)  # [B]
        self._max_len = 0  # host copy of seq_lens.max(), so decode checks capacity without a sync

    def store_prompt(self, layer, k, v):
        """Store a prompt's K and V for ``layer`` without attending (the store half of prefill;
        call it for every layer, then :meth:`finish_prefill`).

        k, v [B, Hkv, T, D], RoPE applied, right-padded, T <= capacity.
        """
        t = k.shape[2]
        if t > self.capacity:
            raise ValueError(f"prompt of {t} tokens exceeds the cache capacity ({self.capacity})")
        self.k[layer][:, :, :t] = k
        self.v[layer][:, :, :t] = v

    def prefill(self, layer, q, k, v, lens):
        """Causal attention over the prompt and store its K/V.

        q [B, Hq, T, D], k and v [B, Hkv, T, D], lens [B] int32 -> out [B, Hq, T, D]. Prompts are
        right-padded, so plain causal attention is exact on every row ``t < lens[b]``.
        """
        self.store_prompt(layer, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def finish_prefill(self, lens):
        """After the last layer's prefill: ``seq_lens = lens`` ([B] int32, copied)."""
        self.seq_lens = lens.to(device=self.seq_lens.device, dtype=torch.int32, copy=True)
        self._max_len = int(lens.max())

    def decode(self, layer, q, k, v):
        """Store one new token per sequence and attend over all cached tokens.

        q [B, Hq, D], k and v [B, Hkv, D] -> out [B, Hq, D].
        """
        if self._max_len >= self.capacity:
            raise ValueError(f"cache full: capacity {self.capacity} tokens, cannot decode token "
                             f"{self._max_len + 1}")
        rows = torch.arange(q.shape[0], device=q.device)                   # [B]
        pos = self.seq_lens.long()                                          # [B]
        self.k[layer][rows, :, pos] = k
        self.v[layer][rows, :, pos] = v
        s = self._max_len + 1                                               # keys worth reading
        return exact_decode_attention(q, self.k[layer][:, :, :s], self.v[layer][:, :, :s],
                                      self.seq_lens + 1)

    def finish_decode(self):
        """After the last layer's decode: every sequence holds one more token."""
        self.seq_lens += 1
        self._max_len += 1

    def device_bytes(self):
        """Bytes of device memory held by the cached K and V."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def host_bytes(self):
        """Bytes of host memory held (none: dense keeps everything on the device)."""
        return 0


def make_cache(backend: str, config: LlamaConfig, batch: int, capacity: int, device, dtype,
               **options):
    """A cache for ``batch`` sequences of up to ``capacity`` tokens.

    ``backend`` is ``"dense"`` (no options) or ``"kcache"`` (options ``topn``, ``group_select``,
    ``renormalize``, ``dense_layers``; see :class:`kcache_ops.cache.KCache`).
    """
    if capacity < 1 or batch < 1:
        raise ValueError(f"batch ({batch}) and capacity ({capacity}) must be >= 1")
    if backend == "dense":
        if options:
            raise ValueError(f"backend 'dense' takes no options, got {sorted(options)}")
        return DenseCache(config, batch, capacity, device, dtype)
    if backend == "kcache":
        unknown = sorted(set(options) - set(KCACHE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown kcache options {unknown}; "
                             f"allowed: {', '.join(KCACHE_OPTIONS)}")
        from ..cache import KCache  # on first use: the dense backend does not depend on it
        return KCache(config, batch, capacity, device, dtype, **options)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
