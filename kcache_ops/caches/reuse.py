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
3. reads the others from host RAM (``gather_rows``, one read per row) into the pool's least
   recently used slots (never one that this step reads);
4. hands the attention the pool and, per entry, the slot of its row (:class:`Reads`):
   ``sparse_attn_v`` reads device memory instead of host RAM, at the same weights.

A position is written once while a sequence lives (a prefill empties the pool), so a row found in
the pool is the very row host RAM holds and the output is that of a step without reuse; only
where the bytes come from changes. The one position a step may write again is its own new token
(a step given up, after a failure or on purpose, and run again with another token): its row
takes a slot for this step only and is never found there later. Device ops on fixed shapes
only: no host sync, and the step count that orders the slots is a device tensor, so decode
steps can be captured in a CUDA graph and replayed. On CUDA the host read (``gather_rows``) runs
on the current stream, before the low-bit tail, which it does not overlap as ``sparse_attn_v``
on host V does (tail.py).
"""
from collections import namedtuple

import torch

from ..ops import gather_rows

class Reads(namedtuple("Reads", "indices v")):
    """The V rows a decode step attends over: indices [B, Hq, N] int32 (-1 padding) into the rows
    of v [B, Hkv, S', D] (host V itself, S' = S, or the pool of reused rows)."""


def entries_per_step(topn, group_select, num_heads, num_kv_heads):
    """The most rows a decode step reads per (sequence, KV head): ``topn`` with group_select, the
    group's ``G · topn`` per head."""
    return topn * (1 if group_select else num_heads // num_kv_heads)


class ReusedRows:
    """The V rows one KCache layer read last, in device memory: a pool of C slots per (sequence,
    KV head), refilled least recently used first.

    rows : Tensor [B, Hkv, C + 1, D] on the device, dtype of V — slot ``c`` holds V of the
        position ``held[..., c]``; slot C takes the writes of entries that write nothing (never
        read)
    held : Tensor [B, Hkv, C + 1] int32 — the position each slot holds, -1 where none
    used : Tensor [B, Hkv, C + 1] int64 — the step that last read each slot, -1 never
    """

    def __init__(self, slots, entries, group_select, batch, num_kv_heads, head_dim, device,
                 dtype):
        """``slots`` C >= ``entries`` E, the entries of a step per KV head (G·N, or N with
        group_select, N the step's)."""
        self.group_select = group_select
        shape = (batch, num_kv_heads, slots + 1)
        self.rows = torch.zeros(*shape, head_dim, dtype=dtype, device=device)  # [B, Hkv, C+1, D]
        self.held = torch.full(shape, -1, dtype=torch.int32, device=device)  # [B, Hkv, C + 1]
        self.used = torch.full(shape, -1, dtype=torch.long, device=device)  # [B, Hkv, C + 1]
        self.nbytes = self.rows.nbytes + self.held.nbytes + self.used.nbytes
        self._step = torch.zeros(1, dtype=torch.long, device=device)  # [1]: steps since prefill
        self._entry = torch.arange(entries, device=device)  # [E]

    def clear(self):
        """A prefill: no slot holds a row."""
        self.held.fill_(-1)
        self.used.fill_(-1)
        self._step.zero_()

    def read(self, indices, v_host, new_pos):
        """The rows of a step: indices [B, Hq, N] int32 (-1 padding) into v_host [B, Hkv, S, D],
        new_pos [B] long (the step's new token, never kept in the pool) -> (:class:`Reads`
        over the pool, reads [B, Hkv, E] bool: an entry per row the step reads (its distinct
        positions), hits [B, Hkv, E] bool: those found in the pool); E = G·N, or N with
        group_select."""
        B, Hq, N = indices.shape
        _, Hkv, C1, D = self.rows.shape
        C, G = C1 - 1, Hq // Hkv
        by_kv = indices.view(B, Hkv, G, N)  # [B, Hkv, G, N]
        # group_select: entry i is the group's i-th row, or -1 past a head's top_p prefix
        pos = by_kv.amax(2) if self.group_select else by_kv.reshape(B, Hkv, G * N)  # [B, Hkv, E]
        E = pos.shape[-1]
        # the first entry of each position (max gives the first of equal maxima)
        first = (pos[..., :, None] == pos[..., None, :]).max(-1).indices  # [B, Hkv, E]
        reads = (first == self._entry) & (pos >= 0)  # [B, Hkv, E]: one entry per row read
        # E·C bools per sequence and KV head: the lookup's temporary memory
        found, slot = (pos[..., :, None] == self.held[..., None, :C]).max(-1)  # [B, Hkv, E] x2
        hit = found & reads  # [B, Hkv, E]; slot: the first slot holding it (0 where none)
        # the slots this step reads keep their rows; the others go least recently used first
        # (never-used -1 first), ties to the lower slot
        mine = torch.where(hit, slot, C)  # [B, Hkv, E]
        key = self.used.scatter(2, mine, self._step.add(1).expand(B, Hkv, E))  # [B, Hkv, C + 1]
        victims = key[..., :C].argsort(dim=-1, stable=True)[..., :E]  # [B, Hkv, E]
        fetch = reads & ~hit  # [B, Hkv, E]: rows read from host RAM, each into a slot
        rank = (fetch.cumsum(-1) - 1).clamp(min=0)  # [B, Hkv, E]: the i-th takes victim i
        slot = torch.where(hit, slot, victims.gather(2, rank))  # [B, Hkv, E]
        # check_values=False: the positions come from qk_topn (a check would sync, on CUDA)
        fetched = gather_rows(v_host, torch.where(fetch, pos, -1),
                              check_values=False)  # [B, Hkv, E, D]
        dest = torch.where(fetch, slot, C)  # [B, Hkv, E]: the others write slot C
        self.rows.scatter_(2, dest[..., None].expand(B, Hkv, E, D), fetched)
        # the new token's slot serves this step only: then empty, and the first to refill
        kept = reads & (pos != new_pos[:, None, None])  # [B, Hkv, E]
        self.held.scatter_(2, dest, torch.where(kept, pos, -1))
        self.used.scatter_(2, torch.where(reads, slot, C), torch.where(kept, self._step, -1))
        local = slot.gather(2, first).int()  # [B, Hkv, E]: an entry reads its first entry's slot
        local = (local.view(B, Hkv, 1, N).expand(B, Hkv, G, N) if self.group_select
                 else local.view(B, Hkv, G, N))  # [B, Hkv, G, N]
        pool_indices = torch.where(indices >= 0, local.reshape(B, Hq, N), -1)  # [B, Hq, N]
        return Reads(pool_indices, self.rows), reads, hit

    def commit(self):
        """The step is done: the next one is more recent."""
        self._step.add_(1)
