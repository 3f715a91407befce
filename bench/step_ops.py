"""How many device ops one KCache decode step launches besides the library's kernels, and where
they come from. Each op that is not a view launches at least one kernel on a GPU, and a small
kernel costs about 1.5-2 µs in a CUDA graph whatever it does (the H200 profile of the default
step: 81 such kernels for 148 µs; bench/NOTES.md, "Decode step"), so their count is a number to
keep down that the CPU can measure.

One layer with the given options (the KCache flags of the command line; default
``KCacheOptions()``) on random data, one warm-up step,
then one ``KCache.decode`` under a dispatch mode that records every op; one line per line of
``kcache_ops/caches`` that issued ops (its ops in order), then the total.

    python bench/step_ops.py [--batch B] [--seq S] [--device cpu|cuda] [KCache flags, e.g.
                             --paper-literal, --reuse 512]
"""
import argparse
import collections
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import decode_steps
from kcache_ops.cli.args import add_kcache_arguments, kcache_options, positive_int

Hq, Hkv, D = 32, 8, 128  # the Llama-3-8B shape of bench/profile_step.py


class OpLog(TorchDispatchMode):
    """Records (call site in kcache_ops/caches, op name) for every op that is not a view."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            frames = [f for f in traceback.extract_stack() if "kcache_ops/caches" in f.filename]
            f = frames[-1] if frames else None
            site = f"{Path(f.filename).name}:{f.lineno} {f.name}" if f else "(outside the cache)"
            self.ops.append((site, func.name()))
        return func(*args, **(kwargs or {}))


def step_ops(B, S, device, options):
    """[(call site, op)] of one decode step of a one-layer KCache with ``options``."""
    q = torch.randn(B, Hq, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=torch.bfloat16)
    layer = decode_steps.DefaultLayer([(q, k, torch.randn_like(k))], options)
    with OpLog() as log:
        layer.cache.decode(*layer.inputs[0])
    return log.ops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=positive_int, default=2)
    ap.add_argument("--seq", type=positive_int, default=512)
    ap.add_argument("--device", default="cpu")
    add_kcache_arguments(ap)
    args = ap.parse_args()
    options = kcache_options(args)
    ops = step_ops(args.batch, args.seq, args.device, options)
    by_site = collections.defaultdict(list)
    for site, op in ops:
        by_site[site].append(op)
    for site, names in by_site.items():
        print(f"{len(names):3d}  {site:32s} {', '.join(names)}")
    library = sum(op.startswith("kcache_ops::") for _, op in ops)
    print(f"{len(ops):3d}  ops in one step ({library} of them kcache_ops kernels), "
          f"{options.label}, batch {args.batch}, {args.seq} tokens, {args.device}")


if __name__ == "__main__":
    main()
