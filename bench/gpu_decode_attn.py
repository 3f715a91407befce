"""One decode attention step: KCache against the fastest exact dense decode attention on the
machine over K and V in GPU memory (SDPA's flash, memory-efficient and cuDNN back-ends, and a
split-KV variant at batch 1, bench/baselines.py; each checked against the first before it is
timed, the winner named per configuration). Llama-3-8B shape, bf16, 4K-128K tokens, batch 1-32,
every sequence full; every call is timed inside a CUDA graph.

KCache runs as the op-level step (qk_topn + sparse_attn_v, N=64, V in pinned host memory) per
head, with group_select, and with group_select and the mean tail, and as the library's default
layer step (KCache.decode with KCacheOptions(), built through the public API on random K and V:
bench/decode_steps.py), and with group_select and top_p 1 (the setting with the best accuracy
for its bytes in bench/results/REPORT.md). Beside each whole step its parts are timed alone in the
same run: qk_topn (K GB/s and % of a device-to-device copy) and sparse_attn_v on precomputed
selections (host-row GB/s and % of a pinned host-to-device copy), both ceilings measured in the
same run;
the default step adds its selection (qk_topn over the cold rows + top_p) and its lowbit_tail.
Each step also carries its floor (floor_us: its device bytes at the device copy's rate, then its
host rows at the pinned copy's) and its ratio to it, and the dense step its floor (K and V at the
device copy's rate). The calls of one captured graph each have their own fresh query.
Where sparse_attn_v could split a slice's rows over several blocks (few blocks: batch <= 8 here),
it and the default step are also timed as planned with that split (KCACHE_OPS_HOST_READ_SPREAD=1,
the *_spread fields; by default it does not split, launch_grid.h).

    python bench/gpu_decode_attn.py [--seq ...] [--batch ...] [--n N] [--out DIR] [--dry-run]

Target (issue 3): KCache step <= 0.6x the dense step at 32K tokens, batch 8, group_select.
"""
import argparse
import os
from dataclasses import replace

import torch

from kcache_ops.caches import KCacheOptions
from kcache_ops.cli.args import positive_int

import baselines
import decode_steps
import timing

Hq, Hkv, D = 32, 8, 128
AGREE = 2e-2  # largest |difference| a dense candidate may show against the first one (bf16)
DEFAULT = KCacheOptions()
# the layer steps timed: the defaults, and the 2-bit tail and hot rows with group_select and no
# top_p cut, which kept perplexity within 0.4 % of dense on SmolLM2 (bench/results/REPORT.md)
LAYER_OPTIONS = (DEFAULT, replace(DEFAULT, group_select=True, top_p=1.0))


def configs(args):
    """(S, B) in run order with the device bytes each needs: K and V sets, the default layers
    built from them, qk_topn's scores, the copies of lowbit_tail's inputs; the bytes of K (as of
    V: kv_bytes), of a default layer on the device (K, the low-bit copy, the hot rows) and that
    lowbit_tail reads (every score, the low-bit copy, the hot rows: about a tenth of K and V)."""
    out = []
    for S in args.seq:
        for B in args.batch:
            kv_bytes = B * Hkv * S * D * 2
            layer_bytes = decode_steps.default_layer_bytes(B, Hq, Hkv, S, D, torch.bfloat16)
            tail_bytes = B * Hq * S * 4 + layer_bytes - kv_bytes
            sets = timing.rotations(2 * kv_bytes)
            out.append({"S": S, "B": B, "kv_bytes": kv_bytes, "layer_bytes": layer_bytes,
                        "tail_bytes": tail_bytes,
                        "bytes": sets * (2 * kv_bytes + layer_bytes) + B * Hq * S * 4
                        + timing.rotations(tail_bytes) * tail_bytes})
    return out


