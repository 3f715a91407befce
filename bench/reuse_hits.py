"""What KCache's cross-step reuse (``KCacheOptions.reuse``) finds on the device, on the real model.

bench/step_reuse.py measured, before reuse was built, how many of a step's host V reads the steps
just before had read. This runs the cache that now keeps those rows (kcache_ops/caches/reuse.py):
the embedded SmolLM2 prefills the eval's essay window and decodes its next ``--queries`` tokens
(teacher-forced), with the paper's selection (per head, top N, no tail, no top_p) over the cold
rows (4 sinks and the last 60 on the device, as step_reuse.py leaves them out) and a pool of C
rows per KV head, C = ``--pools`` times the most rows a step reads (G·N). The cache counts, from
step ``--warm`` on (the pool filled, as step_reuse.py counts from step W), the distinct rows each
step reads per KV head and those it found in the pool. Reported per N and C (C = 0: no reuse,
the baseline of the same run): the hit rate (the mean of the layers'), the host bytes a step
saved (every layer, float32 rows), the device memory the pool holds as a share of K's at that
length, the median wall time of a decode step on this CPU (where host RAM is the device's, so
reuse saves nothing and its lookup costs what it costs) and whether every step's logits equal
the baseline's to the bit (they must).

    python bench/reuse_hits.py [--length short|long|both] [--n 8 64] [--pools 0 1 2 4]
                                                        (~1 min short, ~4 min both, two cores)
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
from kcache_ops.model import load_model

from head_overlap import add_text_arguments, prompt_ids


def teacher_forced(model, ids, queries, warm, options, record):
    """Prefill ids[:-queries], decode the rest (teacher-forced) on a KCache with ``options``,
    recording from step ``warm`` on where ``record`` -> (cache, logits [queries, 1, V], ms of
    each step)."""
    cache = make_cache("kcache", model.config, 1, len(ids), "cpu", torch.float32, options)
    prompt = torch.tensor([ids[:-queries]])  # [1, T]
    logits, ms = [], []
    with torch.no_grad():
        model.prefill(prompt, torch.tensor([prompt.shape[1]], dtype=torch.int32), cache)
        for i, token in enumerate(ids[-queries:]):
            cache.record_mass = record and i >= warm
            start = time.perf_counter()
            logits.append(model.decode(torch.tensor([token]), cache))  # [1, V]
            ms.append(1e3 * (time.perf_counter() - start))
    return cache, torch.stack(logits), ms


def hit_rate(model, ids, queries, warm, options):
    """The steps of :func:`teacher_forced` counted from step ``warm`` on, then timed in a pass that
    records nothing -> (hit rate, the mean of the layers', host bytes saved per step, the pool's
    bytes / K's bytes, median ms of a step from ``warm`` on, logits [queries, 1, V] of each
    pass)."""
    cache, counted, _ = teacher_forced(model, ids, queries, warm, options, record=True)
    k_bytes = sum(k.nbytes for k in cache.k)
    pool = sum(r.nbytes for r in cache.reuse.values())
    rate = float(cache.reuse_hit_rate().mean())  # [layers] -> mean
    saved = cache.host_bytes_saved_per_step()
    del cache
    _, logits, ms = teacher_forced(model, ids, queries, warm, options, record=False)
    return rate, saved, pool / k_bytes, statistics.median(ms[warm:]), (counted, logits)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_arguments(ap, queries=48)
    ap.add_argument("--n", type=positive_int, nargs="+", default=[8, 64])
    ap.add_argument("--pools", type=nonnegative_int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--warm", type=nonnegative_int, default=16)
    ap.add_argument("--out", default=results.RESULTS_DIR,
                    help=f"folder of reuse_hits.json (default {results.RESULTS_DIR})")
    ap.add_argument("--no-save", action="store_true", help="print only")
    a = ap.parse_args()
    if a.warm >= a.queries:
        ap.error(f"--warm must be below --queries ({a.queries}), got {a.warm}")
    torch.set_num_threads(a.threads)
    model, tokenizer = load_model(device="cpu", dtype=torch.float32)
    settings = {"queries": a.queries, "warm": a.warm, "sinks": a.sinks, "window": a.window}
    rows = []
    for which in (("short", "long") if a.length == "both" else (a.length,)):
        ids, _ = prompt_ids(tokenizer, which, a.queries)
        print(f"{which}: {len(ids) - a.queries} tokens of prompt, {a.queries} decode steps")
        print(f"   {'N':>4} {'C':>5} {'hit rate':>9} {'KiB saved/step':>15} {'pool / K':>9} "
              f"{'ms/step':>8}  logits as C = 0")
        group = model.config.num_heads // model.config.num_kv_heads
        for n in a.n:
            base = None
            for times in sorted(set(a.pools) | {0}):
                options = replace(KCacheOptions.paper_literal(), topn=n, sinks=a.sinks,
                                  window=a.window, reuse=times * group * n)
                rate, saved, share, ms, logits = hit_rate(model, ids, a.queries, a.warm, options)
                base = logits[0] if base is None else base
                same = all(torch.equal(x, base) for x in logits)
                print(f"   {n:>4} {options.reuse:>5} {rate:9.3f} {saved / 1024:15.1f} "
                      f"{share:9.3f} {ms:8.1f}  {same}", flush=True)
                rows.append({"length": which, "prompt": len(ids) - a.queries, "N": n,
                             "C": options.reuse, "hit_rate": round(rate, 4),
                             "saved_bytes_per_step": round(saved), "pool_over_k": round(share, 4),
                             "ms_per_step": round(ms, 2), "logits_equal": same})
                if not a.no_save:  # after each configuration: a run cut short keeps them
                    results.write_json(os.path.join(a.out, "reuse_hits.json"),
                                       {"machine": results.machine("cpu"), "settings": settings,
                                        "rows": rows})

if __name__ == "__main__":
    main()
