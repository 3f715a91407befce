"""A second CUDA stream per device, so that a decode step's host reads overlap its device work.

``sparse_attn_v`` waits on PCIe (the top-N V rows, zero-copy from host RAM) and ``lowbit_tail``
on device memory (the low-bit copy of every other row); both need only the selection, so the
low-bit tail issues the first on this stream and the second on the current one, and joins them
before it adds the two parts (tail.py). On the CPU both run inline, in order.

Nothing here waits on the host: ``fork`` and ``join`` are stream waits, which a CUDA graph captures
as a fork and a join of its branches. The tensors that cross the streams need no
``record_stream``: the current stream waits for the side stream (``join``) before anything it
issues later, so memory it frees is reused only after the side stream's reads, and the side
stream's output is reused by the next ``fork``'s work only, which waits for the current stream.
"""
import contextlib
import functools

import torch


class SideStream:
    """Work issued inside ``with side.fork():`` runs on a second stream of ``device``, after
    everything the current stream issued before and beside what it issues after, until
    ``side.join()`` makes the current stream wait for it. On a CPU device both are no-ops."""

    def __init__(self, device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def fork(self):
        """Run the block's work on the side stream (CUDA), ordered after the current stream's."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield

    def join(self):
        """The current stream waits for the work forked so far."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


@functools.lru_cache(maxsize=None)
def _side_stream(device):
    return SideStream(device)


def side_stream(device):
    """The process's side stream of ``device`` (one per device, shared by every cache layer)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _side_stream(device)