def fastest_dense(sets, B):
    """Time every dense candidate on ``sets`` [(q, k, v)] -> (name of the fastest, its µs,
    {name: µs or the reason it was not timed})."""
    times, first = {}, None
    for name, fn in baselines.dense_candidates(B).items():
        try:
            out = fn(*sets[0])  # [B, Hq, D]
        except RuntimeError as e:  # "No available kernel" and the like
            times[name] = "unavailable: " + str(e).splitlines()[0][:120]
            continue
        if first is None:
            first = out
        elif (out.float() - first.float()).abs().max().item() > AGREE:
            times[name] = "disagrees with the first candidate"
            continue
        times[name] = timing.time_us(fn, sets)[0]
    timed = {k: v for k, v in times.items() if isinstance(v, float)}
    if not timed:
        raise RuntimeError(f"no dense attention ran: {times}")
    best = min(timed, key=timed.get)
    return best, timed[best], times


class Timer:
    """timing.time_us for the parts of one row, remembering how each was timed."""

    def __init__(self):
        self.modes = set()

    def __call__(self, fn, args_list):
        us, mode = timing.time_us(fn, args_list)
        self.modes.add(mode)
        return us

    @property
    def timed(self):
        """How the parts were timed: graph, or e.g. eager+graph where one could not be captured."""
        return "+".join(sorted(self.modes))


def spreads(B):
    """Whether sparse_attn_v splits its rows at batch B here when its host reads are spread
    (sparse_attn_v_launch.h: B · Hkv blocks leave more than half of the multiprocessors idle);
    where it does, the rows time that plan too (timing.host_read_spread), so that the run says
    whether the split would pay."""
    return 2 * B * Hkv <= torch.cuda.get_device_properties(0).multi_processor_count


def spread_us(t, fn, args_list, B):
    """µs of fn over args_list as planned with the spread of host reads, None where the plans
    are the same (``spreads``)."""
    if not spreads(B):
        return None
    with timing.host_read_spread(True):
        return t(fn, args_list)


def fresh_queries(args_list, at):
    """``args_list`` repeated to at least timing.GRAPH_CALLS entries, each with a fresh random
    query in place of argument ``at``: the calls of one captured graph then select their own rows
    (where one K and V set fills the rotation, they would repeat one selection and its host
    reads), as the parts alone do."""
    count = max(len(args_list), timing.GRAPH_CALLS)
    return [tuple(torch.randn_like(x) if j == at else x
                  for j, x in enumerate(args_list[i % len(args_list)])) for i in range(count)]


def floor_fields(device_bytes, host_bytes, us, ceilings):
    """The step's floor: its device bytes at the device copy's rate, then its host rows at the
    pinned host->device copy's, in series (µs; the score scratch left out), and its time's ratio
    to that floor."""
    d2d, h2d = ceilings
    floor_us = device_bytes / d2d / 1e3 + host_bytes / h2d / 1e3
    return {"floor_us": floor_us, "ratio_vs_floor": us / floor_us}


def rates(k_bytes, us_qk_topn, host_bytes, us_sparse_attn_v, ceilings):
    """The fields of the parts' rates: K GB/s of qk_topn alone and its % of the device copy,
    host-row GB/s of sparse_attn_v alone and its % of the pinned host->device copy."""
    d2d, h2d = ceilings
    k_gbs, host_gbs = k_bytes / us_qk_topn / 1e3, host_bytes / us_sparse_attn_v / 1e3
    return {"qk_topn_GBs": k_gbs, "qk_topn_pct_d2d": 100 * k_gbs / d2d,
            "host_MiB": host_bytes / 2**20, "sparse_attn_v_GBs": host_gbs,
            "sparse_attn_v_pct_h2d": 100 * host_gbs / h2d}


