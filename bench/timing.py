"""What the GPU benchmarks share: CUDA-event timing (warm-up, median, inputs rotated beyond L2), the
ceilings measured in the same run (device-to-device copy, pinned host-to-device copy), memory-fit
checks, one printed line per configuration, and the JSON + PNG written under bench/results/."""
import json
import os
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
L2_ROTATE_BYTES = 256 << 20  # rotate inputs until this many bytes are touched (L2 is 50 MB)


def rotations(bytes_per_set, max_sets=64):
    """How many input sets to rotate so that one round touches more than L2 holds."""
    return max(1, min(max_sets, -(-L2_ROTATE_BYTES // max(1, bytes_per_set))))


def time_us(fn, args_list, warmup=5, iters=30):
    """Median µs of fn(*args) over `iters` calls, rotating through args_list, each call between
    two CUDA events on the current stream (a call that does host work is timed whole: the start
    event fires at once on an idle device)."""
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(*args_list[i % len(args_list)])
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def d2d_bandwidth_gbs(nbytes=2 << 30):
    """Device memory ceiling: a large device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), [()], warmup=3, iters=10)
    return 2 * nbytes / us / 1e3


def h2d_bandwidth_gbs(nbytes=1 << 30):
    """Host->device ceiling: a large copy from pinned host memory."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    src.random_()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    us = time_us(lambda: dst.copy_(src, non_blocking=True), [()], warmup=2, iters=8)
    return nbytes / us / 1e3


def fits_on_device(nbytes, reserve=4 << 30):
    """True when nbytes more of device memory can be allocated, keeping `reserve` spare."""
    torch.cuda.empty_cache()
    return nbytes + reserve < torch.cuda.mem_get_info()[0]


def header(title):
    name = torch.cuda.get_device_name()
    print(f"# {title} on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    return name


def line(**fields):
    """One configuration as one printed line of key=value pairs; returns the fields."""
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in fields.items()), flush=True)
    return fields


def save(name, meta, rows, plot, xlabel, ylabel, hline):
    """bench/results/<name>.json and <name>.png: `plot(ax, rows)` draws the curves over a log2 x
    axis; hline = (y, label) marks the ceiling or target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    fig, ax = plt.subplots(figsize=(8, 5))
    plot(ax, rows)
    ax.axhline(hline[0], color="k", lw=1, ls="--", label=hline[1])
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{name} — {meta['gpu']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, name + ".png"), dpi=120)
    print(f"# wrote {os.path.join(RESULTS, name)}.json and .png")
