"""A KCache decode step with and without cross-step reuse (``KCacheOptions.reuse``), timed over
steps that advance, on any device: what ``kcache_ops.reuse_rows`` does to a step's time.

bench/gpu_decode_attn.py repeats one step, which a pool would answer from the device after the
first; here every step stores its token and moves on (``decode`` of each layer, then
``finish_decode``), as a model's decode does. Random K and V with the Llama-3-8B heads (32 / 8,
D = 128; bfloat16 on CUDA, float32 on the CPU). The queries drift around a fixed one
(``anchor + drift · noise``, fresh noise each step), so consecutive steps select overlapping rows
as a model's do (the embedded SmolLM2 found 87 % of its rows in a pool of 2·G·N,
bench/reuse_hits.py); each line says the hit rate this run got.

Per batch: the default options with reuse 0 and with each ``--pools`` multiple of G·N, on the
same prompt and the same queries; ``--warm`` steps, then ``--steps`` timed ones, each timed whole
(CUDA events around it; on the CPU the wall clock after it), the median over the steps divided by
the layers. The timed steps record nothing (``record_mass`` off: its counting ops would be timed);
an untimed replay of the same steps counts the rows. One line per configuration: µs per layer
step, the ratio to reuse 0's in this run, the hit rate, the host bytes a layer step moved (the
distinct rows each KV head's step read that the pool lacked, as the CUDA sparse_attn_v reads a
row several heads of a group chose once; with reuse 0 all of them, counted on a pool whose hits
are not taken, plus the new token's rows written) and on CUDA their time at the pinned
host->device copy rate measured in this run (the PCIe ceiling). The launches are eager: at small
batches Python, not the GPU, sets the time (the kernels' own times are bench/profile_step.py's to
measure). Writes reuse_step.json (after each configuration) to bench/results/ (the results
folder of kcache_ops.results) or --out.

    python bench/reuse_step.py [--device cuda] [--batch 1 8] [--context 32768] [--pools 2 4]
                               [--layers 4] [--steps 24] [--warm 8] [--drift 0.5] [--out DIR]
"""
import argparse
from dataclasses import replace
import os
import statistics
import time

import torch

from kcache_ops import results
from kcache_ops.caches import KCacheOptions, make_cache
from kcache_ops.cli.args import nonnegative_int, positive_int
from decode_steps import layers_config
import timing

Hq, Hkv, D = 32, 8, 128  # the Llama-3-8B shape of bench/profile_step.py


def seeded_steps(device, dtype, batch, context, layers, options, a):
    """A cache of ``options`` holding ``context - warm - steps`` random tokens, and the inputs of
    the steps that follow, the same for every configuration -> (cache, [(q [B, Hq, D], k, v
    [B, Hkv, D])] per step)."""
    torch.manual_seed(0)
    prompt = context - a.warm - a.steps
    anchor = torch.randn(batch, Hq, D, device=device)  # [B, Hq, D]
    config = layers_config(anchor, torch.empty(1, Hkv, 1, D), layers)
    cache = make_cache("kcache", config, batch, context, device, dtype, options)
    lens = torch.full((batch,), prompt, dtype=torch.int32, device=device)  # [B]
    for layer in range(layers):
        k, v = (torch.randn(batch, Hkv, prompt, D, device=device, dtype=dtype)
                for _ in range(2))  # [B, Hkv, T, D] each
        cache.store_prompt(layer, k, v, lens)
        del k, v
    cache.finish_prefill(lens)
    inputs = [((anchor + a.drift * torch.randn_like(anchor)).to(dtype),
               torch.randn(batch, Hkv, D, device=device, dtype=dtype),
               torch.randn(batch, Hkv, D, device=device, dtype=dtype))
              for _ in range(a.warm + a.steps)]
    return cache, inputs