def op_steps(rec, c, sets, v, n, dense, ceilings):
    """Time the op-level step in each of decode_steps.MODES, and its qk_topn and sparse_attn_v
    alone (the latter on selections of fresh queries, rotated beyond L2), one row each."""
    B, S = c["B"], c["S"]
    lens = torch.full((B,), S, device="cuda", dtype=torch.int32)  # [B]
    v_sum = torch.randn(B, Hkv, D, device="cuda")  # the mean tail's row sums [B, Hkv, D]
    for group_select, tail in decode_steps.MODES:
        step = decode_steps.OpStep(v, lens, n, group_select, tail, v_sum)
        first = decode_steps.host_row_bytes(step.select(*sets[0][:2])[1], v)  # sizes the round
        selections = [step.select(torch.randn_like(q), k) for q, k, _ in
                      (sets[i % len(sets)] for i in range(timing.rotations(first)))]
        host_bytes = decode_steps.mean_host_row_bytes([s[1] for s in selections], v)
        t = Timer()
        queries = fresh_queries(sets, 0)
        us = t(lambda q, k, _v: step(q, k), queries)
        us_qk_topn = t(lambda q, k, _v: step.select(q, k), queries)
        us_attn = t(step.attend, selections)
        us_attn_spread = spread_us(t, step.attend, selections, B)
        rec.add(op="decode_step", B=B, S=S, n=n, group_select=group_select, tail=tail, us=us,
                us_qk_topn=us_qk_topn, us_sparse_attn_v=us_attn,
                us_sparse_attn_v_spread=us_attn_spread, timed=t.timed, **dense,
                ratio_vs_dense=us / dense["dense_us"], k_GBs=c["kv_bytes"] / us / 1e3,
                **floor_fields(c["kv_bytes"], host_bytes, us, ceilings),
                **rates(c["kv_bytes"], us_qk_topn, host_bytes, us_attn, ceilings),
                device_MiB_saved=c["kv_bytes"] / 2**20)


def cloned(args):
    """A copy of ``args`` with every tensor in it (nested tuples included) cloned."""
    if isinstance(args, tuple):
        return tuple(cloned(a) for a in args)
    return args.clone() if torch.is_tensor(args) else args


def default_step(rec, c, sets, dense, ceilings, options=DEFAULT):
    """Time the default layer step (KCache.decode with ``options``, one layer per input set) and
    its parts alone:
    qk_topn (the top N cold rows) and the selection (+ top_p) on a fresh query per layer,
    lowbit_tail on copies of its inputs (a fresh query per layer) rotated beyond L2 by its own
    bytes, sparse_attn_v on selections of fresh queries rotated beyond L2. One row."""
    B, S = c["B"], c["S"]
    layer = decode_steps.DefaultLayer(sets, options)
    fresh = [(i, torch.randn_like(q)) for i, (q, _, _) in enumerate(sets)]  # (layer, q)
    tails = [layer.tail_args(i, q) for i, q in fresh]
    # the tail reads about a tenth of what a K and V set holds: as many sets fit in L2
    tails = [cloned(tails[i % len(tails)]) for i in range(timing.rotations(c["tail_bytes"]))]
    most_bytes = B * Hq * options.topn * D * 2  # every selected row read
    selections = [(i % len(sets), *layer.select(i % len(sets), torch.randn_like(sets[0][0])))
                  for i in range(timing.rotations(most_bytes))]  # (layer, scores, indices, lse)
    host_bytes = decode_steps.mean_host_row_bytes([s[2] for s in selections],
                                                  layer.cache.v_host[0])
    inputs = fresh_queries(layer.inputs, 1)  # (layer, q, new k, new v)
    t = Timer()
    us = t(layer.cache.decode, inputs)
    us_qk_topn = t(layer.qk_topn, fresh)
    us_select = t(layer.select, fresh)
    us_attn = t(layer.attend_host, selections)
    us_tail = t(layer.lowbit_tail, tails)
    # the whole step spread too: its sparse_attn_v runs beside lowbit_tail on the side stream,
    # where the split's blocks took multiprocessors from the tail's wave (an H100, 2026-12-06)
    us_spread = spread_us(t, layer.cache.decode, inputs, B)
    us_attn_spread = spread_us(t, layer.attend_host, selections, B)
    rows = sum(int((s[2] >= 0).sum()) for s in selections) / (len(selections) * B * Hq)
    rec.add(op="decode_step_default", path="KCache.decode", options=options.label, B=B, S=S,
            n=options.topn, group_select=options.group_select, tail=options.tail, us=us,
            us_qk_topn=us_qk_topn, us_select=us_select, us_sparse_attn_v=us_attn,
            us_lowbit_tail=us_tail, us_spread=us_spread,
            us_sparse_attn_v_spread=us_attn_spread, timed=t.timed, **dense,
            ratio_vs_dense=us / dense["dense_us"],
            **floor_fields(c["layer_bytes"], host_bytes, us, ceilings),
            k_GBs=c["kv_bytes"] / us / 1e3, rows_read=rows,
            **rates(c["kv_bytes"], us_qk_topn, host_bytes, us_attn, ceilings),
            device_MiB_saved=(c["kv_bytes"] - layer.device_bytes_beside_k()) / 2**20)


