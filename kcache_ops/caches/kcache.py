"""KCache: the attention cache that keeps K in device memory and V in host RAM (DESIGN.md §1, §4).

Prefill attends with the full K and V in device memory; then each KCache layer hands its V to host
RAM and keeps only K on the device. Every decode step scores all cached keys exactly
(``kcache_ops.qk_topn``) and reads only the top-N V rows from host RAM
(``kcache_ops.sparse_attn_v``); the tail term (tail.py) accounts on the device for the attention
mass of the rows not read, and the hot rows (hot.py), V of the first and last positions kept on the
device too, are attended exactly beside the top N. With ``reuse`` (reuse.py), the rows read last
stay in a pool on the device and a step reads only the others from host RAM.

Where V lives, per device:

* CUDA: ``alloc_host`` gives pinned, device-mapped host memory. Under unified addressing its host
  pointer is valid on the GPU, so the cache also wraps it as a CUDA tensor (``_mapped_view``): copy
  kernels on a stream write straight into host RAM (no cudaMemcpy, no staging, no host sync) and
  ``sparse_attn_v`` on that stream reads the rows zero-copy.
* CPU: "device" is the CPU, V is an ordinary host tensor, and every copy is synchronous. The same
  code writes V through the same indexing, so the CPU tests exercise the logic of the CUDA path.

It follows the cache protocol (protocol.py), as the dense cache does, so the model runs on either;
its dense layers run the dense cache's decode step (``dense.append_and_attend``).
"""
from contextlib import nullcontext
from functools import partial
from types import SimpleNamespace

import torch

from ..integers import as_real
from ..ops import FLOAT_DTYPES, HEAD_DIMS, alloc_host, qk_topn
from .dense import append_and_attend, prompt_attention, store_prompt_rows
from .hot import HotRows, HotSlots
from .lengths import SeqLengths, check_count, check_layer_inputs, check_sizes
from .memory import check_memory
from .options import MAX_GROUP_SELECT, MAX_REUSE, KCacheOptions
from .reuse import PooledReads, Reads, ReusedRows, pool_slots, step_entries
from .side_stream import SideStream
from .tail import make_tail, top_mass


def _mapped_view(host, device):
    """A CUDA tensor on ``device`` aliasing the pinned, mapped host tensor ``host`` (no copy).

    cudaHostAlloc(mapped) memory has one address on host and device under unified addressing, and
    torch wraps a ``__cuda_array_interface__`` without copying; the raw bytes go through uint8
    because the interface has no bfloat16. The view keeps ``host`` alive.
    """
    raw = SimpleNamespace(owner=host, __cuda_array_interface__={
        "shape": (host.nbytes,), "typestr": "|u1", "data": (host.data_ptr(), False),
        "version": 3})
    view = torch.as_tensor(raw, device=device)  # [nbytes] uint8, CUDA, host memory
    if view.data_ptr() != host.data_ptr():
        raise RuntimeError("KCache: the CUDA view of host V is a copy, not an alias; V must come "
                           "from kcache_ops.alloc_host (pinned, mapped)")
    return view.view(host.dtype).view(host.shape)


def check_dtype(dtype):
    """Refuses a dtype the ops do not take, as KCache builds (and the transformers cache, when it
    is made, before any forward)."""
    if dtype not in FLOAT_DTYPES:  # what the ops take
        raise ValueError(f"KCache: dtype must be torch.float32, torch.float16 or "
                         f"torch.bfloat16, got {dtype} (the dense cache takes float64 too)")


