"""How many of a decode step's host V reads were read in the steps just before it?

DESIGN.md §7 plans a device-resident cache of the V rows fetched in recent steps; this measures,
before building it, what such a cache would catch on the real model. For consecutive decode
queries (the last ``--queries`` positions of a prompt, each attending causally up to itself, as
decode steps do), every layer and every KV head: the rows the step reads are the union of its G
query heads' top N among the cold positions (KCache's default hot rows, 4 sinks and the last 60,
left out as the cache leaves them; the CUDA kernel reads a row several heads chose once); a hit
is a row that one of the ``W`` steps before also read, which a device cache of the rows of the
last W steps would serve. Reported per N and W: the hit rate (hits / rows read) and the rows such
a cache holds per KV head (the distinct rows of those W steps), as their share of the device
memory K already takes at that length.

Text and model as bench/head_overlap.py (the eval's essay window, the embedded SmolLM2). Writes
step_reuse.json (after each configuration) to bench/results/ (the results folder of
kcache_ops.results) or --out.

    python bench/step_reuse.py [--length short|long|both] [--n 8 64] [--w 1 4 16] [--out DIR]
                                                            (~40 s short, ~90 s both, two cores)
"""
import argparse
import os

import torch

from kcache_ops import results
from kcache_ops.cli.args import positive_int

from head_overlap import add_text_arguments, essay_queries, scores_and_masks


def step_reads(q, k, n, sinks, window):
    """The rows each decode query reads: q [Hq, Q, D], k [Hkv, T, D] of one layer (the queries
    at the last Q positions) -> [Hkv, Q, T] bool, True at the union of the group's heads' top
    ``n`` cold positions (``sinks <= j < L − window``, L = position + 1)."""
    hq, nq, _ = q.shape
    hkv, t, _ = k.shape
    scores, _, cold = scores_and_masks(q, k, sinks, window)  # [Hq, Q, T], [Q, T]
    top = scores.masked_fill(~cold[None], float("-inf")).topk(n, dim=-1).indices  # [Hq, Q, N]
    reads = torch.zeros(hq, nq, t, dtype=torch.bool).scatter_(-1, top, True)  # [Hq, Q, T]
    return reads.view(hkv, hq // hkv, nq, t).any(1)  # [Hkv, Q, T]


def reuse(reads, w):
    """reads [Hkv, Q, T] bool (:func:`step_reads`), ``w`` steps of memory -> (hits, rows read,
    rows held): summed over the KV heads and the queries from the w-th on (each has w steps
    before it), hits being rows also read in one of the w steps before; rows held the distinct
    rows of those w steps (what a cache of them holds)."""
    _, nq, _ = reads.shape
    hits = read = held = 0
    for i in range(w, nq):
        recent = reads[:, i - w:i].any(1)  # [Hkv, T]
        hits += int((reads[:, i] & recent).sum())
        read += int(reads[:, i].sum())
        held += int(recent.sum())
    return hits, read, held


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_arguments(ap, queries=48)
    ap.add_argument("--n", type=positive_int, nargs="+", default=[8, 64])
    ap.add_argument("--w", type=positive_int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", default=results.RESULTS_DIR,
                    help=f"folder of step_reuse.json (default {results.RESULTS_DIR})")
    ap.add_argument("--no-save", action="store_true", help="print only")
    a = ap.parse_args()
    if max(a.w) >= a.queries:
        ap.error(f"--w must be below --queries ({a.queries}), got {max(a.w)}")
    settings = {"queries": a.queries, "sinks": a.sinks, "window": a.window}
    rows = []
    for which, c, qs, ks, _, ids in essay_queries(a):
        print(f"   {'N':>4} {'W':>3} {'hit rate':>9} {'rows held /KV head':>19} "
              f"{'held / K rows':>14}  hit rate per layer")
        for n in a.n:
            reads = [step_reads(q, k, n, a.sinks, a.window) for q, k in zip(qs, ks)]
            for w in a.w:
                per = [reuse(r, w) for r in reads]  # per layer (hits, read, held)
                hits, read, held = (sum(p[i] for p in per) for i in range(3))
                steps = (a.queries - w) * c.num_kv_heads * len(per)
                layers = [p[0] / p[1] for p in per]
                print(f"   {n:>4} {w:>3} {hits / read:9.3f} {held / steps:19.1f} "
                      f"{held / steps / len(ids):14.3f}  "
                      + " ".join(f"{x:.2f}" for x in layers))
                rows.append({"length": which, "tokens": len(ids), "N": n, "W": w,
                             "hit_rate": round(hits / read, 4),
                             "rows_held": round(held / steps, 1),
                             "held_over_k": round(held / steps / len(ids), 4),
                             "layer_hit_rates": [round(x, 4) for x in layers]})
                if not a.no_save:  # after each configuration: a run cut short keeps them
                    results.write_json(os.path.join(a.out, "step_reuse.json"),
                                       {"machine": results.machine("cpu"), "settings": settings,
                                        "rows": rows})

if __name__ == "__main__":
    main()