def row_label(r):
    """What a row ran, for the plot's legend."""
    if r["op"] == "decode_step_default":
        return f"default ({r['options']}), KCache.decode"
    return f"group_select={r['group_select']} tail={r['tail']}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=positive_int, nargs="+", default=[32768, 4096, 131072])
    ap.add_argument("--batch", type=positive_int, nargs="+", default=[8, 1, 32])
    ap.add_argument("--n", type=positive_int, default=64)
    timing.add_common_arguments(ap)
    args = ap.parse_args()
    todo = configs(args)
    if args.dry_run:
        timing.plan("decode step", [{k: c[k] for k in ("S", "B", "bytes")} for c in todo])
        print(f"# each: the op-level step in {len(decode_steps.MODES)} modes (group_select, tail)"
              f" {decode_steps.MODES}, then the layer step with "
              f"{' and with '.join(o.label for o in LAYER_OPTIONS)}")
        print(f"# dense candidates at batch 1: {', '.join(baselines.dense_candidates(1))}")
        return
    timing.require_gpu(ap)
    os.environ["KCACHE_OPS_VALIDATE"] = "0"  # no host sync for the value range checks
    ceilings = timing.d2d_bandwidth_gbs(), timing.h2d_bandwidth_gbs()
    rec = timing.Recorder("gpu_decode_attn", args.out, "decode attention step", n=args.n,
                          d2d_ceiling_GBs=ceilings[0], h2d_ceiling_GBs=ceilings[1])
    print(f"# ceilings: device-to-device copy {ceilings[0]:.0f} GB/s (read + write), pinned "
          f"host->device copy {ceilings[1]:.1f} GB/s")
    # V [Bmax, Hkv, Smax, D] in pinned host memory; each configuration reads a strided slice
    v_all = timing.host_random((max(args.batch), Hkv, max(args.seq), D), torch.bfloat16)
    for c in todo:
        B, S = c["B"], c["S"]
        if not timing.fits_on_device(c["bytes"]):
            print(f"# skip S={S} B={B}: needs {c['bytes'] / 2**30:.1f} GiB")
            continue
        sets = [(torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16),
                 torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16),
                 torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16))
                for _ in range(timing.rotations(2 * c["kv_bytes"]))]
        name, dense_us, tried = fastest_dense(sets, B)
        # its floor: K and V at the device copy's rate, no host rows
        floor = floor_fields(2 * c["kv_bytes"], 0, dense_us, ceilings)
        dense = {"dense": name, "dense_us": dense_us, "dense_tried": tried,
                 **{f"dense_{k}": v for k, v in floor.items()}}
        op_steps(rec, c, sets, v_all[:B, :, :S], args.n, dense, ceilings)
        for options in LAYER_OPTIONS:
            default_step(rec, c, sets, dense, ceilings, options)

    def plot(ax, rs):
        for B in args.batch:
            for label in dict.fromkeys(map(row_label, rs)):
                pts = sorted((r["S"], r["ratio_vs_dense"]) for r in rs
                             if r["B"] == B and row_label(r) == label)
                if pts:
                    ax.plot(*zip(*pts), "o-", label=f"B={B} {label}")

    rec.finish(plot, "tokens S", "KCache step / fastest dense step", (0.6, "target 0.6"))


if __name__ == "__main__":
    main()
