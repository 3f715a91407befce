"""The memory check every cache makes before it allocates: its tensors against what the host
reports available and what the device has, so that a cache too large is refused with the bytes it
asked for, not killed by the host or failed deep in an allocator."""
import math

import torch

from ..ops import host_bytes_available


def check_memory(owner, shape, dtype, host_tensors, device, device_tensors):
    """Refuses ``host_tensors`` cache tensors of ``shape`` and ``dtype`` in host RAM that need
    more than the machine reports available (MemAvailable; alloc_host checks one tensor alone and
    torch.zeros on the CPU not at all), and ``device_tensors`` of them on a CUDA ``device`` that
    need more than its whole memory (MemoryError naming ``owner``, the cache)."""
    per_tensor = dtype.itemsize * math.prod(shape)
    available = host_bytes_available()  # bytes, or None where the machine does not report it
    needed = host_tensors * per_tensor
    if available is not None and needed > available:
        raise MemoryError(f"{owner}: {host_tensors} cache tensors of shape {list(shape)} {dtype} "
                          f"in host RAM need {needed} bytes, more than the {available} bytes the "
                          f"machine reports available (MemAvailable); lower the batch or the "
                          f"capacity")
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        needed = device_tensors * per_tensor
        if needed > total:
            raise MemoryError(f"{owner}: {device_tensors} cache tensors of shape {list(shape)} "
                              f"{dtype} on {device} need {needed} bytes, more than the "
                              f"{total} bytes the device has; lower the batch or the capacity")
