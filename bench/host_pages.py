"""Host buffers on transparent huge pages for the GPU to read, for the gather bench only.

On the H200 (2026-12-04) the decode step read the same rows 3x slower from 8 GiB of host V than
from 2 GiB (bench/NOTES.md), the mark of address translations that miss. alloc_host's memory
comes from cudaHostAlloc, on pages the driver chooses. A HugePageBuffer is anonymous memory
advised for 2 MiB pages (madvise MADV_HUGEPAGE), then page-locked and mapped for the GPU
(cudaHostRegister), so bench/gpu_gather.py can read the same rows from both and say whether
larger pages would help before alloc_host changes. The kernels take either: both are pinned,
device-mapped host memory.
"""
import mmap

import torch

HUGE_PAGE = 2 << 20  # bytes of a transparent huge page on x86-64
HOST_REGISTER_FLAGS = 0x1 | 0x2  # cudaHostRegisterPortable | cudaHostRegisterMapped


def meminfo_bytes(key, path="/proc/meminfo"):
    """The /proc/meminfo entry ``key`` (e.g. 'AnonHugePages') in bytes, or -1 where it is not
    reported."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == key:
                    return int(rest.split()[0]) * 1024
    except OSError:
        pass
    return -1


def thp_mode(path="/sys/kernel/mm/transparent_hugepage/enabled"):
    """The machine's transparent huge page mode ('always', 'madvise' or 'never': the bracketed
    word of ``path``), or 'unknown' where it is not readable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unknown"


class HugePageBuffer:
    """``nbytes`` of anonymous host memory advised for huge pages, 2 MiB-aligned: ``data`` is a
    uint8 CPU tensor [nbytes rounded up to 2 MiB] over it. register() page-locks it and maps it
    for the GPU; close() unregisters it. Views of ``data`` keep the memory alive, not registered.
    """

    def __init__(self, nbytes):
        if nbytes <= 0:
            raise ValueError(f"HugePageBuffer: nbytes must be positive, got {nbytes}")
        size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        # one page more than asked, so that the buffer can start on a 2 MiB boundary
        self._map = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._map.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(self._map, dtype=torch.uint8)  # [size + HUGE_PAGE]
        offset = -whole.data_ptr() % HUGE_PAGE
        self.data = whole[offset:offset + size]  # [size], 2 MiB-aligned
        self.registered = False

    def register(self):
        """cudaHostRegister (portable, mapped) of the whole buffer; its pages are faulted in and
        locked here. Raises RuntimeError with the CUDA error where that fails."""
        err = torch.cuda.cudart().cudaHostRegister(self.data.data_ptr(), self.data.numel(),
                                                   HOST_REGISTER_FLAGS)
        try:
            torch.cuda.check_error(int(err))  # CUDA's own message (the binding names no code)
        except torch.cuda.CudaError as e:
            raise RuntimeError(f"cudaHostRegister of {self.data.numel()} bytes failed: {e}") from e
        self.registered = True

    def close(self):
        """Unregisters the buffer (where registered): no kernel may read it after this. A
        failure raises here, not at the next launch that would find it as CUDA's last error."""
        if self.registered:
            self.registered = False
            torch.cuda.check_error(int(torch.cuda.cudart().cudaHostUnregister(
                self.data.data_ptr())))
