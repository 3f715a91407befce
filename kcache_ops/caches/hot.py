"""Hot rows of a KCache layer (``KCacheOptions.sinks`` / ``window``): V of the first ``sinks`` and
the last ``window`` positions of each sequence, kept on the device beside K.

Those positions carry much of the attention at every step (the attention sinks at the start, the
recent tokens at the end), so a decode step attends to them exactly from device memory and reads
from host RAM the top N among the other ("cold") positions only: N host rows per head stay N.
The hot and the host part share the step's exact ``lse``, so their exact weights
``exp(s − lse)`` add up (the merge by lse); the tail (tail.py) takes every row neither part read.

Slots: ``0 .. sinks-1`` hold positions ``0 .. sinks-1``; the ``window`` slots after them are a ring
over positions ``>= sinks`` (position ``p`` in slot ``sinks + (p − sinks) mod window``), so an
append overwrites the position that just left the window. Which position each slot holds is the
same for every layer: the cache keeps it once (:class:`HotSlots`), each layer its V
(:class:`HotRows`).
"""
from collections import namedtuple

import torch

from .lengths import index_at

class HotPart(namedtuple("HotPart", "weights v")):
    """The exact attention of a step's hot rows, added into the step's output where it is formed:
    weights [B, Hkv, G, H] float32 = exp(s − lse) (0 at empty slots), v [B, Hkv, H, D] float32
    (the rows the slots hold)."""

    def add_to(self, out):
        """out [B, Hq, D] float32 (contiguous) + Σ_j weights_j · v_j -> [B, Hq, D] float32, in
        one batched matmul (the add folded into it)."""
        B, Hkv, G, H = self.weights.shape
        D = self.v.shape[-1]
        return torch.baddbmm(out.view(B * Hkv, G, D), self.weights.view(B * Hkv, G, H),
                             self.v.view(B * Hkv, H, D)).view(B, Hkv * G, D)


class HotSlots:
    """Which position each hot-row slot holds, and where the next token goes. Every layer of a
    cache appends the same positions, so the cache keeps one of these for all its layers and
    updates it once per step, when the lengths change (:meth:`start` at the prefill,
    :meth:`advance` after each step: device ops, in place, no host sync), for the step to come.

    held : Tensor [B, H] int32 — the position each slot holds during the next decode step (its new
        token included), -1 where none; H = sinks + window
    gather : Tensor [B, H] long — ``held`` clamped to >= 0: where each slot's score is in a step's
        every score
    empty : Tensor [B, H] bool — ``held < 0``
    slot : Tensor [B] long — the slot of the next decode step's token
    keep : Tensor [B] bool — whether that token has a slot (not past the sinks with window = 0)
    index : tuple of Tensor — :func:`~.lengths.index_at` of the sequences, the ``num_kv_heads``
        KV heads and ``slot``: where a step's token goes in each layer's :attr:`HotRows.v`
        (views of tensors changed in place)
    """

    def __init__(self, sinks, window, batch, num_kv_heads, device):
        self.sinks, self.window = sinks, window
        self.size = sinks + window
        self.held = torch.full((batch, self.size), -1, dtype=torch.int32, device=device)
        self.gather = torch.zeros(batch, self.size, dtype=torch.long, device=device)
        self.empty = torch.ones(batch, self.size, dtype=torch.bool, device=device)
        self.slot = torch.zeros(batch, dtype=torch.long, device=device)
        self.keep = torch.ones(batch, dtype=torch.bool, device=device)
        self._rows = torch.arange(batch, device=device)  # [B]
        self._slots = torch.arange(self.size, device=device)  # [H]
        heads = torch.arange(num_kv_heads, device=device)  # [Hkv]
        self.index = index_at(self._rows, heads, self.slot)  # [B, 1], [Hkv], [B, 1]

    def positions(self, lens):
        """lens [B] int32 -> (pos [B, H] int64, the position each slot holds at length L_b,
        clamped to >= 0; valid [B, H] bool, that position is < L_b)."""
        L = lens.to(self._slots.device, torch.long)[:, None]  # [B, 1]: lens may be on the CPU
        j = self._slots[None, :]  # [1, H]
        sinks, window = self.sinks, max(self.window, 1)
        ring = j - sinks  # [1, H]: the ring slot of j >= sinks
        behind = L - 1 - sinks - ring  # [B, H]: how far the newest position of that ring slot lies
        newest = sinks + ring + window * torch.div(behind, window, rounding_mode="floor")  # [B, H]
        pos = torch.where(j < sinks, j, newest)  # [B, H]
        valid = (pos < L) & ((j < sinks) | (behind >= 0))  # [B, H]
        return pos.clamp(min=0), valid

    def slot_of(self, pos):
        """pos [B] long -> slot [B] long: where the token at pos[b] is kept (with window = 0, a
        position past the sinks has none: the last sink's slot, which is then left alone)."""
        if self.window:
            return torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.window)
        return pos.clamp(max=self.sinks - 1)

    def start(self, lens, pos):
        """After the prefill: the slots of prompts of lens [B] int32 tokens, and the next token's
        at pos [B] long (the same lengths)."""
        held, valid = self.positions(lens)  # [B, H] each
        self.held.copy_(torch.where(valid, held, -1))
        self.advance(lens, pos)

    def advance(self, lens, pos):
        """After a decode step (and the prefill): the next token, at pos [B] long (lens [B]
        int32, the same)."""
        self.slot.copy_(self.slot_of(pos))
        if self.window:
            self.held[self._rows, self.slot] = lens
        else:
            torch.lt(pos, self.sinks, out=self.keep)
            self.held[self._rows, self.slot] = torch.where(self.keep, lens,
                                                           self.held[self._rows, self.slot])
        self.gather.copy_(self.held.clamp(min=0))
        torch.lt(self.held, 0, out=self.empty)


