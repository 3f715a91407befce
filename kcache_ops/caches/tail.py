"""The tail term of a KCache layer (``KCacheOptions.tail``): what the decode step does with the
attention mass of the rows it does not read from host RAM.

Every decode step knows the exact score of every key and the exact ``lse`` (K is on the device),
so the top N rows can get their exact full-softmax weights ``p_i = exp(s_i − lse)`` and the mass
they miss, ``1 − Σ p_i``, can be accounted for on the device:

* :class:`NoTail` (``"none"``, the paper): softmax over the top N (``renormalize``), or their
  exact weights with the rest dropped.
* :class:`MeanTail` (``"mean"``): the rest gets the mean V of the rows not read, from a running
  sum of V per (sequence, KV head) — D floats of device memory, no extra PCIe bytes
  (``sparse_attn_v``'s ``v_sum``).
* :class:`LowBitTail` (``"int2"``, ``"int4"``): a 2- or 4-bit copy of V stays on the device
  (``quantize_rows``, written at the hand-off and at each append, on the stream that computes V);
  every row not read contributes with its exact weight over its dequantized copy
  (``lowbit_tail``, over the scores the selection computed: ``needs_scores``). On CUDA its
  ``sparse_attn_v`` (PCIe-bound) runs on the cache's side stream beside ``lowbit_tail``
  (device-memory bound): side_stream.py.

Each tail stores the prompt (:meth:`store_prompt`), appends a token (:meth:`append`; a layer's
step run again appends the same position again), keeps it when the step is done
(:meth:`commit`, from ``KCache.finish_decode``) and attends
(:meth:`attend`, given every score of the step when its ``needs_scores`` is True or the layer
has hot rows, else None, and the rows to read, whose ``fetch()`` gives a :class:`~.reuse.Reads`:
host V, or the device pool of reused rows, read on the stream that fetches them);
``nbytes`` is the device memory it holds. With hot rows (hot.py), ``attend`` also takes the
layer's :class:`~.hot.HotRows` and adds their exact part: :class:`NoTail` from their
:class:`~.hot.HotPart` (a few torch ops), :class:`LowBitTail` inside its ``lowbit_tail`` call
(``hot_v`` / ``hot_pos``: no separate op), which leaves their positions out of the low-bit sum
(``skip_first`` / ``skip_last``, the counts ``qk_topn`` skipped).
"""
import torch

from ..ops import lowbit_tail, quantize_rows, sparse_attn_v

FLOAT16_MAX = torch.finfo(torch.float16).max  # 65504


def top_mass(scores, lse):
    """The softmax mass of the selected rows: scores [B, Hq, N] (padding -inf) and lse [B, Hq] of
    ``qk_topn`` -> [B, Hq] float32. A score and lse both +inf (finite q and K whose product
    overflows float32) weigh 0, as in the ops, not NaN."""
    return torch.exp(scores - lse[..., None]).nan_to_num(nan=0.0).sum(-1)


def unit_stride_rows(v):
    """v [..., D] with a contiguous last dim, as quantize_rows takes it (a copy only where v's
    last dim is strided: a cache takes any layout; an empty v made anew, as contiguous() hands
    it back with its strides)."""
    if v.stride(-1) == 1:
        return v
    return v.contiguous() if v.numel() else torch.empty(v.shape, dtype=v.dtype, device=v.device)


