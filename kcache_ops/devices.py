"""Device helpers the commands and the measurements share: the dtypes by name, the default device,
a host sync and a median time for timing."""
import statistics
import time

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device():
    """CUDA where available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device):
    """Wait for the work queued on ``device`` (a no-op on the CPU: its ops are synchronous)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(device, step, runs):
    """The median seconds of ``runs`` calls of ``step()`` (DESIGN.md §6): each between two CUDA
    events on ``device``'s current stream (read after one sync at the end, so the calls queue as
    in a run), on the host clock on the CPU (whose ops are synchronous)."""
    if torch.device(device).type == "cuda":
        stream = torch.cuda.current_stream(device)  # not the current device's: cuda:N
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(runs)]
        for start, end in events:
            start.record(stream)
            step()
            end.record(stream)
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
