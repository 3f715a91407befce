"""What the GPU benchmarks share: CUDA-event timing (warm-up, median, inputs rotated beyond L2, the
calls captured in a CUDA graph where they can be), the ceilings measured in the same run
(device-to-device copy, pinned host-to-device copy: :mod:`kcache_ops.throughput.ceilings`'s, which
the bench command measures too), pinned host buffers filled from the GPU,
memory-fit checks, and :class:`Recorder`, which prints one line per configuration and rewrites
the benchmark's JSON after each one (the machine description and the folder come from
:mod:`kcache_ops.results`)."""
import argparse
import contextlib
import os
import statistics
import time

import torch

import kcache_ops
from kcache_ops import results
from kcache_ops.cli.args import positive_int
# the ceilings, on "cuda" by default: the benchmarks' ``timing.d2d_bandwidth_gbs()`` and
# ``timing.h2d_bandwidth_gbs()``
from kcache_ops.throughput.ceilings import d2d_bandwidth_gbs, h2d_bandwidth_gbs  # noqa: F401

L2_ROTATE_BYTES = 256 << 20  # rotate inputs until this many bytes are touched (L2 is 50-60 MB)
GRAPH_CALLS = 8  # at least this many calls in one captured graph


def rotations(bytes_per_set, max_sets=64):
    """How many input sets to rotate so that one round touches more than L2 holds."""
    return max(1, min(max_sets, -(-L2_ROTATE_BYTES // max(1, bytes_per_set))))


def _eager_us(fn, args_list, warmup, iters):
    """Median µs of fn(*args) launched from Python, each call between two CUDA events (a call that
    does host work is timed whole: the start event fires at once on an idle device). The timed
    calls go on from the input after the warm-up's last (not one it just left in L2)."""
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(*args_list[(warmup + i) % len(args_list)])
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def _graph_us(fn, args_list, warmup, iters):
    """Median µs per call of a CUDA graph holding fn(*args) once per input set (at least
    GRAPH_CALLS calls), replayed `iters` times: no Python or launch gaps between the calls, as in a
    captured decode step. Raises RuntimeError where fn cannot be captured (it syncs the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (lazy init, library handles)
        for i in range(warmup):
            fn(*args_list[i % len(args_list)])
    torch.cuda.current_stream().wait_stream(side)
    calls = len(args_list) * -(-GRAPH_CALLS // len(args_list))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*args_list[i % len(args_list)])
    us = _eager_us(graph.replay, [()], 2, iters) / calls
    del graph
    torch.cuda.empty_cache()
    return us


def time_us(fn, args_list, warmup=5, iters=20, graph=True):
    """Median µs of one call fn(*args), rotating through args_list -> (µs, "graph" | "eager").

    With ``graph`` the calls are captured into a CUDA graph and replayed (a short op is otherwise
    launch-bound and measures Python); where capture fails the calls are timed as launched.
    """
    if graph:
        try:
            return _graph_us(fn, args_list, warmup, iters), "graph"
        except RuntimeError as e:
            torch.cuda.synchronize()
            print(f"# graph capture failed, timing launches: {str(e).splitlines()[0]}")
    return _eager_us(fn, args_list, warmup, iters), "eager"


def host_random(shape, dtype, write_combined=False, block_values=64 << 20):
    """Pinned, device-mapped host tensor of ``shape`` (kcache_ops.alloc_host; write-combined when
    asked) holding one random block made on the GPU, repeated: a device->host copy per block and
    no CPU arithmetic, so gigabytes fill in a fraction of a second. Never zeros."""
    with environ(KCACHE_OPS_HOST_ALLOC_WC="1" if write_combined else "0"):
        buf = kcache_ops.alloc_host(tuple(shape), dtype)
    return fill_random(buf, block_values)


@contextlib.contextmanager
def environ(**values):
    """The environment variables ``values`` set for the block, each restored (or removed) after."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def host_read_spread(on):
    """The kernels' plans with the spread of small host reads over the multiprocessors on or off
    for every op (KCACHE_OPS_HOST_READ_SPREAD=1 or 0; by default gather_rows spreads and
    sparse_attn_v does not, launch_grid.h), for a timing beside the default one: the plan is fixed
    when a call is captured."""
    return environ(KCACHE_OPS_HOST_READ_SPREAD="1" if on else "0")


def fill_random(buf, block_values=64 << 20):
    """Fills the contiguous pinned host tensor ``buf`` with one random block made on the GPU,
    repeated (never zeros), and returns it."""
    flat = buf.view(-1)
    count = min(flat.numel(), block_values)
    if buf.dtype.is_floating_point:
        block = torch.randn(count, device="cuda").to(buf.dtype)  # [count]
    else:
        block = torch.randint(1, 100, (count,), device="cuda").to(buf.dtype)
    for start in range(0, flat.numel(), count):
        end = min(flat.numel(), start + count)
        flat[start:end].copy_(block[: end - start])
    return buf


def fits_on_device(nbytes, reserve=4 << 30):
    """True when nbytes more of device memory can be allocated, keeping `reserve` spare."""
    torch.cuda.empty_cache()
    return nbytes + reserve < torch.cuda.mem_get_info()[0]


class Recorder:
    """The rows of one benchmark: each printed as one line of key=value pairs and added to
    ``<out>/<name>.json`` = {"meta": machine description (kcache_ops.results.machine) and the
    benchmark's ceilings and settings, "complete": bool, "rows": [...]}, rewritten after every
    configuration (a run cut off at its time limit keeps what finished; "complete" turns true in
    :meth:`done`, which :meth:`finish` calls)."""

    def __init__(self, name, out, title, **meta):
        self.name, self.out = name, out
        self.meta = {**results.machine("cuda"), **meta}  # the machine, then ceilings and settings
        self.rows = []
        print(f"# {title}: {results.ran_on(self.meta)}, {time.strftime('%Y-%m-%d %H:%M')}")

    def _write(self, complete):
        results.write_json(os.path.join(self.out, self.name + ".json"),
                           {"meta": self.meta, "complete": complete, "rows": self.rows})

    def add(self, **fields):
        """Print and record one configuration; returns the fields."""
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in fields.items()), flush=True)
        self.rows.append(fields)
        self._write(False)
        return fields

    def done(self):
        """Mark the JSON complete (every configuration ran)."""
        self._write(True)

    def finish(self, plot, xlabel, ylabel, hline):
        """Mark the JSON complete and draw ``<out>/<name>.png``: ``plot(ax, rows)`` draws the
        curves over a log2 x axis; hline = (y, label) marks the ceiling or target."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        self.done()
        fig, ax = plt.subplots(figsize=(8, 5))
        plot(ax, self.rows)
        ax.axhline(hline[0], color="k", lw=1, ls="--", label=hline[1])
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{self.name} — {self.meta['gpu']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(self.out, self.name)
        fig.savefig(path + ".png", dpi=120)
        plt.close(fig)
        print(f"# wrote {path}.json and .png")


def int_pair(text, form):
    """'AxB' -> (A, B), both integers >= 1; argparse.ArgumentTypeError "<form>, got 'text'"
    otherwise (``form`` says what the pair is, with an example)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 2:
            return positive_int(parts[0]), positive_int(parts[1])
    except (ValueError, argparse.ArgumentTypeError):
        pass
    raise argparse.ArgumentTypeError(f"{form}, got {text!r}")


def add_common_arguments(parser):
    """--out (results folder) and --dry-run (print the plan, touch no GPU) for every benchmark."""
    parser.add_argument("--out", default=results.RESULTS_DIR,
                        help=f"folder of the JSON and plot (default {results.RESULTS_DIR})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the configurations and their device memory, run nothing on "
                             "a GPU")


def require_gpu(parser):
    """A benchmark's real run on a machine where torch sees no CUDA device: the parser's usage
    error (exit status 2) saying what runs where, not torch's traceback from the first tensor."""
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU, and torch sees none: --dry-run prints its "
                     "plan anywhere; bash bench/run_gpu.sh runs it on a GPU machine")


def plan(name, configs):
    """The dry run of a benchmark: one line per configuration (dicts with a "bytes" entry, the
    device memory it needs)."""
    print(f"# {name}: {len(configs)} configurations (dry run, no GPU work)")
    for c in configs:
        print("  " + "  ".join(f"{k}={v / 2**30:.2f}GiB" if k == "bytes" else f"{k}={v}"
                               for k, v in c.items()))