class NoTail:
    """No tail: the top N rows alone (DESIGN.md §3, the paper's KCache)."""

    nbytes = 0
    needs_scores = False

    def __init__(self, renormalize):
        self.renormalize = renormalize

    def store_prompt(self, v, lens):
        """Nothing to keep."""

    def append(self, index, v):
        """Nothing to keep."""

    def commit(self):
        """Nothing to keep."""

    def device_bytes_read(self, tokens):
        """Bytes a decode step reads of what the tail keeps on the device (nothing)."""
        return 0

    def attend(self, all_scores, lens, scores, indices, lse, reads, hot=None):
        """The top N rows (``reads``) and the hot rows (a :class:`~.hot.HotRows`) -> out
        [B, Hq, D] (dtype of V)."""
        rows = reads.fetch()
        if hot is None:
            return sparse_attn_v(scores, rows.indices, rows.v, lse, self.renormalize,
                                 check_values=False)
        part = hot.attend(lse, all_scores)  # their HotPart
        if not self.renormalize:  # the full softmax's weights: what the top N rows add
            top = sparse_attn_v(scores, rows.indices, rows.v, lse, renormalize=False,
                                check_values=False)  # [B, Hq, D]
            return part.add_to(top.float()).to(top.dtype)
        # a softmax over the top N and the hot rows together: the top N's own softmax (in V's
        # dtype, as large as a row) times their mass in float32; their weighted sum in V's
        # dtype underflowed where the group's shared rows carry little of a head's mass
        top = sparse_attn_v(scores, rows.indices, rows.v, lse, renormalize=True,
                            check_values=False)  # [B, Hq, D]
        mass = top_mass(scores, lse)  # [B, Hq]
        out = part.add_to(top.float() * mass[..., None])  # [B, Hq, D] float32
        mass = mass + part.weights.sum(-1).flatten(1)  # [B, Hq]; padding 0
        return (out / mass.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).to(top.dtype)


class MeanTail:
    """The mass outside the top N goes to the mean V of the rows not read.

    v_sum : Tensor [B, Hkv, D] float32 on the device — Σ of the V rows ``j < L_b``, and in a decode
        step, once the layer has appended, of the new token's row too.
    The sum before the step is kept apart (``_committed``, made the sum by :meth:`commit` when the
    step finishes), so a layer's step run again (after a failure inside an op, or on purpose)
    counts its token once, as its rows are written once.
    """

    needs_scores = False

    def __init__(self, batch, num_kv_heads, head_dim, device):
        self.v_sum = torch.zeros(batch, num_kv_heads, head_dim, dtype=torch.float32,
                                 device=device)  # [B, Hkv, D]
        self._committed = torch.zeros_like(self.v_sum)  # [B, Hkv, D]: Σ rows j < L_b
        self.nbytes = self.v_sum.nbytes + self._committed.nbytes

    def store_prompt(self, v, lens):
        """v [B, Hkv, T, D] right-padded, lens [B] int32: the sum of the rows ``t < lens[b]``."""
        T = v.shape[2]
        valid = torch.arange(T, device=v.device)[None, :] < lens.to(v.device)[:, None]  # [B, T]
        rows = v.float().masked_fill(~valid[:, None, :, None], 0)  # [B, Hkv, T, D]
        self.v_sum.copy_(rows.sum(2))  # padding rows as zeros: 0 times an inf or NaN is NaN
        self._committed.copy_(self.v_sum)

    def append(self, index, v):
        """The sum before this step plus one token's v [B, Hkv, D] (index: where it is stored)."""
        torch.add(self._committed, v.float(), out=self.v_sum)  # v detached by the cache

    def commit(self):
        """The step is done: its token stays in the sum."""
        self._committed.copy_(self.v_sum)

    def device_bytes_read(self, tokens):
        """Bytes a decode step reads of what the tail keeps on the device: the V sum, whatever
        the ``tokens``."""
        return self.v_sum.nbytes

    def attend(self, all_scores, lens, scores, indices, lse, reads, hot=None):
        """Exact weights on the top N rows (``reads``, of host V) plus the mean tail -> out
        [B, Hq, D] (no hot rows or reuse: KCacheOptions refuses them with this tail)."""
        rows = reads.fetch()
        return sparse_attn_v(scores, rows.indices, rows.v, lse, renormalize=False,
                             check_values=False, v_sum=self.v_sum, seq_lens=lens)


