"""The memory check every cache makes before it allocates: its tensors against what the host
reports available and what the device has, so that a cache too large is refused with the bytes it
asked for, not killed by the host or failed deep in an allocator."""
import math

import torch

from ..ops import host_bytes_available


def check_memory(owner, shape, dtype, host_tensors, device, device_tensors, beside=0):
    """Refuses ``host_tensors`` cache tensors of ``shape`` and ``dtype`` in host RAM that need
    more than the machine reports available (MemAvailable; alloc_host checks one tensor alone and
    torch.zeros on the CPU not at all), and ``device_tensors`` of them on a CUDA ``device`` that
    need more than its whole memory (MemoryError naming ``owner``, the cache). ``beside``: the
    bytes of the smaller tensors the cache keeps on ``device`` beside them (KCache's tails, hot
    rows and reuse pools), counted with the host's on a CPU device and with the device's else."""
    per_tensor = dtype.itemsize * math.prod(shape)
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    available = host_bytes_available()  # bytes, or None where the machine does not report it
    needed = host_tensors * per_tensor + (beside if on_cpu else 0)
    if available is not None and needed > available:
        raise MemoryError(f"{owner}: {_what(host_tensors, shape, dtype, beside if on_cpu else 0)} "
                          f"in host RAM need {needed} bytes, more than the {available} bytes the "
                          f"machine reports available (MemAvailable); lower the batch or the "
                          f"capacity")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        needed = device_tensors * per_tensor + beside
        if needed > total:
            raise MemoryError(f"{owner}: {_what(device_tensors, shape, dtype, beside)} on "
                              f"{device} need {needed} bytes, more than the {total} bytes the "
                              f"device has; lower the batch or the capacity")


def _what(tensors, shape, dtype, beside):
    """The tensors a check counts, for its message."""
    what = f"{tensors} cache tensors of shape {list(shape)} {dtype}"
    return f"{what} and {beside} bytes beside them" if beside else what
