"""qk_topn against torch (matmul + mask + topk + logsumexp, bench/baselines.py; with group_select
the group's softmax mass before topk) and against the HBM ceiling (bytes of K over the
device-to-device copy bandwidth measured in the same run), 4K-128K tokens, batch 1-32,
Llama-3-8B shape (32 q / 8 KV heads, D=128) and SmolLM2 shape (9 / 3, D=64), bf16, N=64 (and
1024). Every call is timed inside a CUDA graph.

    python bench/gpu_qk_topn.py [--seq ...] [--batch ...] [--n ...] [--out DIR] [--dry-run]

Targets (issue 3): >= 70% of the HBM ceiling at >= 16K tokens, >= 3x faster than matmul + topk.
"""
import argparse
import math
import os

import torch

import kcache_ops
from kcache_ops.cli.args import positive_int

import baselines
import timing

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}
# the PyTorch way of the same selection, by group_select (named in each row's torch_baseline)
BASELINES = {False: baselines.torch_qk_topn, True: baselines.torch_qk_topn_group}


def configs(args):
    """(shape, S, B) in run order, with the device bytes each needs: K sets + the scores, and the
    weights of the group_select baseline."""
    out = []
    for shape, (Hq, Hkv, D) in SHAPES.items():
        for S in args.seq:
            for B in args.batch:
                k_bytes = B * Hkv * S * D * 2
                out.append({"shape": shape, "S": S, "B": B, "k_bytes": k_bytes,
                            "bytes": k_bytes * timing.rotations(k_bytes) + 3 * B * Hq * S * 4})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=positive_int, nargs="+", default=[32768, 4096, 16384, 131072])
    ap.add_argument("--batch", type=positive_int, nargs="+", default=[8, 1, 32])
    ap.add_argument("--n", type=positive_int, nargs="+", default=[64, 1024])
    timing.add_common_arguments(ap)
    args = ap.parse_args()
    todo = configs(args)
    if args.dry_run:
        timing.plan("qk_topn", [{k: c[k] for k in ("shape", "S", "B", "bytes")} for c in todo])
        return
    timing.require_gpu(ap)
    os.environ["KCACHE_OPS_VALIDATE"] = "0"  # no host sync for the seq_lens range check
    ceiling = timing.d2d_bandwidth_gbs()
    rec = timing.Recorder("gpu_qk_topn", args.out, "qk_topn", d2d_ceiling_GBs=ceiling)
    print(f"# ceiling: device-to-device copy {ceiling:.0f} GB/s (read + write)")
    for c in todo:
        Hq, Hkv, D = SHAPES[c["shape"]]
        B, S, k_bytes = c["B"], c["S"], c["k_bytes"]
        if not timing.fits_on_device(c["bytes"]):
            print(f"# skip {c['shape']} S={S} B={B}: needs {c['bytes'] / 2**30:.1f} GiB")
            continue
        sets = [(torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16),
                 torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16),
                 torch.full((B,), S, device="cuda", dtype=torch.int32))
                for _ in range(timing.rotations(k_bytes))]
        floor_us = k_bytes / ceiling / 1e3
        scale = 1 / math.sqrt(D)
        for n in args.n:
            for group_select, base in BASELINES.items():
                torch_us, torch_mode = timing.time_us(
                    lambda q, k, lens: base(q, k, lens, n, scale), sets)
                us, mode = timing.time_us(
                    lambda q, k, lens: kcache_ops.qk_topn(q, k, lens, n, scale, group_select),
                    sets)
                rec.add(op="qk_topn", shape=c["shape"], dtype="bf16", B=B, S=S, n=n,
                        group_select=group_select, us=us, timed=mode, GBs=k_bytes / us / 1e3,
                        pct_ceiling=100 * floor_us / us, torch_baseline=base.__name__,
                        torch_us=torch_us, torch_timed=torch_mode,
                        speedup_vs_torch=torch_us / us)

    def plot(ax, rs):
        for shape in SHAPES:
            for B in args.batch:
                pts = sorted((r["S"], r["pct_ceiling"]) for r in rs if r["shape"] == shape
                             and r["B"] == B and r["n"] == 64 and not r["group_select"])
                if pts:
                    ax.plot(*zip(*pts), "o-", label=f"{shape} B={B} N=64")

    rec.finish(plot, "tokens S", "% of HBM ceiling (K bytes / d2d bandwidth)", (70, "target 70%"))


if __name__ == "__main__":
    main()
