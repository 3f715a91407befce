"""The physical ceilings a run measures in the same run as the thing measured (DESIGN.md §6), and
the floor they set on a decode step: the device-memory copy rate, the pinned host->device copy
rate on CUDA, the bytes a decode step must move, and the least time moving them takes.
bench/timing.py's GPU benchmarks measure their ceilings with the functions here too."""
import torch

from ..devices import median_seconds, sync
from ..ops import alloc_host

# bytes copied to measure each ceiling: far beyond L2 (50-60 MB on an H100/H200); on the CPU
# beyond a core's L2 and most L3 slices, and small enough that a smoke run stays fast
DEVICE_COPY_BYTES = {"cuda": 2 << 30, "cpu": 64 << 20}
H2D_COPY_BYTES = 1 << 30


def d2d_bandwidth_gbs(device="cuda", nbytes=None, warmup=3, runs=30):
    """Device memory ceiling: a large copy within ``device``'s memory (``nbytes``, default
    :data:`DEVICE_COPY_BYTES` of its type), bytes read + written per second in GB/s, the median
    of ``runs`` copies after ``warmup`` (between CUDA events on a GPU; on the CPU a host memcpy
    on the host clock)."""
    device = torch.device(device)
    nbytes = DEVICE_COPY_BYTES[device.type] if nbytes is None else nbytes
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()  # [nbytes]
    dst = torch.empty_like(src)  # [nbytes]
    for _ in range(warmup):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes / median_seconds(device, lambda: dst.copy_(src), runs) / 1e9


def h2d_bandwidth_gbs(device="cuda", nbytes=H2D_COPY_BYTES, warmup=2, runs=20):
    """Host->device ceiling: a large copy (``nbytes``) from pinned host memory to the CUDA
    ``device``, bytes per second in GB/s, the median of ``runs`` copies after ``warmup`` between
    CUDA events. The host buffer is filled from the device: no CPU arithmetic."""
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()  # [nbytes]
    # [nbytes], pinned host: alloc_host's, freed with the tensor (torch's pinned-memory cache
    # would keep the block for the rest of the run, outside the host budget)
    src = alloc_host((nbytes,), torch.uint8)
    src.copy_(dst)
    for _ in range(warmup):
        dst.copy_(src, non_blocking=True)
    sync(device)
    return nbytes / median_seconds(device, lambda: dst.copy_(src, non_blocking=True), runs) / 1e9


def measure_ceilings(device):
    """The ceilings of ``device`` -> {"device_copy_GBs": :func:`d2d_bandwidth_gbs`,
    "h2d_GBs": :func:`h2d_bandwidth_gbs` on CUDA, None on the CPU (no PCIe: KCache's "host" V
    is in the same RAM as the rest)}; the buffers are freed after."""
    device = torch.device(device)
    ceilings = {"device_copy_GBs": d2d_bandwidth_gbs(device, warmup=2, runs=10),
                "h2d_GBs": h2d_bandwidth_gbs(device) if device.type == "cuda" else None}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the copies' 5 GB: the cache budget is what is free after
    return ceilings


def describe(ceilings):
    """The ceilings measured (:func:`measure_ceilings`) in words, for the printed line and the
    report."""
    h2d = ceilings["h2d_GBs"]
    return (f"device memory copy {ceilings['device_copy_GBs']:.1f} GB/s (bytes read + written), "
            + (f"pinned host->device copy {h2d:.1f} GB/s" if h2d is not None
               else "no PCIe (on the CPU KCache's host V is in the same RAM)"))


def weight_bytes_per_step(config, batch, dtype):
    """Bytes of weights a decode step of ``batch`` tokens reads, each once, of a Llama of
    ``config`` in ``dtype``: every matrix, bias and norm of the layers, the final norm and the LM
    head; of an input embedding that is not the LM head only the ``batch`` rows looked up."""
    e, d = config.hidden_size, config.head_dim
    attention = e * d * (2 * config.num_heads + 2 * config.num_kv_heads)  # q, k, v, o
    if config.attention_bias:  # q, k and v's (Qwen2)
        attention += d * (config.num_heads + 2 * config.num_kv_heads)
    if config.output_bias:  # o's
        attention += e
    mlp = 3 * e * config.intermediate_size  # gate, up, down
    layers = config.num_layers * (attention + mlp + 2 * e)  # and the two norms
    embedding = 0 if config.tie_word_embeddings else batch * e
    values = layers + e + config.vocab_size * e + embedding  # final norm, LM head, rows looked up
    return values * dtype.itemsize


def weight_bytes(config, dtype):
    """Bytes of all the weights of a Llama of ``config`` in ``dtype`` (a step that looked up
    every row of the embedding would read them all)."""
    return weight_bytes_per_step(config, config.vocab_size, dtype)


def floor_seconds(device_bytes, pcie_bytes, ceilings):
    """The least time a decode step moving ``device_bytes`` in device memory and ``pcie_bytes``
    between host RAM and the device can take at the measured ``ceilings``
    (:func:`measure_ceilings`): on CUDA device_bytes / device copy rate + pcie_bytes / H2D rate,
    the two in sequence, not overlapped, as a KCache layer reads its V rows after scoring its K
    and the next layer waits for its output (a low-bit tail reads its copy on the device beside
    the host reads, so such a step may beat this floor by the lesser of the two); on the CPU,
    where both are the one RAM, their sum over the copy rate."""
    if ceilings["h2d_GBs"] is None:
        return (device_bytes + pcie_bytes) / (ceilings["device_copy_GBs"] * 1e9)
    return (device_bytes / (ceilings["device_copy_GBs"] * 1e9)
            + pcie_bytes / (ceilings["h2d_GBs"] * 1e9))
