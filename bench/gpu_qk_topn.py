"""qk_topn against torch (matmul + topk) and against the HBM ceiling (bytes of K over the
device-to-device copy bandwidth measured in the same run), 4K-128K tokens, batch 1-32, Llama-3-8B
shape (32 q / 8 KV heads, D=128) and SmolLM2 shape (9 / 3, D=64), bf16, N=64 (and 1024).

Targets (issue 3): >= 70% of the HBM ceiling at >= 16K tokens, >= 3x faster than matmul + topk.
"""
import argparse
import math
import os

import torch

import kcache_ops
import timing

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}


def torch_way(q, k, lens, n, scale):
    """Scores by matmul, masked, then topk (no lse)."""
    B, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    s = torch.matmul(q.view(B, Hkv, Hq // Hkv, D), k.transpose(-1, -2))  # [B, Hkv, G, S]
    s = s.view(B, Hq, S).float() * scale
    s = s.masked_fill(torch.arange(S, device=q.device) >= lens[:, None, None], float("-inf"))
    return torch.topk(s, min(n, S), dim=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 32768, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--n", type=int, nargs="+", default=[64, 1024])
    args = ap.parse_args()
    os.environ["KCACHE_OPS_VALIDATE"] = "0"  # no host sync for the seq_lens range check
    gpu = timing.header("qk_topn")
    ceiling = timing.d2d_bandwidth_gbs()
    print(f"# ceiling: device-to-device copy {ceiling:.0f} GB/s (read + write)")
    rows = []
    for shape, (Hq, Hkv, D) in SHAPES.items():
        for S in args.seq:
            for B in args.batch:
                k_bytes = B * Hkv * S * D * 2
                sets_n = timing.rotations(k_bytes)
                need = k_bytes * sets_n + 2 * B * Hq * S * 4  # K sets + scores (ours or torch's)
                if not timing.fits_on_device(need):
                    print(f"# skip {shape} S={S} B={B}: needs {need / 2**30:.1f} GiB")
                    continue
                sets = [(torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16),
                         torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16),
                         torch.full((B,), S, device="cuda", dtype=torch.int32))
                        for _ in range(sets_n)]
                floor_us = k_bytes / ceiling / 1e3
                scale = 1 / math.sqrt(D)
                for n in args.n:
                    torch_us = timing.time_us(
                        lambda q, k, l: torch_way(q, k, l, n, scale), sets)
                    for group_select in (False, True):
                        us = timing.time_us(
                            lambda q, k, l: kcache_ops.qk_topn(q, k, l, n, scale, group_select),
                            sets)
                        rows.append(timing.line(
                            op="qk_topn", shape=shape, dtype="bf16", B=B, S=S, n=n,
                            group_select=group_select, us=us, GBs=k_bytes / us / 1e3,
                            pct_ceiling=100 * floor_us / us, torch_us=torch_us,
                            speedup_vs_torch=torch_us / us))
                del sets
    meta = {"gpu": gpu, "torch": torch.__version__, "d2d_ceiling_GBs": ceiling}

    def plot(ax, rs):
        for shape in SHAPES:
            for B in args.batch:
                pts = [r for r in rs if r["shape"] == shape and r["B"] == B and r["n"] == 64
                       and not r["group_select"]]
                if pts:
                    ax.plot([r["S"] for r in pts], [r["pct_ceiling"] for r in pts], "o-",
                            label=f"{shape} B={B} N=64")

    timing.save("gpu_qk_topn", meta, rows, plot, "tokens S",
                "% of HBM ceiling (K bytes / d2d bandwidth)", (70, "target 70%"))


if __name__ == "__main__":
    main()
