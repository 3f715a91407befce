"""The ``dense`` cache: K and V of every layer in device memory, exact attention by SDPA. Its
decode step (:func:`append_and_attend`) also serves KCache's dense layers."""
import torch
import torch.nn.functional as F

from .lengths import SeqLengths, check_count, check_layer_inputs, check_sizes
from .memory import check_memory


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


def store_prompt_rows(buffer, x, lens, written):
    """Store a prompt's rows x [B, Hkv, T, D] (right-padded, lens [B] the valid ones) into
    buffer [B, Hkv, S, D], a cache's K or V that a decode step attends over with a mask: the
    padding rows ``t >= lens[b]`` as zeros, and the rows ``[T, written)`` (``written``: a bound
    of those an earlier prompt or step stored) cleared. A masked row still enters the attention
    with weight 0, and 0 times an inf or NaN it holds is NaN."""
    T = x.shape[2]
    valid = torch.arange(T, device=x.device) < lens.to(x.device)[:, None]  # [B, T] bool
    buffer[:, :, :T] = x
    buffer[:, :, :T].masked_fill_(~valid[:, None, :, None], 0)  # in place: no copy of the prompt
    buffer[:, :, T:written] = 0


def append_and_attend(lengths, k_cache, v_cache, q, k, v):
    """One decode step of a layer held whole on the device: store the new token's k and v
    [B, Hkv, D] at position ``seq_lens[b]`` of k_cache and v_cache [B, Hkv, S, D], then attend
    exactly over ``seq_lens[b] + 1`` tokens; q [B, Hq, D] -> out [B, Hq, D].

    ``lengths`` is the cache's :class:`SeqLengths`; only the first ``longest + 1`` keys are read,
    or, once a decode step has been captured in a CUDA graph (whose replays advance the lengths
    on the device alone, so that the host's ``longest`` lags them), every key: the mask gives
    those past ``seq_lens[b]`` weight 0.
    """
    k_cache[lengths.step_index] = k
    v_cache[lengths.step_index] = v
    width = k_cache.shape[2] if lengths.graphed else lengths.longest + 1  # set in decode_step
    return exact_decode_attention(q, k_cache[:, :, :width], v_cache[:, :, :width],
                                  lengths.attend_lens)


def prompt_attention(q, k, v):
    """Causal attention over right-padded prompts, the prefill of every cache: q [B, Hq, T, D],
    k and v [B, Hkv, T, D] -> [B, Hq, T, D], exact on every row ``t < lens[b]``."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class DenseCache:
    """Full K and V of every layer in device memory, attention by SDPA: the baseline backend.

    Parameters
    ----------
    config : kcache_ops.model.config.LlamaConfig
        Uses ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``.
    batch, capacity : int
        Sequences ``B``, and tokens ``S`` per sequence the cache can hold.
    device, dtype
        Of the cached K and V (the model's).

    Attributes
    ----------
    k, v : list of Tensor [B, Hkv, S, D], one per layer, on ``device``
    seq_lens : Tensor [B] int32 on ``device``
    """

    def __init__(self, config, batch, capacity, device, dtype):
        batch, capacity = check_sizes("DenseCache", batch, capacity)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"DenseCache: dtype must be a floating-point torch.dtype (the "
                             f"model's), got {dtype!r}")
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)  # [B, Hkv, S, D]
        on_cpu = torch.device(device).type == "cpu"
        check_memory("DenseCache", shape, dtype, 2 * config.num_layers if on_cpu else 0, device,
                     2 * config.num_layers)  # K and V of every layer, before any tensor is made
        self.lengths = SeqLengths("DenseCache", batch, capacity, device, config.num_layers,
                                  config.num_kv_heads)
        self.capacity = capacity
        self.num_heads = config.num_heads
        # zeros, not empty: masked positions get weight 0, and 0 * NaN from stale memory is NaN
        self.k = [torch.zeros(shape, device=device, dtype=dtype)            # [B, Hkv, S, D] each
                  for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype)            # [B, Hkv, S, D] each
                  for _ in range(config.num_layers)]

    @property
    def seq_lens(self):
        """[B] int32 on the device: tokens cached per sequence."""
        return self.lengths.seq_lens

    def store_prompt(self, layer, k, v, lens):
        """Store a prompt's k and v [B, Hkv, T, D] (RoPE applied, right-padded, T <= capacity;
        lens [B] int32, the valid rows, as :meth:`finish_prefill` will get them: the rows past
        them are masked by seq_lens, and stored as zeros) for ``layer`` without attending; call
        it for every layer, then :meth:`finish_prefill`."""
        check_layer_inputs(self.lengths.owner, self.k, self.num_heads, layer, True, k, v)
        k, v = k.detach(), v.detach()  # stored: the cache is no part of an autograd graph
        with self.lengths.storing_prompt(layer, k.shape[2], lens):
            store_prompt_rows(self.k[layer], k, lens, self.lengths.written)
            store_prompt_rows(self.v[layer], v, lens, self.lengths.written)

    def prefill(self, layer, q, k, v, lens):
        """Causal attention over the prompt and store its K/V.

        q [B, Hq, T, D], k and v [B, Hkv, T, D], lens [B] int32 -> out [B, Hq, T, D]. Prompts are
        right-padded, so plain causal attention is exact on every row ``t < lens[b]``.
        """
        check_layer_inputs(self.lengths.owner, self.k, self.num_heads, layer, True, k, v, q)
        self.store_prompt(layer, k, v, lens)
        return prompt_attention(q, k, v)

    def finish_prefill(self, lens):
        """After the last layer's prompt: ``seq_lens = lens`` ([B] int32, copied)."""
        self.lengths.finish_prefill(lens)

    def decode(self, layer, q, k, v):
        """Store one new token per sequence and attend over all cached tokens.

        q [B, Hq, D], k and v [B, Hkv, D] -> out [B, Hq, D].
        """
        check_layer_inputs(self.lengths.owner, self.k, self.num_heads, layer, False, k, v, q)
        # attended over the cache, which keeps no autograd history: no gradient, not a partial one
        q, k, v = q.detach(), k.detach(), v.detach()
        with self.lengths.decode_step(layer):
            return append_and_attend(self.lengths, self.k[layer], self.v[layer], q, k, v)

    def finish_decode(self):
        """After the last layer's decode: every sequence holds one more token."""
        self.lengths.finish_decode()

    def device_bytes(self):
        """Bytes of device memory held by the cached K and V."""
        return sum(t.nbytes for t in self.k + self.v)

    def host_bytes(self):
        """Bytes of host memory held (none: dense keeps everything on the device)."""
        return 0

    def host_bytes_read_per_step(self):
        """Bytes a decode step moves between host RAM and the device (none)."""
        return 0

    def device_bytes_read_per_step(self, tokens):
        """Bytes a decode step reads from the cache while every sequence holds ``tokens`` keys:
        K and V of those positions, every layer and sequence (each row once per KV head, as
        :func:`exact_decode_attention` reads them), not the capacity allocated."""
        tokens = check_count("DenseCache", "tokens", tokens, self.capacity)
        batch, heads, _, dim = self.k[0].shape
        return 2 * len(self.k) * batch * heads * tokens * dim * self.k[0].element_size()