def check_kcache(config, device, dtype, options, capacity=None):
    """Raise ValueError where a KCache with ``options`` cannot serve a model of ``config`` in
    ``dtype`` on ``device``: a device the ops do not run on (not the CPU or CUDA), the dtype, the
    head dim, the heads (on CUDA at most :data:`MAX_GROUP_SELECT` per KV head with
    group_select), the options' own model checks (dense layers); and given the ``capacity``
    (tokens per sequence), as building one would, a reuse pool that cannot hold a step's rows
    and, on CUDA, a step's N or the pool's slots above the limits (:meth:`KCacheOptions.check`).
    A command checks what it can before it runs anything else. TypeError where ``options`` is
    not a :class:`KCacheOptions`."""
    if not isinstance(options, KCacheOptions):
        raise TypeError(f"KCache: options must be a KCacheOptions, got {type(options).__name__}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):  # where the ops have kernels
        raise ValueError(f"KCache: device must be a CPU or CUDA device (where the kcache ops "
                         f"run), got {device}; the dense cache takes any")
    check_dtype(dtype)
    if config.head_dim not in HEAD_DIMS:  # what qk_topn and sparse_attn_v take
        raise ValueError(f"KCache: head_dim must be 64 or 128, got {config.head_dim} (the "
                         f"dense cache takes any)")
    if config.num_kv_heads < 1 or config.num_heads % config.num_kv_heads:  # as LlamaConfig
        raise ValueError(f"KCache: num_heads ({config.num_heads}) must be a multiple of "
                         f"num_kv_heads ({config.num_kv_heads})")
    group = config.num_heads // config.num_kv_heads
    if options.group_select and device.type == "cuda" and group > MAX_GROUP_SELECT:
        raise ValueError(f"KCache: group_select on CUDA ranks at most {MAX_GROUP_SELECT} query "
                         f"heads per KV head together, got {group} ({config.num_heads} heads, "
                         f"{config.num_kv_heads} KV heads): select per head (group_select=False)")
    if capacity is None:
        options.check(config.num_layers, device)
        return
    entries = step_entries(options, config, capacity)  # of a step, per KV head
    how = "N" if options.group_select else "N x the GQA group, per-head selection"
    if options.reuse and device.type == "cuda" and entries > MAX_REUSE:
        raise ValueError(f"KCache: reuse on CUDA holds at most {MAX_REUSE} rows per KV head, "
                         f"fewer than a step's {entries} ({how}; N = min(topn, capacity)): "
                         f"lower topn, or select with group_select")
    if 0 < options.reuse < entries:  # a step's rows must all have a slot
        raise ValueError(f"KCache: reuse must hold the rows of a whole step, at least "
                         f"{entries} per KV head ({how}; N = min(topn, capacity)), got "
                         f"{options.reuse}")
    options.check(config.num_layers, device,
                  (options.step_topn(capacity), pool_slots(options, config, capacity)))


class KCache:
    """K in device memory and V in host RAM for every layer but ``options.dense_layers``.

    Parameters
    ----------
    config : kcache_ops.model.config.LlamaConfig
        Uses ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``.
    batch : int
        Sequences ``B``.
    capacity : int
        Tokens ``S`` per sequence, prompt and generated together.
    device, dtype
        Where and in what dtype the model runs (K, dense-layer V, seq_lens live on ``device``).
    options : KCacheOptions
        N, group select, renormalization, dense layers, tail, top_p, hot rows, reuse; checked here
        against the model's layer count and the device (a bad option fails when the cache is
        built).

    Attributes
    ----------
    seq_lens : Tensor [B] int32 on ``device``
        Tokens cached per sequence.
    record_mass : bool
        When True, each decode step adds the attention mass the rows read from host capture (not
        the hot rows'), ``Σ_i exp(score_i − lse)``, and the number of rows read, each averaged
        over sequences and heads, to per-layer running means (see :meth:`attention_mass`,
        :meth:`rows_read`), and with ``reuse`` the rows found on the device
        (:meth:`reuse_hit_rate`, :meth:`host_bytes_saved_per_step`). A step counts once it
        finishes (:meth:`finish_decode`), as its layers' last attempts: a step that raised part
        way and is run again counts once (its rerun's reuse hits include the rows the failed
        attempt read into the pool). Off by default; costs a few small device ops per layer.
        A step captured in a CUDA graph keeps the setting of its capture in every replay.
    """

    def __init__(self, config, batch, capacity, device, dtype, options=KCacheOptions()):
        batch, capacity = check_sizes("KCache", batch, capacity)
        self.device = torch.device(device)
        check_kcache(config, self.device, dtype, options, capacity)
        n_layers = config.num_layers
        self.config = config
        self.capacity = capacity
        self.options = options
        self._topn = options.step_topn(capacity)  # N of a step: more than S keys are never there
        # the hot rows qk_topn leaves unranked, as the cache keeps them: no more than its capacity
        # (a larger sinks or window skips no other position, and could overflow the op's int32)
        self._skip = options.hot_split(capacity)
        self.record_mass = False
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)  # [B, Hkv, S, D]
        kcache_layers = [i for i in range(n_layers) if i not in options.dense_layers]
        # host RAM holds V of the KCache layers, and on the CPU also K and the dense layers' V;
        # the device K and the dense layers' V
        on_cpu = self.device.type == "cpu"
        tensors = (2 * n_layers if on_cpu else len(kcache_layers), self.device,
                   n_layers + len(options.dense_layers))
        # K and V first: the parts below are smaller than K, and no tensor is made before it fits
        check_memory("KCache", shape, dtype, *tensors)
        # the bytes a KCache layer keeps on the device beside K: its parts built on the meta
        # device, which gives them their shapes and no memory
        meta = torch.device("meta")
        meta_hot = (HotSlots(*options.hot_split(capacity), batch, config.num_kv_heads, meta)
                    if options.hot_rows else None)
        beside = sum(part.nbytes for part in self._layer_parts(batch, dtype, meta, None, meta_hot)
                     if part is not None) if kcache_layers else 0
        check_memory("KCache", shape, dtype, *tensors, len(kcache_layers) * beside)
        self.lengths = SeqLengths("KCache", batch, capacity, self.device, n_layers,
                                  config.num_kv_heads)
        # zeros on the device: the exact attention of dense layers multiplies masked rows by 0,
        # and 0 * NaN from stale memory is NaN. Host V is read only at valid rows.
        self.k = [torch.zeros(shape, device=self.device, dtype=dtype)
                  for _ in range(n_layers)]  # each [B, Hkv, S, D], device
        self.v_device = {i: torch.zeros(shape, device=self.device, dtype=dtype)
                         for i in options.dense_layers}  # each [B, Hkv, S, D], device
        on_cuda = self.device.type == "cuda"
        # host V made and viewed with `device` current: cudaHostAlloc's memory belongs to the
        # device current when it is made, and torch's CUDA view of it is on that device (on
        # cuda:1 with cuda:0 current, the view would be a copy)
        with torch.cuda.device(self.device) if on_cuda else nullcontext():
            self.v_host = {i: alloc_host(shape, dtype)
                           for i in kcache_layers}  # each [B, Hkv, S, D], host RAM
            # what kernels on `device` write V through: the mapped view on CUDA, the tensor on
            # the CPU
            self._v_writable = {i: _mapped_view(v, self.device) if on_cuda else v
                                for i, v in self.v_host.items()}  # each [B, Hkv, S, D]
        # the V hand-offs of prefill, and the low-bit tail's host reads at decode
        self._side = SideStream(self.device)
        # which position each hot slot holds: the same for every layer, kept once
        self.hot_slots = (HotSlots(*options.hot_split(capacity), batch, config.num_kv_heads,
                                   self.device)
                          if options.hot_rows and self.v_host else None)
        if self.hot_slots is not None:  # until a prefill: the slots of empty sequences
            self.hot_slots.start(self.lengths.seq_lens, self.lengths.positions)
        parts = {i: self._layer_parts(batch, dtype, self.device, self._side, self.hot_slots)
                 for i in kcache_layers}  # per KCache layer: (tail, hot rows, reuse pool)
        self.tails = {i: tail for i, (tail, _, _) in parts.items()}
        self.hot = {i: hot for i, (_, hot, _) in parts.items() if hot is not None}
        self.reuse = {i: reuse for i, (_, _, reuse) in parts.items() if reuse is not None}
        self._mass_sum = torch.zeros(n_layers, dtype=torch.float32, device=self.device)  # [layers]
        self._rows_sum = torch.zeros(n_layers, dtype=torch.float32, device=self.device)  # [layers]
        # on the device too, so that the replays of a CUDA graph of decode steps count
        self._mass_steps = torch.zeros(n_layers, dtype=torch.int64,
                                       device=self.device)  # [layers]
        # with reuse: the distinct rows the recorded steps read, and those found on the device
        self._reuse_rows = torch.zeros(n_layers, dtype=torch.int64, device=self.device)  # [layers]
        self._reuse_hits = torch.zeros(n_layers, dtype=torch.int64, device=self.device)  # [layers]
        # the step under way's records, per layer (mass, rows, recorded, reuse rows, reuse hits):
        # set, not added, by each layer's step, so a layer's step run again (after a failure)
        # replaces its attempt's; added to the sums by finish_decode
        self._step_records = torch.zeros(n_layers, 5, dtype=torch.float64,
                                         device=self.device)  # [layers, 5]
        self._step_recorded = False  # on the host: whether a layer of this step recorded

    def _layer_parts(self, batch, dtype, device, side, hot_slots):
        """What a KCache layer keeps on ``device`` beside K: (its tail, its
        :class:`~.hot.HotRows` over ``hot_slots`` or None without, its
        :class:`~.reuse.ReusedRows` or None without reuse); ``side``: the cache's SideStream."""
        o, c = self.options, self.config
        tail = make_tail(o, batch, c.num_kv_heads, self.capacity, c.head_dim, device, side)
        hot = None if hot_slots is None else HotRows(hot_slots, batch, c.num_kv_heads,
                                                     c.head_dim, device, dtype)
        reuse = None if not o.reuse else ReusedRows(
            pool_slots(o, c, self.capacity), o.group_select, batch, c.num_kv_heads, c.head_dim,
            device, dtype)
        return tail, hot, reuse

    @property
    def seq_lens(self):
        """[B] int32 on the device: tokens cached per sequence."""
        return self.lengths.seq_lens

    # -- prefill ---------------------------------------------------------------------------------

    def prefill(self, layer, q, k, v, lens):
        """Attend over the prompt with K and V in device memory, then :meth:`store_prompt`.

        q [B, Hq, T, D], k/v [B, Hkv, T, D] (RoPE applied, right-padded), lens [B] int32
        -> out [B, Hq, T, D]. Call for each layer in order, then :meth:`finish_prefill`.
        """
        check_layer_inputs(self.lengths.owner, self.k, self.config.num_heads, layer, True, k, v, q)
        # the dense backend's attention: right padding makes plain causal exact on rows t < lens[b]
        out = prompt_attention(q, k, v)  # [B, Hq, T, D]
        self.store_prompt(layer, k, v, lens)  # after the attention: V's hand-off is behind it
        return out

    def store_prompt(self, layer, k, v, lens):
        """Store a prompt's k/v [B, Hkv, T, D] (lens [B] int32 valid rows) for ``layer`` without
        attending (prefill's store).

        K goes into device memory; V is handed off to host RAM (dense layers: kept on the device)
        and the tail keeps what it needs of V (its low-bit copy, or the sum of the valid rows) and
        the hot rows theirs on the device, on the current stream, before V's device memory can be
        reused; the reused rows of earlier steps are dropped. On CUDA the copy of V to host RAM
        runs on a side stream until :meth:`finish_prefill`: ``v`` must not be written before
        that (a fresh tensor, such as the layer's projection, never is).
        """
        check_layer_inputs(self.lengths.owner, self.k, self.config.num_heads, layer, True, k, v)
        k, v = k.detach(), v.detach()  # stored: the cache is no part of an autograd graph
        T = k.shape[2]
        with self.lengths.storing_prompt(layer, T, lens):
            if layer in self.options.dense_layers:  # attended with a mask, as the dense cache's
                store_prompt_rows(self.k[layer], k, lens, self.lengths.written)
                store_prompt_rows(self.v_device[layer], v, lens, self.lengths.written)
            else:
                self.k[layer][:, :, :T] = k  # qk_topn reads no row past seq_lens
                self.tails[layer].store_prompt(v, lens)
                if layer in self.hot:
                    self.hot[layer].store_prompt(v, lens)
                if layer in self.reuse:
                    self.reuse[layer].clear()
                self._hand_off_v(layer, v)

    def _hand_off_v(self, layer, v):
        """Copy v [B, Hkv, T, D] (device) into the host V of ``layer``.

        CUDA: forked on the side stream behind this layer's attention, so the copy overlaps the
        next layers' compute (:meth:`finish_prefill` joins it); ``record_stream`` keeps the caching
        allocator from reusing v's memory before the copy has read it, and the cache holds no
        reference to v, so the device memory returns to the pool once the caller drops v and the
        copy is done. CPU: a synchronous copy.
        """
        dst = self._v_writable[layer][:, :, :v.shape[2]]  # [B, Hkv, T, D]
        with self._side.fork():
            dst.copy_(v)  # CUDA: a copy kernel writing through the mapped view, async, no staging
            if self._side.stream is not None:
                v.record_stream(self._side.stream)

    def finish_prefill(self, lens):
        """Set seq_lens to the prompt lengths lens [B] int32; later work waits for the V copies.

        The wait is a stream wait (no host sync): decode kernels on the current stream run after
        every hand-off has landed in host RAM.
        """
        self._side.join()
        self.lengths.finish_prefill(lens)
        self._drop_step_records()  # of a step left unfinished before this prompt
        if self.hot_slots is not None:
            self.hot_slots.start(self.lengths.seq_lens, self.lengths.positions)

    # -- decode ----------------------------------------------------------------------------------

    def decode(self, layer, q, k, v):
        """Store the new token at position seq_lens[b] and attend over seq_lens[b] + 1 tokens.

        q [B, Hq, D], k/v [B, Hkv, D] -> out [B, Hq, D]. KCache layers: exact scores over all
        keys, top N, N V rows from host RAM (those in the pool from the device, with ``reuse``;
        the hot rows exactly from the device, the tail for the rest). Dense layers: exact
        attention on the device.
        """
        check_layer_inputs(self.lengths.owner, self.k, self.config.num_heads, layer, False, k, v, q)
        # attended over the cache, which keeps no autograd history: no gradient, not a partial one
        q, k, v = q.detach(), k.detach(), v.detach()
        lengths = self.lengths
        with lengths.decode_step(layer):
            if layer in self.options.dense_layers:
                return append_and_attend(lengths, self.k[layer], self.v_device[layer], q, k, v)
            return self._kcache_step(layer, q, k, v)

    def _kcache_step(self, layer, q, k, v):
        """The decode step of a KCache layer (:meth:`decode`'s arguments): append, select,
        attend -> out [B, Hq, D]."""
        lengths = self.lengths
        k_cache = self.k[layer]  # [B, Hkv, S, D]
        k_cache[lengths.step_index] = k
        # ordered before sparse_attn_v below (the same stream, or one forked after this write),
        # which may pick the new token among the top N
        self._v_writable[layer][lengths.step_index] = v
        tail = self.tails[layer]
        tail.append(lengths.step_index, v)
        hot = self.hot.get(layer)
        if hot is not None:
            hot.append(v)
        lens = lengths.attend_lens  # [B]
        needs_scores = tail.needs_scores or hot is not None  # the tail's weights, the hot rows'
        if q.stride(-1) != 1:  # qk_topn reads D contiguous, as the dense attention need not
            q = q.contiguous()
        selection = self.select(q, k_cache, lens, return_scores=needs_scores)  # 3 or 4 tensors
        scores, indices, lse = selection[:3]  # [B, Hq, N] x2, [B, Hq]
        all_scores = selection[3] if needs_scores else None  # [B, Hq, S]
        reads = Reads(indices, self.v_host[layer])
        reuse = self.reuse.get(layer)
        if reuse is not None:  # read into the pool where the tail fetches the rows
            record = partial(self._record_reuse, layer) if self.record_mass else None
            reads = PooledReads(reuse, indices, self.v_host[layer], lengths.seq_lens, record)
        if self.record_mass:  # this step's, kept apart until finish_decode
            self._step_records[layer, 0] = top_mass(scores, lse).mean()  # padding adds 0
            self._step_records[layer, 1] = (indices >= 0).sum(-1).float().mean()
            self._step_records[layer, 2].fill_(1)  # a Python number set by index copies from
            # the host: refused while a CUDA graph captures
            self._step_recorded = True
        return tail.attend(all_scores, lens, scores, indices, lse, reads, hot)  # [B, Hq, D]

    def _record_reuse(self, layer, counts):
        """A recorded step's reuse counts [B, Hkv, 2] (rows read, found) as the layer's part of
        the step's records, on the stream that read them."""
        self._step_records[layer, 3:] = counts.flatten(0, 1).sum(0)  # [2]

    def select(self, q, k_cache, lens, return_scores=False, top_p=None):
        """The V rows a decode step reads from host RAM, and their scores: ``qk_topn`` as a
        decode step calls it.

        q [B, Hq, D], k_cache [B, Hkv, S, D], lens [B] int32 -> scores [B, Hq, N] float32,
        indices [B, Hq, N] int32 (-1 padding), lse [B, Hq] float32 (over all keys): the top N
        by exact score (by group mass with ``group_select``) among the positions that are not hot
        rows (the first ``sinks`` and the last ``window``, which qk_topn does not rank), cut to
        each head's mass prefix with ``top_p`` (None: the options'; qk_topn makes the cut); with
        ``return_scores`` also every score, [B, Hq, S] float32 (``qk_topn``'s all_scores,
        defined at j < lens[b]). N is at most the capacity (no sequence holds more keys), so a
        large ``topn`` costs no more than reading every row.
        """
        o = self.options
        # check_values=False: the lengths are the cache's own, checked at prefill, and the indices
        # come from qk_topn; checking them would cost a device->host sync per layer and step
        return qk_topn(q, k_cache, lens, self._topn, group_select=o.group_select,
                       check_values=False, return_scores=return_scores,
                       skip_first=self._skip[0], skip_last=self._skip[1],
                       top_p=o.top_p if top_p is None else top_p)

    def finish_decode(self):
        """Every sequence has one more token: seq_lens += 1; the step's records (``record_mass``)
        go into the running sums."""
        self.lengths.finish_decode()
        if self._step_recorded:
            records = self._step_records  # [layers, 5] float64
            self._mass_sum += records[:, 0]
            self._rows_sum += records[:, 1]
            self._mass_steps += records[:, 2].long()
            self._reuse_rows += records[:, 3].long()
            self._reuse_hits += records[:, 4].long()
            self._drop_step_records()
        for tail in self.tails.values():
            tail.commit()
        for reuse in self.reuse.values():
            reuse.commit()
        if self.hot_slots is not None:  # the slots of the next step, once for every layer
            self.hot_slots.advance(self.lengths.seq_lens, self.lengths.positions)

    def _drop_step_records(self):
        """No record of a step under way (device ops only where a layer recorded: no sync)."""
        if self._step_recorded:
            self._step_records.zero_()
            self._step_recorded = False

    # -- accounting ------------------------------------------------------------------------------

    def device_bytes(self):
        """Bytes held in device memory: all K, the V of dense layers, the tails (the low-bit
        copy of V, or the V sums), the hot rows and the reused rows."""
        return (sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v_device.values())
                + sum(t.nbytes for t in self.tails.values())
                + sum(h.nbytes for h in self.hot.values())
                + sum(r.nbytes for r in self.reuse.values()))

    def host_bytes(self):
        """Bytes of the V buffers held in host RAM (every layer but the dense ones)."""
        return sum(t.nbytes for t in self.v_host.values())

    def host_bytes_read_per_step(self, rows=None):
        """Bytes a decode step moves between host RAM and the device: per KCache layer and
        sequence, ``rows`` (default N) V rows of each query head (of each KV head with group
        select) read, and the new token's V rows (one per KV head) written. With the default, an
        upper bound while a sequence holds fewer than N tokens or with ``top_p < 1``, and on CUDA,
        whose ``sparse_attn_v`` reads a row that several heads of a group chose once; pass the
        measured :meth:`rows_read` for the rows selected (with ``reuse``,
        :meth:`reuse_host_bytes_per_step` measures what the steps read)."""
        c, o = self.config, self.options
        if rows is not None:  # a measured mean: fractional, or NaN before a recorded step
            measured = as_real(rows)
            if measured is None or measured < 0 or measured > self._topn:
                raise ValueError(f"KCache: rows must be a number in [0, {self._topn}] (rows read "
                                 f"per head and step), got {rows!r}")
            rows = measured
        heads = c.num_kv_heads if o.group_select else c.num_heads
        rows = heads * (self._topn if rows is None else rows) + c.num_kv_heads  # read + appended
        batch = self.lengths.seq_lens.shape[0]
        return len(self.v_host) * batch * rows * c.head_dim * self.k[0].element_size()

    def device_bytes_read_per_step(self, tokens):
        """Bytes a decode step reads from device memory while every sequence holds ``tokens``
        keys, every layer and sequence: K of those positions (``qk_topn`` reads each row once per
        KV head), the dense layers' V of them, and per KCache layer what its tail reads (the
        low-bit copy of every position that is not hot, or the V sum of ``mean``), its hot rows
        (every slot) and, with ``reuse``, the step's N rows per head from the pool (per KV head
        with group select; an upper bound with ``top_p`` < 1, and the pool's bookkeeping and the
        rows written into it are not counted: approximate). Not the step's scores and other
        temporaries, nor the new token's rows written; the capacity allocated beyond ``tokens``
        is not read."""
        c = self.config
        tokens = check_count("KCache", "tokens", tokens, self.capacity)
        batch = self.lengths.seq_lens.shape[0]
        row = c.head_dim * self.k[0].element_size()  # one K or V row of one head
        rows = tokens * (len(self.k) + len(self.v_device))  # K, dense V, per (sequence, KV head)
        heads = c.num_kv_heads if self.options.group_select else c.num_heads
        pooled = len(self.reuse) * heads * self._topn  # per sequence
        return (batch * (c.num_kv_heads * rows + pooled) * row
                + sum(tail.device_bytes_read(tokens) for tail in self.tails.values())
                + sum(hot.nbytes for hot in self.hot.values()))

    def attention_mass(self):
        """Running mean per layer of the attention mass the top N captured while ``record_mass``
        was on -> [num_layers] float32 on the CPU; 1 for dense layers (exact), NaN for a KCache
        layer with no recorded step."""
        return self._recorded_mean(self._mass_sum, dense=1.0)

    def rows_read(self):
        """Running mean per layer of the V rows read from host RAM per head and decode step while
        ``record_mass`` was on (below N with ``top_p`` or while a sequence is shorter than N)
        -> [num_layers] float32 on the CPU; 0 for dense layers, NaN for a KCache layer with no
        recorded step."""
        return self._recorded_mean(self._rows_sum, dense=0.0)

    def reuse_hit_rate(self):
        """With ``reuse``: per layer, the share of the distinct V rows the recorded steps
        (``record_mass``) read that came from device memory instead of host RAM -> [num_layers]
        float32 on the CPU; NaN for dense layers, without reuse and before a recorded step."""
        return (self._reuse_hits.cpu() / self._reuse_rows.cpu()).float()  # 0 / 0 = NaN

    def host_bytes_saved_per_step(self):
        """With ``reuse``: the bytes of host RAM a decode step did not read because the rows
        were on the device, over every layer and sequence, averaged over the recorded steps
        (``record_mass``) -> float; 0.0 without reuse or before a recorded step."""
        hits = self._recorded_mean(self._reuse_hits, dense=0.0).nan_to_num(nan=0.0)  # [layers]
        return float(hits.sum()) * self.config.head_dim * self.k[0].element_size()

    def reuse_host_bytes_per_step(self):
        """With ``reuse``: the bytes a decode step moved between host RAM and the device,
        measured over the recorded steps (``record_mass``): the distinct rows the pools lacked,
        every layer and sequence, and the new token's rows written -> float; NaN before a
        recorded step."""
        missed = self._recorded_mean(self._reuse_rows - self._reuse_hits, dense=0.0)  # [layers]
        rows = float(missed.sum())  # 0 / 0 = NaN where none was recorded
        written = len(self.v_host) * self.lengths.seq_lens.shape[0] * self.config.num_kv_heads
        return (rows + written) * self.config.head_dim * self.k[0].element_size()

    def _recorded_mean(self, sums, dense):
        """sums [layers] (device) over the recorded steps -> [layers] on the CPU, ``dense`` at the
        dense layers."""
        mean = sums.cpu() / self._mass_steps.cpu()  # [layers]
        mean[list(self.options.dense_layers)] = dense
        return mean
