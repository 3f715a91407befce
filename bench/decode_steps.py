"""The decode steps that bench/gpu_decode_attn.py times and bench/profile_step.py profiles, built
on random data without a model, on any device the ops run on (tests/test_run_gpu.py runs them on
the CPU at a small shape).

* :class:`OpStep`: the op-level step, ``qk_topn`` + ``sparse_attn_v`` with N rows per head, in
  one of :data:`MODES`, over V in host memory; its two halves can be called (and timed) alone.
* :class:`DefaultLayer`: KCache layers with the library's default options (``KCacheOptions()``:
  N = 64, the 2-bit tail, top_p 0.9, 4 sinks + 60 recent rows on the device), built through the
  public API (``make_cache``, ``store_prompt``, ``finish_prefill``); its step is ``KCache.decode``,
  the whole per-layer step of a model's decode, and its parts can be called alone.
"""
import torch

import kcache_ops
from kcache_ops.caches import KCacheOptions, make_cache, sequence_bytes
from kcache_ops.model import LlamaConfig

# (group_select, tail) of the op-level step, in run order
MODES = ((False, "none"), (True, "none"), (True, "mean"))


def layers_config(q, k, layers):
    """The model config of a cache of ``layers`` layers for q [B, Hq, D], k [B, Hkv, S, D]
    (heads and head dim from the shapes; the cache reads nothing else)."""
    Hq, D = q.shape[1], q.shape[2]
    return LlamaConfig(vocab_size=1, hidden_size=Hq * D, intermediate_size=1, num_layers=layers,
                       num_heads=Hq, num_kv_heads=k.shape[1], head_dim=D)


def default_layer_bytes(B, Hq, Hkv, S, D, dtype):
    """Device bytes of one :class:`DefaultLayer` layer (K, the tail's low-bit copy, the hot rows)
    for B sequences of S tokens, as the library counts them (``caches.sequence_bytes``)."""
    config = layers_config(torch.empty(1, Hq, D), torch.empty(1, Hkv, 1, D), 1)
    return B * sequence_bytes("kcache", config, KCacheOptions(), S, dtype)[0]


# the CUDA sparse_attn_v's slices of a group's heads, and the most (heads x N) entries whose
# distinct rows it reads once (csrc/cuda/launch_grid.h, sparse_attn_v_kernel.cuh)
UNION_CAP = 2048


def host_row_bytes(indices, v):
    """Bytes of V the CUDA sparse_attn_v reads from host memory for ``indices`` [B, Hq, N] int32
    (-1 padding) over v [B, Hkv, S, D]. It takes a group's heads in slices of 4 (groups of <= 4)
    or 8; a slice whose heads chose the same rows (group_select), or whose heads x N entries are
    at most UNION_CAP, reads each distinct row once, however many of its heads chose it; another
    reads every valid entry of every head."""
    B, Hq, _ = indices.shape
    G = Hq // v.shape[1]
    width = 4 if G <= 4 else 8
    indices = indices.cpu()  # [B, Hq, N]: counted on the host, once per configuration
    rows = 0
    for b in range(B):
        for h0 in range(0, Hq, G):  # each KV head's group, in slices
            for s0 in range(h0, h0 + G, width):
                heads = indices[b, s0:min(s0 + width, h0 + G)]  # [gs, N]
                if (heads == heads[:1]).all() or heads.numel() <= UNION_CAP:
                    rows += len(set(heads.flatten().tolist()) - {-1})  # each distinct row once
                else:
                    rows += int((heads >= 0).sum())  # every valid entry of every head
    return rows * v.shape[-1] * v.element_size()


def mean_host_row_bytes(index_sets, v):
    """host_row_bytes averaged over ``index_sets`` (each [B, Hq, N] int32), the selections a
    benchmark rotates: with top_p, or where heads share rows by chance, their counts differ."""
    return sum(host_row_bytes(indices, v) for indices in index_sets) / len(index_sets)


class OpStep:
    """qk_topn + sparse_attn_v in one of :data:`MODES` over a fixed V.

    v [B, Hkv, S, D] host V (pinned and mapped on CUDA), lens [B] int32 valid keys, n the rows per
    head (per KV head with group_select), v_sum [B, Hkv, D] float32 the mean tail's row sums.
    ``step(q, k)`` is ``step.attend(*step.select(q, k))``.
    """

    def __init__(self, v, lens, n, group_select, tail, v_sum=None):
        self.v, self.lens, self.n = v, lens, n
        self.group_select, self.tail, self.v_sum = group_select, tail, v_sum

    def select(self, q, k):
        """q [B, Hq, D], k [B, Hkv, S, D] -> scores [B, Hq, N] float32, indices [B, Hq, N]
        int32, lse [B, Hq] float32 (qk_topn)."""
        return kcache_ops.qk_topn(q, k, self.lens, self.n, None, self.group_select)

    def attend(self, scores, indices, lse):
        """The selected rows of host V -> out [B, Hq, D] (sparse_attn_v; the mean tail adds the
        rest's mean)."""
        if self.tail == "mean":
            return kcache_ops.sparse_attn_v(scores, indices, self.v, lse, False,
                                            v_sum=self.v_sum, seq_lens=self.lens)
        return kcache_ops.sparse_attn_v(scores, indices, self.v, lse)

    def __call__(self, q, k):
        return self.attend(*self.select(q, k))