class LowBitTail:
    """Every row not read contributes with its exact weight, over a low-bit copy of V.

    codes : Tensor [B, Hkv, S, D * bits / 8] uint8 on the device
    meta : Tensor [B, Hkv, S, 2] bfloat16 on the device — (scale, min) per row
    Rows ``j >= L_b`` are never read, so the buffers start uninitialised.
    """

    needs_scores = True  # the weights of the rows not read come from the step's scores

    def __init__(self, bits, batch, num_kv_heads, capacity, head_dim, device, side, skip):
        self.bits = bits
        self.skip = skip  # (sinks, window): the hot rows' positions, left out of the tail
        shape = (batch, num_kv_heads, capacity)
        self.codes = torch.empty(*shape, head_dim * bits // 8, dtype=torch.uint8,
                                 device=device)  # [B, Hkv, S, D * bits / 8]
        self.meta = torch.empty(*shape, 2, dtype=torch.bfloat16, device=device)  # [B, Hkv, S, 2]
        self.nbytes = self.codes.nbytes + self.meta.nbytes
        self.side = side  # SideStream: the host reads beside lowbit_tail

    def store_prompt(self, v, lens):
        """Quantize the prompt's v [B, Hkv, T, D] into positions ``0..T-1``."""
        # [B, Hkv, T, D * bits / 8], [B, Hkv, T, 2]
        codes, meta = quantize_rows(unit_stride_rows(v), self.bits)
        T = v.shape[2]
        self.codes[:, :, :T] = codes
        self.meta[:, :, :T] = meta

    def append(self, index, v):
        """Quantize one token's v [B, Hkv, D] into its position: ``index``, a decode step's
        (:attr:`.lengths.SeqLengths.step_index`)."""
        # [B, Hkv, D * bits / 8], [B, Hkv, 2]
        codes, meta = quantize_rows(unit_stride_rows(v), self.bits)
        self.codes[index] = codes
        self.meta[index] = meta

    def commit(self):
        """Nothing to do: a step run again writes its token's copy into the same position."""

    def device_bytes_read(self, tokens):
        """Bytes a decode step reads of the copy while every sequence holds ``tokens`` keys:
        the codes, scale and min of each position that is not a hot row (the hot rows are read
        exactly instead; the N rows read from host RAM are among those counted)."""
        batch, heads, _, width = self.codes.shape
        per_row = width + self.meta.shape[-1] * self.meta.element_size()
        return batch * heads * max(0, tokens - sum(self.skip)) * per_row

    def attend(self, all_scores, lens, scores, indices, lse, reads, hot=None):
        """Exact weights on the top N rows (``reads``) and on the hot rows (a
        :class:`~.hot.HotRows`, in the same ``lowbit_tail`` call), plus every other valid row
        over the copy (the top N by their positions, ``indices``, left out), weighted from
        all_scores [B, Hq, S] float32 (every score of the step) -> out [B, Hq, D] (dtype of V).
        The host reads run beside the tail (side stream) and overlap it: ``sparse_attn_v`` over
        host V, or with reuse the pool's fetch and ``sparse_attn_v`` over the pool."""
        hot_v, hot_pos = (None, None) if hot is None else (hot.v, hot.slots.held)
        top = None  # joined whatever raises: the side stream may already read this step's tensors
        try:
            with self.side.fork():
                rows = reads.fetch()
                top = sparse_attn_v(scores, rows.indices, rows.v, lse, renormalize=False,
                                    check_values=False)  # [B, Hq, D]
            rest = lowbit_tail(all_scores, lens, lse, indices, self.codes, self.meta, self.bits,
                               check_values=False, skip_first=self.skip[0],
                               skip_last=self.skip[1], hot_v=hot_v,
                               hot_pos=hot_pos)  # [B, Hq, D] float32
        finally:
            self.side.join(top)
        out = rest + top  # [B, Hq, D] float32: the add promotes top
        if top.dtype == torch.float16:
            # the copy's rounding alone can reach past float16's range (a row's min of -65500 is
            # -65536 in the copy's bfloat16), where exact attention, weights of at most 1 summing
            # to 1 over finite rows, stays within it: held at its edge (an inf from V kept)
            out = torch.where(out.isinf(), out, out.clamp(-FLOAT16_MAX, FLOAT16_MAX))
        return out.to(top.dtype)


def make_tail(options, batch, num_kv_heads, capacity, head_dim, device, side):
    """The tail of one KCache layer for ``options.tail`` (side: the cache's SideStream)."""
    if options.tail == "none":
        return NoTail(options.renormalize)
    if options.tail == "mean":
        return MeanTail(batch, num_kv_heads, head_dim, device)
    bits = {"int2": 2, "int4": 4}[options.tail]
    return LowBitTail(bits, batch, num_kv_heads, capacity, head_dim, device, side,
                      options.hot_split(capacity))