class HotRows:
    """The device V of one layer's hot rows.

    v : Tensor [B, Hkv, H, D] on the device — slot ``j`` holds V of the position ``slots.held``
        gives it; slots whose position is not (yet) valid hold zeros.
    slots : HotSlots — the positions, shared by the cache's layers (bookkeeping, like the cache's
        lengths: not counted in ``nbytes``).
    """

    def __init__(self, slots, batch, num_kv_heads, head_dim, device, dtype):
        self.slots = slots
        self.v = torch.zeros(batch, num_kv_heads, slots.size, head_dim, dtype=dtype,
                             device=device)  # [B, Hkv, H, D]
        self.nbytes = self.v.nbytes

    def store_prompt(self, v, lens):
        """Keep the hot rows of the prompt's v [B, Hkv, T, D] (right-padded, lens [B] int32)."""
        pos, valid = self.slots.positions(lens)  # [B, H] each
        B, Hkv, T, D = v.shape
        if T == 0:  # an empty prompt: no slot holds a position
            self.v.zero_()
            return
        H = self.slots.size
        rows = pos.clamp(max=T - 1)[:, None, :, None].expand(B, Hkv, H, D)  # [B, Hkv, H, D]
        hot = torch.gather(v, 2, rows)  # [B, Hkv, H, D]
        self.v.copy_(hot.masked_fill(~valid[:, None, :, None], 0))

    def append(self, v):
        """Keep one token's v [B, Hkv, D] of each sequence in its slot (``slots.slot``, at
        ``slots.index``; nothing changes for a token without one, ``slots.keep`` False)."""
        s = self.slots
        if s.window:
            self.v[s.index] = v
        else:
            self.v[s.index] = torch.where(s.keep[:, None, None], v, self.v[s.index])

    def attend(self, lse, all_scores):
        """The exact attention of the hot rows this step holds (``slots.held``, its new token
        appended): lse [B, Hq] float32 (over all keys), all_scores [B, Hq, S] float32 (the step's
        every score, both from ``qk_topn``) -> :class:`HotPart`. The scores are the very ones
        ``lse`` was taken over, so the weights of the hot rows, the top N and the tail add up to 1
        however large the scores (recomputed from K they would differ by rounding, which
        ``exp(s − lse)`` turns into a relative error of the order of |s| · 1e-7)."""
        B, Hq = lse.shape
        _, Hkv, H, _ = self.v.shape
        group = Hq // Hkv
        s = self.slots
        slots = s.gather[:, None, :].expand(B, Hq, H)  # [B, Hq, H]
        scores = torch.gather(all_scores, 2, slots).view(B, Hkv, group, H)  # [B, Hkv, G, H]
        # a score and lse both +inf (finite q and K whose product overflows float32) weigh 0, as
        # in the ops, not NaN
        p = torch.exp(scores - lse.reshape(B, Hkv, group, 1)).nan_to_num(nan=0.0)  # [B, Hkv, G, H]
        p = p.masked_fill(s.empty[:, None, None, :], 0.0)  # [B, Hkv, G, H]
        return HotPart(p, self.v.float())  # [B, Hkv, G, H], [B, Hkv, H, D]
