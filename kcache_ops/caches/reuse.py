"""Cross-step reuse of the V rows a KCache layer reads (``KCacheOptions.reuse``; DESIGN.md §7).

Consecutive decode steps read many of the same V rows from host RAM: on the embedded SmolLM2 at
N = 64, 62 % of a step's rows were read the step before and 89 % within the last 16
(bench/NOTES.md, "Cross-step reuse"). With ``reuse = C`` each KCache layer keeps the last rows it
read in a pool of C rows per (sequence, KV head) in device memory, and a step

1. lists the rows its selection reads: per KV head the entries of its heads' index sets (the G
   heads' N indices one after another, or the group's one set with ``group_select``, which
   ``top_p`` may cut to a different prefix per head: the longest), each position read by its
   first entry (several heads often choose the same row);
2. looks each up among the positions the pool holds;
3. reads the others from host RAM into the pool's least recently used slots (never one that this
   step reads);
4. hands the attention the pool and, per entry, the slot of its row (:class:`Reads`):
   ``sparse_attn_v`` reads device memory instead of host RAM, at the same weights.

Steps 1–3 are one op, :func:`kcache_ops.reuse_rows` (on CUDA one launch; the torch ops it replaced
took some 34 small kernels a layer step, bench/NOTES.md).
A position is written once while a sequence lives (a prefill empties the pool), so a row found in
the pool is the very row host RAM holds and the output is that of a step without reuse; only
where the bytes come from changes. The one position a step may write again is its own new token
(a step given up, after a failure or on purpose, and run again with another token): its row
takes a slot for this step only and is never found there later. No host sync, fixed shapes, and
the step count that orders the slots is a device tensor, so decode steps can be captured in a
CUDA graph and replayed. The step's tail runs the op when it fetches the rows
(:class:`PooledReads`): with the low-bit tail on CUDA, on the side stream beside ``lowbit_tail``,
as ``sparse_attn_v`` over host V runs without reuse (tail.py).
"""
from collections import namedtuple

import torch

from ..ops import reuse_rows

class Reads(namedtuple("Reads", "indices v")):
    """The V rows a decode step attends over: indices [B, Hq, N] int32 (-1 padding) into the rows
    of v [B, Hkv, S', D] (host V itself, S' = S, or the pool of reused rows)."""

    def fetch(self):
        """The rows, as the tail asks for them (:class:`PooledReads` reads them first)."""
        return self


class PooledReads:
    """A step's rows with reuse, read into the pool when the tail fetches them: on the stream
    that attends (on CUDA with the low-bit tail, the side stream, beside ``lowbit_tail``).
    ``record``: None, or a function given the step's counts [B, Hkv, 2] (:meth:`ReusedRows.read`)
    on that stream."""

    def __init__(self, pool, indices, v_host, new_pos, record=None):
        self.pool, self.record = pool, record
        self.args = indices, v_host, new_pos

    def fetch(self):
        """-> :class:`Reads` over the pool."""
        reads, counts = self.pool.read(*self.args)
        if self.record is not None:
            self.record(counts)
        return reads


def step_entries(options, config, capacity):
    """The most rows a decode step of a KCache with ``options`` and ``capacity`` for a model of
    ``config`` reads per (sequence, KV head): N = ``min(topn, capacity)`` with group_select, the
    group's ``G · N`` per head."""
    group = 1 if options.group_select else config.num_heads // config.num_kv_heads
    return options.step_topn(capacity) * group


def pool_slots(options, config, capacity):
    """The slots of a reuse pool per (sequence, KV head) in a cache of ``capacity`` tokens for a
    model of ``config``: ``options.reuse``, but no more than ``max(capacity, the entries of a
    step)``. A slot whose position is found is never refilled, and the new token's is emptied
    after its step, so the positions held, with a step's fetches, never pass the capacity: a
    larger pool would only hold empty slots (the reads and hits are the same)."""
    return min(options.reuse, max(capacity, step_entries(options, config, capacity)))


class ReusedRows:
    """The V rows one KCache layer read last, in device memory: a pool of C slots per (sequence,
    KV head), refilled least recently used first (:func:`kcache_ops.reuse_rows`).

    rows : Tensor [B, Hkv, C, D] on the device, dtype of V — slot ``c`` holds V of the position
        ``held[..., c]``
    held : Tensor [B, Hkv, C] int32 — the position each slot holds, -1 where none
    used : Tensor [B, Hkv, C] int32 — the step that last read each slot, -1 never
    """

    def __init__(self, slots, group_select, batch, num_kv_heads, head_dim, device, dtype):
        """``slots`` C, at least the entries of a step per KV head (G·N, or N with
        group_select, N the step's)."""
        self.group_select = group_select
        shape = (batch, num_kv_heads, slots)
        self.rows = torch.zeros(*shape, head_dim, dtype=dtype, device=device)  # [B, Hkv, C, D]
        self.held = torch.full(shape, -1, dtype=torch.int32, device=device)  # [B, Hkv, C]
        self.used = torch.full(shape, -1, dtype=torch.int32, device=device)  # [B, Hkv, C]
        self.nbytes = self.rows.nbytes + self.held.nbytes + self.used.nbytes
        self._step = torch.zeros(1, dtype=torch.int32, device=device)  # [1]: steps since prefill

    def clear(self):
        """A prefill: no slot holds a row."""
        self.held.fill_(-1)
        self.used.fill_(-1)
        self._step.zero_()

    def read(self, indices, v_host, new_pos):
        """The rows of a step: indices [B, Hq, N] int32 (-1 padding) into v_host [B, Hkv, S, D],
        new_pos [B] int32 (the step's new token, never kept in the pool) -> (:class:`Reads`
        over the pool, counts [B, Hkv, 2] int32: the distinct positions the step read, and
        those found in the pool)."""
        # check_values=False: the positions come from qk_topn (a check would sync, on CUDA)
        pool_indices, counts = reuse_rows(indices, v_host, new_pos, self.rows, self.held,
                                          self.used, self._step, self.group_select,
                                          check_values=False)  # [B, Hq, N], [B, Hkv, 2]
        return Reads(pool_indices, self.rows), counts

    def commit(self):
        """The step is done: the next one is more recent."""
        self._step.add_(1)
