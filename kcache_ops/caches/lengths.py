"""Tokens cached per sequence, the bookkeeping every cache shares: the lengths on the device, their
maximum mirrored on the host (so no decode step syncs to check the capacity), and the capacity
checks."""
import torch


class SeqLengths:
    """Lengths of ``batch`` sequences in a cache of ``capacity`` tokens each, on ``device``.

    Attributes
    ----------
    seq_lens : Tensor [B] int32 on ``device``
        Tokens cached per sequence.
    attend_lens : Tensor [B] int32 on ``device``
        ``seq_lens + 1``: the keys a decode step attends over (its new token included).
    positions : Tensor [B] long on ``device``
        ``seq_lens`` as int64: where a decode step stores its token (an index for every layer's
        appends, converted once per step, not once per layer).
    rows : Tensor [B] long on ``device``
        ``0..B-1``, the batch index of a decode step's appends.
    longest : int
        ``max(seq_lens)``, kept on the host.
    """

    def __init__(self, owner, batch, capacity, device):
        if capacity < 1 or batch < 1:
            raise ValueError(f"{owner}: batch and capacity must be >= 1, got {batch} and "
                             f"{capacity}")
        self.owner = owner  # the cache's name, for errors
        self.capacity = capacity
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)  # [B]
        self.attend_lens = self.seq_lens + 1  # [B] int32
        self.positions = self.seq_lens.long()  # [B]
        self.rows = torch.arange(batch, device=device)  # [B]
        self.longest = 0
        self.prompt_len = 0

    def store_prompt(self, batch, length):
        """A prompt of ``batch`` sequences of ``length`` tokens (right-padded) is being stored:
        check it is one per cached sequence (torch would broadcast a batch of 1) and fits."""
        if batch != self.seq_lens.shape[0]:
            raise ValueError(f"{self.owner}: a prompt of batch {batch} for a cache of "
                             f"{self.seq_lens.shape[0]} sequences")
        if length > self.capacity:
            raise ValueError(f"{self.owner}: capacity overflow: a prompt of {length} tokens "
                             f"exceeds the cache capacity ({self.capacity} tokens)")
        self.prompt_len = length

    def finish_prefill(self, lens):
        """``seq_lens = lens`` ([B] int32 on the device, each in [0, the stored prompt's length]).

        The one place the lengths are checked (one host sync, at prefill): the decode steps trust
        them (KCache passes ``check_values=False`` to the ops)."""
        if lens.shape != self.seq_lens.shape:
            raise ValueError(f"{self.owner}: lens must have shape {list(self.seq_lens.shape)} "
                             f"(one per cached sequence), got {list(lens.shape)}")
        shortest, longest = torch.stack(torch.aminmax(lens)).tolist()
        if shortest < 0:
            raise ValueError(f"{self.owner}: lens must be >= 0, got {shortest}")
        if longest > self.prompt_len:
            raise ValueError(f"{self.owner}: lens reach {longest} tokens but the prompt had "
                             f"{self.prompt_len}")
        self.seq_lens.copy_(lens)
        self._set(longest)

    def check_room(self):
        """Before a decode step: every sequence can take one more token."""
        if self.longest >= self.capacity:
            raise ValueError(f"{self.owner}: capacity overflow: a sequence of {self.longest} "
                             f"tokens cannot grow past the capacity of {self.capacity} tokens "
                             "(cache full)")

    def finish_decode(self):
        """After a decode step: ``seq_lens += 1``."""
        self.seq_lens += 1
        self._set(self.longest + 1)

    def _set(self, longest):
        """The host's maximum, and the device tensors that follow seq_lens, updated in place (one
        address each, so that a CUDA graph of decode steps reads their current values)."""
        self.longest = longest
        torch.add(self.seq_lens, 1, out=self.attend_lens)
        self.positions.copy_(self.seq_lens)
