"""Device helpers the loaders, the commands and the measurements share: the dtypes by name, the
default device and the check of a given one, a host sync, a step captured in a CUDA graph and a
median time for timing."""
import statistics
import time

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device():
    """CUDA where available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cuda_count():
    """The CUDA devices torch can use on this machine (0 where it has no CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device, owner="load_model") -> torch.device:
    """``device`` (a str, torch.device or index) as a torch.device the model can be put on, checked
    before any file is read; ValueError naming it if torch does not parse it, if it is ``meta``
    (which holds no weights to run) or a CUDA device this machine does not have (torch would
    say so only after the weights were read); ``owner``, the loader asking, begins its
    message."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{owner}: device must be a torch device such as 'cpu', 'cuda' or "
                         f"'cuda:1', got {device!r} ({e})") from e
    if parsed.type == "meta":
        raise ValueError(f"{owner}: device 'meta' holds no weights to run; pass 'cpu' or "
                         f"'cuda'")
    if parsed.type == "cuda":
        count = cuda_count()
        if (parsed.index or 0) >= count:
            raise ValueError(f"{owner}: device {device!r} is not on this machine: torch "
                             f"{torch.__version__} can use {count} CUDA device(s) here")
    return parsed


def sync(device):
    """Wait for the work queued on ``device`` (a no-op on the CPU: its ops are synchronous)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def graphed(step, device):
    """``step`` (a call with no arguments that keeps its tensors' addresses) run once as a
    warm-up on a side stream, then captured once in a CUDA graph on the CUDA ``device`` -> (the
    graph, what the captured call returned: its outputs, rewritten in place by each
    ``graph.replay()``). The capture runs only the step's host side: host counters the step keeps
    stand one step ahead of the device's after it, and a replay repeats none of the step's host
    checks or choices (a cache's capacity check, its unfinished-prefill check, ``record_mass``):
    the caller keeps replays within the cache's capacity, after its prefill has finished. A step
    that cannot be captured (a host read or sync inside it) is a RuntimeError saying why; one
    that runs out of device memory while captured, torch.OutOfMemoryError, as when run eagerly."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()  # the warm-up torch.cuda.graphs asks for
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:  # captured on ``device``'s side stream: torch's default capture stream is made once,
            # on the device current at the process's first capture, whatever device comes after
            with torch.cuda.graph(graph, stream=side):
                outputs = step()
        except RuntimeError as e:  # a failure inside the capture surfaces as the capture's end
            cause = e.__context__ if e.__context__ is not None else e
            if isinstance(cause, torch.OutOfMemoryError) or "out of memory" in str(cause):
                raise torch.OutOfMemoryError(str(cause).splitlines()[0]) from e
            raise RuntimeError("the step could not be captured in a CUDA graph (a host read or "
                               f"sync inside it?): {str(cause).splitlines()[0]}") from e
    return graph, outputs


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
