"""Hot rows of a KCache layer (``KCacheOptions.sinks`` / ``window``): V of the first ``sinks`` and
the last ``window`` positions of each sequence, kept on the device beside K.

Those positions carry much of the attention at every step (the attention sinks at the start, the
recent tokens at the end), so a decode step attends to them exactly from device memory and reads
from host RAM the top N among the other ("cold") positions only: N host rows per head stay N.
The hot and the host part share the step's exact ``lse``, so their exact weights
``exp(s − lse)`` add up (the merge by lse); the tail (tail.py) takes every row neither part read.

Slots: ``0 .. sinks-1`` hold positions ``0 .. sinks-1``; the ``window`` slots after them are a ring
over positions ``>= sinks`` (position ``p`` in slot ``sinks + (p − sinks) mod window``), so an
append overwrites the position that just left the window.
"""
from collections import namedtuple

import torch

# the exact attention of a step's hot rows: out [B, Hq, D] float32 = Σ exp(s − lse) · v,
# mass [B, Hq] float32 = Σ exp(s − lse), indices [B, Hq, H] int32 (their positions, -1 empty: a
# view of HotRows.held, valid until the next append)
HotPart = namedtuple("HotPart", "out mass indices")


class HotRows:
    """The device V of one layer's hot rows.

    v : Tensor [B, Hkv, H, D] on the device, H = sinks + window — slot ``j`` holds the position
        :meth:`positions` gives it; slots whose position is not (yet) valid hold zeros.
    held : Tensor [B, H] int32 on the device — the position each slot holds, -1 where none: what
        :meth:`positions` gives at the current length, kept up to date by the appends so that a
        decode step reads it instead of recomputing it (bookkeeping, like the cache's lengths:
        not counted in ``nbytes``).
    """

    def __init__(self, sinks, window, batch, num_kv_heads, head_dim, device, dtype):
        self.sinks, self.window = sinks, window
        self.size = sinks + window
        self.v = torch.zeros(batch, num_kv_heads, self.size, head_dim, dtype=dtype,
                             device=device)  # [B, Hkv, H, D]
        self.held = torch.full((batch, self.size), -1, dtype=torch.int32,
                               device=device)  # [B, H]
        self.nbytes = self.v.nbytes
        self._slots = torch.arange(self.size, device=device)  # [H]

    def positions(self, lens):
        """lens [B] int32 -> (pos [B, H] int64, the position each slot holds at length L_b,
        clamped to >= 0; valid [B, H] bool, that position is < L_b)."""
        L = lens.long()[:, None]  # [B, 1]
        j = self._slots[None, :]  # [1, H]
        sinks, window = self.sinks, max(self.window, 1)
        ring = j - sinks  # [1, H]: the ring slot of j >= sinks
        behind = L - 1 - sinks - ring  # [B, H]: how far the newest position of that ring slot lies
        newest = sinks + ring + window * torch.div(behind, window, rounding_mode="floor")  # [B, H]
        pos = torch.where(j < sinks, j, newest)  # [B, H]
        valid = (pos < L) & ((j < sinks) | (behind >= 0))  # [B, H]
        return pos.clamp(min=0), valid

    def store_prompt(self, v, lens):
        """Keep the hot rows of the prompt's v [B, Hkv, T, D] (right-padded, lens [B] int32)."""
        pos, valid = self.positions(lens)  # [B, H] each
        B, Hkv, T, D = v.shape
        if T == 0:  # an empty prompt: no slot holds a position
            self.v.zero_()
            self.held.fill_(-1)
            return
        rows = pos.clamp(max=T - 1)[:, None, :, None].expand(B, Hkv, self.size, D)  # [B,Hkv,H,D]
        hot = torch.gather(v, 2, rows)  # [B, Hkv, H, D]
        self.v.copy_(hot.masked_fill(~valid[:, None, :, None], 0))
        self.held.copy_(torch.where(valid, pos, -1))

    def append(self, rows, pos, v):
        """Keep one token's v [B, Hkv, D], stored at position pos[b] of each sequence ``rows``,
        in its slot (a position past the sinks with ``window = 0`` has none: nothing changes)."""
        if self.window:
            slot = torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.window)
            self.v[rows, :, slot] = v
            self.held[rows, slot] = pos.to(torch.int32)
        else:
            slot = pos.clamp(max=self.sinks - 1)  # [B]
            keep = pos < self.sinks  # [B]
            self.v[rows, :, slot] = torch.where(keep[:, None, None], v, self.v[rows, :, slot])
            self.held[rows, slot] = torch.where(keep, pos, self.held[rows, slot]).to(torch.int32)

    def attend(self, lse, all_scores):
        """The exact attention of the hot rows this step holds (:attr:`held`, its new token
        appended): lse [B, Hq] float32 (over all keys), all_scores [B, Hq, S] float32 (the step's
        every score, both from ``qk_topn``) -> :data:`HotPart`. The scores are the very ones
        ``lse`` was taken over, so the weights of the hot rows, the top N and the tail add up to 1
        however large the scores (recomputed from K they would differ by rounding, which
        ``exp(s − lse)`` turns into a relative error of the order of |s| · 1e-7)."""
        B, Hq = lse.shape
        _, Hkv, H, D = self.v.shape
        group = Hq // Hkv
        slots = self.held.clamp(min=0).long()[:, None, :].expand(B, Hq, H)  # [B, Hq, H]
        s = torch.gather(all_scores, 2, slots).view(B, Hkv, group, H)  # [B, Hkv, G, H]
        empty = (self.held < 0)[:, None, None, :]  # [B, 1, 1, H]
        p = torch.exp(s - lse.reshape(B, Hkv, group, 1)).masked_fill(empty, 0.0)  # [B,Hkv,G,H]
        out = torch.einsum("bkgj,bkjd->bkgd", p, self.v.float()).reshape(B, Hq, D)  # [B, Hq, D]
        indices = self.held[:, None, :].expand(B, Hq, H)  # [B, Hq, H] int32, -1 empty
        return HotPart(out, p.sum(-1).reshape(B, Hq), indices)