def timed_steps(device, dtype, batch, context, layers, options, a):
    """Decode :func:`seeded_steps` on a cache of ``options`` -> median µs per layer step of the
    steps from ``warm`` on, recording nothing."""
    cache, inputs = seeded_steps(device, dtype, batch, context, layers, options, a)
    cuda = torch.device(device).type == "cuda"  # "cuda" or "cuda:1"
    marks = []  # per timed step: (start, end) events, or seconds
    for i, (q, k, v) in enumerate(inputs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for layer in range(layers):
            cache.decode(layer, q, k, v)
        cache.finish_decode()
        if cuda:
            end.record()
            if i >= a.warm:
                marks.append((start, end))
        elif i >= a.warm:
            marks.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
        us = [s.elapsed_time(e) * 1e3 for s, e in marks]
    else:
        us = [1e6 * s for s in marks]
    return statistics.median(us) / layers


def counted_steps(device, dtype, batch, context, layers, options, a):
    """Replay :func:`seeded_steps` untimed, recording from step ``warm`` on -> (hit rate or None
    without reuse, host bytes per layer step): the distinct rows per KV head the pool lacked and
    the new token's rows. Without reuse the rows are counted on a pool of G·N (the selection does
    not depend on it) and its hits are added back: every distinct row, as the CUDA sparse_attn_v
    reads them."""
    rows = Hq // Hkv * options.topn  # G·N, the smallest pool
    counting = options if options.reuse else replace(options, reuse=rows)
    cache, inputs = seeded_steps(device, dtype, batch, context, layers, counting, a)
    for i, (q, k, v) in enumerate(inputs):
        cache.record_mass = i >= a.warm
        for layer in range(layers):
            cache.decode(layer, q, k, v)
        cache.finish_decode()
    host = cache.reuse_host_bytes_per_step()
    if not options.reuse:
        return None, (host + cache.host_bytes_saved_per_step()) / layers
    return float(cache.reuse_hit_rate().mean()), host / layers


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=positive_int, default=32768)
    ap.add_argument("--pools", type=nonnegative_int, nargs="+", default=[2, 4],
                    help="pool sizes C as multiples of a step's rows G·N")
    ap.add_argument("--layers", type=positive_int, default=4)
    ap.add_argument("--steps", type=positive_int, default=24)
    ap.add_argument("--warm", type=nonnegative_int, default=8)
    ap.add_argument("--drift", type=float, default=0.5,
                    help="query noise per step (0.5: a hit rate near the model's)")
    ap.add_argument("--out", default=results.RESULTS_DIR,
                    help=f"folder of reuse_step.json (default {results.RESULTS_DIR})")
    ap.add_argument("--no-save", action="store_true", help="print only")
    a = ap.parse_args()
    hot = KCacheOptions().hot_rows  # kept on the device: a prompt of no more has no row to read
    if a.context <= a.warm + a.steps + hot:
        ap.error(f"--context must exceed --warm + --steps + the default hot rows "
                 f"({a.warm} + {a.steps} + {hot}), got {a.context}")
    cuda = torch.device(a.device).type == "cuda"  # "cuda" or "cuda:1"
    if cuda:  # the events, the ceiling's copy and the current stream: on the device named
        torch.cuda.set_device(torch.device(a.device))
    dtype = torch.bfloat16 if cuda else torch.float32
    pcie = timing.h2d_bandwidth_gbs() if cuda else None  # GB/s, this run's ceiling
    settings = {"dtype": str(dtype).removeprefix("torch."), "Hq": Hq, "Hkv": Hkv, "D": D,
                "context": a.context, "layers": a.layers, "steps": a.steps, "warm": a.warm,
                "drift": a.drift, "h2d_gbs": pcie}
    print(f"{a.device}, {dtype}, {Hq}/{Hkv} heads, D {D}, {a.context} tokens, {a.layers} layers, "
          f"median of {a.steps} steps" + (f", pinned H2D {pcie:.1f} GB/s" if cuda else ""))
    print("host KiB: a layer step's distinct rows per KV head not in the pool (C = 0: all) and "
          "the new token's")
    print(f"{'B':>4} {'C':>5} {'µs/layer':>9} {'vs C=0':>7} {'hit rate':>9} {'host KiB':>9}"
          + (f" {'PCIe µs':>8}" if cuda else ""))
    step_rows = Hq // Hkv * KCacheOptions().topn  # G·N: a step's rows per KV head
    rows = []
    for batch in a.batch:
        base = None
        for times in [0, *a.pools]:
            options = replace(KCacheOptions(), reuse=times * step_rows)
            run = (a.device, dtype, batch, a.context, a.layers, options, a)
            us = timed_steps(*run)
            rate, host = counted_steps(*run)
            base = us if base is None else base
            hit = "–" if rate is None else f"{rate:.3f}"
            line = (f"{batch:>4} {options.reuse:>5} {us:9.1f} {us / base:7.2f} {hit:>9} "
                    f"{host / 1024:9.1f}")
            print(line + (f" {host / pcie / 1e3:8.1f}" if cuda else ""), flush=True)
            rows.append({"B": batch, "C": options.reuse, "us_per_layer": round(us, 2),
                         "vs_c0": round(us / base, 3), "hit_rate": rate and round(rate, 4),
                         "host_bytes_per_layer": round(host),
                         "pcie_us": round(host / pcie / 1e3, 2) if cuda else None})
            if not a.no_save:  # after each configuration: a run cut short keeps them
                results.write_json(os.path.join(a.out, "reuse_step.json"),
                                   {"machine": results.machine(a.device),
                                    "settings": settings, "rows": rows})

if __name__ == "__main__":
    main()
