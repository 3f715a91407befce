"""Hot rows next to the tail term (issue 12, item 2): does keeping V of the first ``sinks`` and the
last ``window`` positions on the device, attended exactly beside the top N of the other rows, earn
its place once the tail term accounts for the rows not read?

The prototype is a KCache whose :meth:`~kcache_ops.caches.KCache.select` adds the hot rows to the
rows it attends exactly (their V read where the cache keeps it: numerically the same as a device
copy, which is what the design would add) and takes the top N among the other rows, so N host
rows per head and step stay N. It runs on the evaluation's perplexity windows (1.5K and 6K
tokens of context, the same windows, prefill and teacher forcing as ``python -m kcache_ops eval``),
against the same tails without hot rows. Results: bench/results/hot_rows.json and a table printed
per configuration; the verdict is in bench/results/REPORT.md's accuracy section and bench/NOTES.md.

    python bench/hot_rows.py [--threads 1] [--quick] [--resume]
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from kcache_ops.caches import KCache, KCacheOptions, make_cache
from kcache_ops.eval import perplexity
from kcache_ops.eval.runner import prefill_snapshot, step_through
from kcache_ops.eval.suite import Settings, build_groups
from kcache_ops.model import load_model
from kcache_ops.ops import qk_topn
from kcache_ops.results import RESULTS_DIR, machine, write_json

SINKS, WINDOW = 4, 60  # the prototype: the first 4 and the last 60 positions


class HotRowsKCache(KCache):
    """KCache that attends exactly to the hot rows — the first ``sinks`` and the last ``window``
    positions — besides the top N of the other rows (the tail, if any, takes the rest)."""

    def __init__(self, config, batch, capacity, device, dtype, options, sinks, window):
        super().__init__(config, batch, capacity, device, dtype, options)
        self.sinks, self.window = sinks, window

    def select(self, q, k_cache, lens):
        """q [B, Hq, D], k_cache [B, Hkv, S, D], lens [B] -> scores, indices
        [B, Hq, N + sinks + window] (the top N cold rows, then the hot rows; -1 padding),
        lse [B, Hq]."""
        o, hot = self.options, self.sinks + self.window
        B, Hq, D = q.shape
        Hkv = k_cache.shape[1]
        scores, indices, lse = qk_topn(q, k_cache, lens, o.topn + hot, group_select=o.group_select,
                                       check_values=False)  # [B, Hq, N + hot] x2, [B, Hq]
        L = lens.long()  # [B]
        cold = (indices >= self.sinks) & (indices < L[:, None, None] - self.window)  # [B,Hq,N+hot]
        # at most `hot` of the N + hot entries are hot or padding: the first N cold ones remain
        order = torch.sort((~cold).to(torch.int8), dim=-1, stable=True).indices[..., :o.topn]
        kept = torch.gather(cold, -1, order)  # [B, Hq, N]
        top_s = torch.gather(scores, -1, order).masked_fill(~kept, float("-inf"))  # [B, Hq, N]
        top_i = torch.gather(indices, -1, order).masked_fill(~kept, -1)  # [B, Hq, N]
        j = torch.arange(hot, device=q.device)  # [hot]
        pos = torch.where(j < self.sinks, j, L[:, None] - self.window + (j - self.sinks))  # [B,hot]
        valid = (pos >= 0) & (pos < L[:, None]) & ((j < self.sinks) | (pos >= self.sinks))
        pos = pos.clamp(min=0)  # [B, hot]
        k = torch.gather(k_cache, 2, pos[:, None, :, None].expand(B, Hkv, hot, D))  # [B,Hkv,hot,D]
        k = k.float().repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, hot, D]
        hot_s = torch.einsum("bhd,bhjd->bhj", q.float(), k) / math.sqrt(D)  # [B, Hq, hot]
        valid = valid[:, None, :].expand(B, Hq, hot)  # [B, Hq, hot]
        hot_s = hot_s.masked_fill(~valid, float("-inf"))
        hot_i = torch.where(valid, pos[:, None, :].expand(B, Hq, hot), -1).to(torch.int32)
        return torch.cat([top_s, hot_s], -1), torch.cat([top_i, hot_i], -1), lse


def new_cache(model, snapshot, options, hot, steps):
    """A cache holding the snapshot's prompts: dense (options None), KCache, or with hot rows."""
    batch, length = snapshot.tokens.shape
    args = (model.config, batch, length + steps, model.device, model.dtype)
    if options is None:
        cache = make_cache("dense", *args)
    elif hot:
        cache = HotRowsKCache(*args, options, SINKS, WINDOW)
    else:
        cache = KCache(*args, options)
    for layer, (k, v) in enumerate(zip(snapshot.k, snapshot.v)):
        cache.store_prompt(layer, k, v, snapshot.lens)  # k, v [B, Hkv, T, D]
    cache.finish_prefill(snapshot.lens)
    return cache


def configurations():
    """(label, options, hot rows) pairs: no tail and the mean tail at N = 64 (the issue's
    prototypes), the 2-bit tail at N = 8 and N = 64, each with and without hot rows; dense
    first."""
    out = [("dense", None, False)]
    for n, tail in [(64, "none"), (64, "mean"), (8, "int2"), (64, "int2")]:
        options = KCacheOptions(topn=n, tail=tail)
        out += [(options.label, options, False),
                (f"{options.label} + sinks {SINKS} + window {WINDOW}", options, True)]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny windows: a smoke run")
    parser.add_argument("--out", default=RESULTS_DIR)
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in the JSON (same labels), run the others")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings(needle_lengths=(64,))
    if args.quick:
        s = Settings(ppl_rows=1, agree_rows=0, prefill=96, steps=8, long_rows=1,
                     long_prefill=160, long_steps=4, needle_lengths=(64,))
    model, tokenizer = load_model()
    groups = [g for g in build_groups(tokenizer, s) if "ppl_rows" in g]  # the perplexity windows
    snapshots = {g["name"]: prefill_snapshot(model, g["prompts"]) for g in groups}
    path = os.path.join(args.out, "hot_rows.json")
    done = {}
    if args.resume and os.path.exists(path):
        with open(path) as f:
            done = {r["label"]: r for r in json.load(f)["rows"]}
    rows, dense = [], None
    for label, options, hot in tqdm(configurations(), desc="hot rows", unit="config"):
        if label in done:
            rows.append(done[label])
            dense = dense or done[label]
            continue
        start = time.perf_counter()
        row = {"label": label, "options": options and options.to_dict(), "hot_rows": hot}
        for g in groups:
            forced = g["forced"]  # [B, S]; the agreement rows (greedy) ride along unscored
            cache = new_cache(model, snapshots[g["name"]], options, hot, forced.shape[1])
            _, logprob = step_through(model, cache, g["first"], forced)  # [B, S]
            row[g["name"]] = perplexity.summarize(logprob[:g["ppl_rows"]])
        dense = dense or row
        row["dppl"] = {g["name"]: perplexity.delta(row[g["name"]], dense[g["name"]])
                       for g in groups}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"{label:45s} " + "  ".join(f"{name} Δppl {d:+6.2f}%"
                                           for name, d in row["dppl"].items()), flush=True)
        write_json(path,
                   {"machine": machine(model.device), "settings": asdict(s), "sinks": SINKS,
                    "window": WINDOW, "rows": rows})


if __name__ == "__main__":
    main()
