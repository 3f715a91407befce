"""A cache's second CUDA stream: the V hand-off of prefill, and a decode step's host reads beside
its device work.

``sparse_attn_v`` waits on PCIe (the top-N V rows, zero-copy from host RAM) and ``lowbit_tail``
on device memory (the low-bit copy of every other row); both need only the selection, so the
low-bit tail issues the first on this stream and the second on the current one, and joins them
before it adds the two parts (tail.py). On the CPU both run inline, in order.

Nothing here waits on the host: ``fork`` and ``join`` are stream waits, which a CUDA graph captures
as a fork and a join of its branches. The tensors made on the side stream and used after the join
are recorded on the current stream (``record_stream``), so the caching allocator does not hand
their memory to later side-stream work before the current stream has read them; the tensors the
side stream reads were made on the current stream, which frees them only after the join, but for
prefill's V, which the caller may drop before finish_prefill joins: the hand-off records it on the
side stream (kcache.py).
"""
import contextlib

import torch


class SideStream:
    """Work issued inside ``with side.fork():`` runs on a second stream of ``device`` (CUDA),
    after everything the current stream issued before and beside what it issues after, until
    ``side.join(...)`` makes the current stream wait for it. On a CPU device both are no-ops and
    :attr:`stream` is None."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def fork(self):
        """Run the block's work on the side stream, ordered after the current stream's."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield

    def join(self, *made_here):
        """The current stream waits for the work forked so far; ``made_here``: tensors that work
        made, now used on the current stream (None where it raised before making one)."""
        if self.stream is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in made_here:
            if t is not None:
                t.record_stream(current)
