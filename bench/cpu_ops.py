"""CPU speed of the ops and of a layer's decode step against the PyTorch way (bench/baselines.py),
with the bandwidth of the bytes each must read as a fraction of a memory-copy bandwidth measured
in the same run. One line per configuration and row:

* ``qk_topn``, and ``decode`` (the paper's step, qk_topn + sparse_attn_v): against matmul +
  logsumexp + topk (+ index + softmax + matmul); the bytes are K's.
* ``tail``: lowbit_tail over the default step's selection and 2-bit copy (the hot rows aside),
  against weighing, dequantising the rows a chunk at a time and a matmul; the bytes are the
  scores, codes and meta.
* ``default``: the default layer step (``KCache.decode``, ``KCacheOptions()``: qk_topn, the
  2-bit tail, sparse_attn_v over host V, the hot rows), against dense attention over K and V
  (SDPA); the bytes are the layer's device bytes (K, the 2-bit copy, the hot rows).

    python bench/cpu_ops.py [--batch 1 4 8] [--tokens 4096 16384 32768] [--runs 7] [--out DIR]
                            [--rotate-mib MIB]

Prints one line per configuration; writes cpu_ops.json (after each configuration) and cpu_ops.md
to bench/results/ (the results folder of kcache_ops.results) or --out.
"""
import argparse
import glob
import itertools
import math
import os

import torch

import kcache_ops
from kcache_ops import results
from kcache_ops.cli.args import positive_int
from kcache_ops.devices import median_seconds
from kcache_ops.throughput.ceilings import d2d_bandwidth_gbs

import baselines
import decode_steps

HQ, HKV, D, N = 32, 8, 128, 64
COPY_BYTES = 1 << 30  # the memory-copy ceiling's copy (2 GiB touched), beyond the L3
SYSFS_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}  # of a cache's size, e.g. "491520K"


def last_level_cache_bytes():
    """The size of CPU 0's largest cache as Linux's sysfs gives it (a VM may see its host's whole
    shared L3: 480 MiB on a 2-core Xeon VM here); 0 where it gives none."""
    sizes = [0]
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as f:
                size = f.read().strip()  # e.g. "491520K"
        except OSError:  # a file the sandbox or the kernel will not give
            continue
        if size[:-1].isdigit() and size[-1] in SYSFS_UNITS:
            sizes.append(int(size[:-1]) * SYSFS_UNITS[size[-1]])
    return max(sizes)


def rotate_bytes():
    """The bytes a configuration's inputs rotate over, so that each is read from memory, not from
    the last-level cache: twice that cache, and at least 256 MiB."""
    return max(256 << 20, 2 * last_level_cache_bytes())


def kcache_decode(q, k_cache, v_cache, seq_lens, n, scale):
    scores, indices, lse = kcache_ops.qk_topn(q, k_cache, seq_lens, n, scale)
    return kcache_ops.sparse_attn_v(scores, indices, v_cache, lse)


def kcache_tail(scores, seq_lens, lse, indices, codes, meta, bits, skip):
    """lowbit_tail as the default step calls it, the hot rows aside."""
    return kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, codes, meta, bits,
                                  check_values=False, skip_first=skip[0], skip_last=skip[1])


def median_ms(fn, inputs, runs, warmup=2):
    """Median wall time of fn(*inputs[i % len(inputs)]) in ms, after warm-up: the timed runs go on
    from the input after the warm-up's last (not one it just left in the cache)."""
    rotation = itertools.cycle(inputs)
    for _ in range(warmup):
        fn(*next(rotation))
    return 1e3 * median_seconds("cpu", lambda: fn(*next(rotation)), runs)


