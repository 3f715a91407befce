"""One decode attention step: KCache (qk_topn + sparse_attn_v, N=64, V in pinned host memory, both
selection modes, and group selection with the mean tail) against the fastest exact dense decode
attention on the machine over K and V in GPU memory (SDPA's flash, memory-efficient and cuDNN
back-ends, and a split-KV variant at batch 1, bench/baselines.py; each checked against the first
before it is timed, the winner named per configuration). Llama-3-8B shape, bf16, 4K-128K tokens,
batch 1-32, every sequence full; every call is timed inside a CUDA graph.

    python bench/gpu_decode_attn.py [--seq ...] [--batch ...] [--n N] [--out DIR] [--dry-run]

Target (issue 3): KCache step <= 0.6x the dense step at 32K tokens, batch 8, group_select.
"""
import argparse
import math
import os

import torch

import kcache_ops

import baselines
import timing

Hq, Hkv, D = 32, 8, 128
AGREE = 2e-2  # largest |difference| a dense candidate may show against the first one (bf16)


def configs(args):
    """(S, B) in run order with the device bytes each needs: K and V sets + qk_topn's scores."""
    out = []
    for S in args.seq:
        for B in args.batch:
            kv_bytes = B * Hkv * S * D * 2
            out.append({"S": S, "B": B, "kv_bytes": kv_bytes,
                        "bytes": 2 * kv_bytes * timing.rotations(2 * kv_bytes) + B * Hq * S * 4})
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[32768, 4096, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 1, 32])
    ap.add_argument("--n", type=int, default=64)
    timing.add_common_arguments(ap)
    args = ap.parse_args()
    todo = configs(args)
    if args.dry_run:
        timing.plan("decode step", [{k: c[k] for k in ("S", "B", "bytes")} for c in todo])
        print(f"# dense candidates at batch 1: {', '.join(baselines.dense_candidates(1))}")
        return
    os.environ["KCACHE_OPS_VALIDATE"] = "0"  # no host sync for the value range checks
    rec = timing.Recorder("gpu_decode_attn", args.out, "decode attention step", n=args.n)
    # V [Bmax, Hkv, Smax, D] in pinned host memory; each configuration reads a strided slice
    v_all = timing.host_random((max(args.batch), Hkv, max(args.seq), D), torch.bfloat16)
    scale = 1 / math.sqrt(D)
    for c in todo:
        B, S = c["B"], c["S"]
        if not timing.fits_on_device(c["bytes"]):
            print(f"# skip S={S} B={B}: needs {c['bytes'] / 2**30:.1f} GiB")
            continue
        v = v_all[:B, :, :S]  # [B, Hkv, S, D]
        lens = torch.full((B,), S, device="cuda", dtype=torch.int32)
        sets = [(torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16),
                 torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16),
                 torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16))
                for _ in range(timing.rotations(2 * c["kv_bytes"]))]
        dense, dense_us, tried = fastest_dense(sets, B)
        v_sum = torch.randn(B, Hkv, D, device="cuda")  # the mean tail's row sums [B, Hkv, D]
        for group_select, tail in ((False, "none"), (True, "none"), (True, "mean")):
            def step(q, k, _v_device):
                scores, idx, lse = kcache_ops.qk_topn(q, k, lens, args.n, scale, group_select)
                if tail == "mean":
                    return kcache_ops.sparse_attn_v(scores, idx, v, lse, False, v_sum=v_sum,
                                                    seq_lens=lens)
                return kcache_ops.sparse_attn_v(scores, idx, v, lse)
            us, mode = timing.time_us(step, sets)
            host_bytes = B * (Hkv if group_select else Hq) * args.n * D * 2
            rec.add(op="decode_step", B=B, S=S, n=args.n, group_select=group_select, tail=tail,
                    us=us, timed=mode, dense=dense, dense_us=dense_us, ratio_vs_dense=us / dense_us,
                    dense_tried=tried, k_GBs=c["kv_bytes"] / us / 1e3,
                    host_MiB=host_bytes / 2**20, device_MiB_saved=c["kv_bytes"] / 2**20)

    def plot(ax, rs):
        for B in args.batch:
            for gsel, tail in ((False, "none"), (True, "none"), (True, "mean")):
                pts = sorted((r["S"], r["ratio_vs_dense"]) for r in rs if r["B"] == B and
                             r["group_select"] == gsel and r.get("tail", "none") == tail)
                if pts:
                    ax.plot(*zip(*pts), {"none": "o-" if gsel else "x--", "mean": "s:"}[tail],
                            label=f"B={B} group_select={gsel} tail={tail}")

    rec.finish(plot, "tokens S", "KCache step / fastest dense step", (0.6, "target 0.6"))


if __name__ == "__main__":
    main()