class DefaultLayer:
    """One KCache layer per input set, with the default options (``KCacheOptions()``, or
    ``options``: bench/step_ops.py also counts the paper-literal step; the parts below assume
    the defaults' int2 tail and hot rows).

    sets: [(q [B, Hq, D], k [B, Hkv, S, D], v [B, Hkv, S, D])] on the cache's device. Layer i
    stores set i's first S - 1 tokens as a prompt (K on the device, V handed off to host RAM, the
    tail's low-bit copy and the hot rows kept on the device); :attr:`inputs` holds each layer's
    step arguments (layer, q, new k [B, Hkv, D], new v [B, Hkv, D]). A step,
    ``cache.decode(*inputs[i])``, stores the new token at position S - 1 and attends over all S
    keys; ``seq_lens`` never advances, so every step is the same step. One step per layer runs
    here, so position S - 1 holds its token before any part is called alone.
    """

    def __init__(self, sets, options=KCacheOptions()):
        q, k, _ = sets[0]
        B, S = k.shape[0], k.shape[2]
        self.cache = make_cache("kcache", layers_config(q, k, len(sets)), B, S, k.device,
                                k.dtype, options)
        prompt = torch.full((B,), S - 1, dtype=torch.int32, device=k.device)  # [B]
        for layer, (_, k_set, v_set) in enumerate(sets):
            self.cache.store_prompt(layer, k_set[:, :, :S - 1], v_set[:, :, :S - 1], prompt)
        self.cache.finish_prefill(prompt)
        self.inputs = [(layer, q, torch.randn_like(k[:, :, 0]), torch.randn_like(v[:, :, 0]))
                       for layer, (q, k, v) in enumerate(sets)]
        for args in self.inputs:
            self.cache.decode(*args)

    @property
    def lens(self):
        """[B] int32: the keys a step attends over (S)."""
        return self.cache.lengths.attend_lens

    def qk_topn(self, layer, q):
        """The step's qk_topn alone: the top N cold rows (the hot ones skipped) of q [B, Hq, D]
        over the layer's K -> scores, indices [B, Hq, N], lse [B, Hq]."""
        return self.cache.select(q, self.cache.k[layer], self.lens, top_p=1.0)

    def select(self, layer, q):
        """The step's selection (qk_topn over the cold rows, the top_p prefix) -> scores,
        indices [B, Hq, N] (-1 padding), lse [B, Hq]."""
        return self.cache.select(q, self.cache.k[layer], self.lens)

    def attend_host(self, layer, scores, indices, lse):
        """The step's sparse_attn_v alone: the selected rows of the layer's host V with their
        full-softmax weights -> [B, Hq, D]."""
        return kcache_ops.sparse_attn_v(scores, indices, self.cache.v_host[layer], lse,
                                        renormalize=False, check_values=False)

    def tail_args(self, layer, q):
        """The arguments of the step's lowbit_tail for query q [B, Hq, D]: (every score
        [B, Hq, S] of the step's selection, lens, lse, the selection [B, Hq, N], codes, meta, bits,
        the hot rows' counts (sinks, window), the hot rows (V [B, Hkv, H, D], positions [B, H])),
        from one selection as the step makes it."""
        lens, k = self.lens, self.cache.k[layer]
        _, indices, lse, every = self.cache.select(q, k, lens, return_scores=True)
        tail, hot = self.cache.tails[layer], self.cache.hot[layer]
        return (every, lens, lse, indices, tail.codes, tail.meta, tail.bits, tail.skip,
                (hot.v, hot.slots.held))

    @staticmethod
    def lowbit_tail(every, lens, lse, indices, codes, meta, bits, skip, hot):
        """The step's lowbit_tail alone, its hot rows included (arguments from
        :meth:`tail_args`) -> [B, Hq, D] float32."""
        return kcache_ops.lowbit_tail(every, lens, lse, indices, codes, meta, bits,
                                      check_values=False, skip_first=skip[0], skip_last=skip[1],
                                      hot_v=hot[0], hot_pos=hot[1])

    def device_bytes_beside_k(self):
        """Device bytes one layer holds besides K: the tail's low-bit copy and the hot rows."""
        c = self.cache
        return (c.device_bytes() - sum(k.nbytes for k in c.k)) // len(c.k)