def bench_config(B, S, dtype, runs, rotate):
    """One configuration's rows (the module's docstring), ours against the PyTorch way, and the
    copy bandwidth measured right before (it drifts with the neighbours of a shared host); the
    inputs rotate over at least ``rotate`` bytes."""
    copy = d2d_bandwidth_gbs("cpu", nbytes=COPY_BYTES, runs=runs)
    scale = 1 / math.sqrt(D)
    k_bytes = B * HKV * S * D * dtype.itemsize
    copies = max(1, math.ceil(rotate / (2 * k_bytes)))
    inputs = [(torch.randn(B, HQ, D).to(dtype), torch.randn(B, HKV, S, D).to(dtype),
               torch.randn(B, HKV, S, D).to(dtype), torch.full((B,), S, dtype=torch.int32))
              for _ in range(copies)]
    qk_inputs = [(q, k, lens, N, scale) for q, k, _, lens in inputs]
    dec_inputs = [(q, k, v, lens, N, scale) for q, k, v, lens in inputs]
    layer = decode_steps.DefaultLayer([(q, k, v) for q, k, v, _ in inputs])  # a layer a set
    tail = [layer.tail_args(i, q)[:8] for i, (q, _, _, _) in enumerate(inputs)]
    codes, meta = tail[0][4:6]
    tail_bytes = B * HQ * S * 4 + codes.numel() + meta.numel() * meta.element_size()
    # the tail reads about a tenth of K: copies of its inputs rotate past the L3 as K's do
    tail_inputs = [tuple(x.clone() if torch.is_tensor(x) else x for x in tail[i % len(tail)])
                   for i in range(max(1, math.ceil(rotate / tail_bytes)))]
    rows = []
    for what, ours, base, args, nbytes in (
            ("qk_topn", kcache_ops.qk_topn, baselines.torch_qk_topn, qk_inputs, k_bytes),
            ("decode", kcache_decode, baselines.torch_decode, dec_inputs, k_bytes),
            ("tail", kcache_tail, baselines.torch_lowbit_tail, tail_inputs, tail_bytes),
            ("default", layer.cache.decode, None, layer.inputs,
             decode_steps.default_layer_bytes(B, HQ, HKV, S, D, dtype))):
        ms = median_ms(ours, args, runs)
        base_ms = (median_ms(baselines.dense_attention, [x[:3] for x in inputs], runs)
                   if base is None else median_ms(base, args, runs))
        gbps = nbytes / ms / 1e6
        rows.append({"op": what, "B": B, "S": S, "Hq": HQ, "Hkv": HKV, "D": D, "N": N,
                     "dtype": str(dtype).removeprefix("torch."), "ms": round(ms, 3),
                     "torch_ms": round(base_ms, 3), "mib": round(nbytes / 2**20, 1),
                     "gbps": round(gbps, 2), "copy_gbps": round(copy, 1),
                     "pct_copy": round(100 * gbps / copy, 1), "speedup": round(base_ms / ms, 2)})
    return rows


def line(r):
    return (f"{r['op']:8s} B={r['B']} S={r['S']:<6d} Hq={r['Hq']} Hkv={r['Hkv']} D={r['D']} "
            f"N={r['N']} {r['dtype']:9s} {r['ms']:9.3f} ms  {r['mib']:7.1f} MiB {r['gbps']:6.2f} "
            f"GB/s ({r['pct_copy']:5.1f}% of copy {r['copy_gbps']:5.1f})  "
            f"torch {r['torch_ms']:9.3f} ms  speedup {r['speedup']:5.2f}x")


def markdown(info, rows):
    out = [results.ran_on(info, f" ({info['capability']}). Hq={HQ}, "
                          f"Hkv={HKV}, D={D}, N={N}. Copy: a 1 GiB tensor copy (read + write) "
                          f"right before each configuration. Inputs rotate over "
                          f"{info['rotate_bytes'] >> 20} MiB."), "",
           "Rows: qk_topn and decode (the paper's step) read K; tail (lowbit_tail) the scores, "
           "the 2-bit codes and their meta (float32 scores and the same copy whatever the "
           "dtype); default (the default layer step, KCache.decode) the layer's device bytes. "
           "torch: the PyTorch way of each (bench/baselines.py), dense attention (SDPA) for the "
           "default step.", "",
           "| op | B | S | dtype | ms | MiB read | GB/s | copy GB/s | % of copy | torch ms | "
           "speedup |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['op']} | {r['B']} | {r['S']} | {r['dtype']} | {r['ms']:.3f} | "
            f"{r['mib']:.1f} | {r['gbps']:.2f} | {r['copy_gbps']:.1f} | {r['pct_copy']:.1f} | "
            f"{r['torch_ms']:.3f} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--runs", type=positive_int, default=7)
    parser.add_argument("--out", default=results.RESULTS_DIR,
                        help=f"folder of cpu_ops.json and .md (default {results.RESULTS_DIR})")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--rotate-mib", type=positive_int, default=None,
                        help="MiB of inputs each configuration rotates over (default: twice the "
                             "last-level cache, at least 256; less lets caches serve the reads)")
    args = parser.parse_args()
    torch.manual_seed(0)
    info = {**results.machine("cpu"), "capability": torch.backends.cpu.get_cpu_capability(),
            "rotate_bytes": rotate_bytes() if args.rotate_mib is None else args.rotate_mib << 20}
    print(results.ran_on(info, "; copy = GB/s of a 1 GiB copy (read + write) before each line"))
    rows = []
    for dtype in (getattr(torch, d) for d in args.dtypes):
        for S in args.tokens:
            for B in args.batch:
                for r in bench_config(B, S, dtype, args.runs, info["rotate_bytes"]):
                    print(line(r), flush=True)
                    rows.append(r)
                if not args.no_save:  # after each configuration: a run cut short keeps them
                    results.write_json(os.path.join(args.out, "cpu_ops.json"),
                                       {"machine": info, "rows": rows})
    if not args.no_save:
        with open(os.path.join(args.out, "cpu_ops.md"), "w", encoding="utf-8") as f:
            f.write(markdown(info, rows))


if __name__ == "__main__":
    main()
