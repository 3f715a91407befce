"""One decode attention step: KCache (qk_topn + sparse_attn_v, N=64, V in pinned host memory, both
selection modes) against dense decode attention over K and V in GPU memory (FlashAttention's
flash_attn_with_kvcache if importable, else torch SDPA), Llama-3-8B shape, bf16, 4K-128K tokens,
batch 1-32.

Target (issue 3): KCache step <= 0.6x the dense step at 32K tokens, batch 8, group_select.
"""
import argparse
import math
import os

import torch
import torch.nn.functional as F

import kcache_ops
import timing

Hq, Hkv, D = 32, 8, 128
try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None


def dense_step(q, k, v, lens):
    """Exact attention of q [B, Hq, D] over K, V [B, Hkv, S, D] in GPU memory -> [B, Hq, D]."""
    if flash_attn_with_kvcache is not None:  # wants [B, S, H, D]; a transposed view is honoured
        out = flash_attn_with_kvcache(q[:, None], k.transpose(1, 2), v.transpose(1, 2),
                                      cache_seqlens=lens)
        return out[:, 0]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def host_v(B, S):
    """Pinned mapped V [B, Hkv, S, D] bf16: one random block of 64M values repeated."""
    v = kcache_ops.alloc_host((B, Hkv, S, D), torch.bfloat16)
    flat = v.view(-1)
    pattern = torch.randn(min(flat.numel(), 64 << 20)).to(torch.bfloat16)
    for start in range(0, flat.numel(), pattern.numel()):
        end = min(flat.numel(), start + pattern.numel())
        flat[start:end] = pattern[: end - start]
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    os.environ["KCACHE_OPS_VALIDATE"] = "0"  # no host sync for the value range checks
    gpu = timing.header("decode attention step")
    backend = "flash_attn" if flash_attn_with_kvcache is not None else "torch SDPA"
    print(f"# dense baseline: {backend}")
    v_all = host_v(max(args.batch), max(args.seq))  # [Bmax, Hkv, Smax, D]; slices are strided views
    scale = 1 / math.sqrt(D)
    rows = []
    for S in args.seq:
        for B in args.batch:
            kv_bytes = B * Hkv * S * D * 2
            sets_n = timing.rotations(2 * kv_bytes)
            need = 2 * kv_bytes * sets_n + B * Hq * S * 4
            if not timing.fits_on_device(need):
                print(f"# skip S={S} B={B}: needs {need / 2**30:.1f} GiB")
                continue
            v = v_all[:B, :, :S]
            lens = torch.full((B,), S, device="cuda", dtype=torch.int32)
            sets = [(torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16),
                     torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16),
                     torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16))
                    for _ in range(sets_n)]
            dense_us = timing.time_us(lambda q, k, vd: dense_step(q, k, vd, lens), sets)
            for group_select in (False, True):
                def step(q, k, _vd):
                    scores, idx, lse = kcache_ops.qk_topn(q, k, lens, args.n, scale, group_select)
                    return kcache_ops.sparse_attn_v(scores, idx, v, lse)
                us = timing.time_us(step, sets)
                host_bytes = B * (Hkv if group_select else Hq) * args.n * D * 2
                rows.append(timing.line(
                    op="decode_step", B=B, S=S, n=args.n, group_select=group_select, us=us,
                    dense_us=dense_us, ratio_vs_dense=us / dense_us,
                    k_GBs=kv_bytes / us / 1e3, host_MiB=host_bytes / 2**20,
                    device_MiB_saved=kv_bytes / 2**20))
            del sets
    meta = {"gpu": gpu, "torch": torch.__version__, "dense": backend, "n": args.n}

    def plot(ax, rs):
        for B in args.batch:
            for gsel in (False, True):
                pts = [r for r in rs if r["B"] == B and r["group_select"] == gsel]
                if pts:
                    ax.plot([r["S"] for r in pts], [r["ratio_vs_dense"] for r in pts],
                            "o-" if gsel else "x--", label=f"B={B} group_select={gsel}")

    timing.save("gpu_decode_attn", meta, rows, plot, "tokens S",
                f"KCache step / dense step ({backend})", (0.6, "target 0.6"))


if __name__ == "__main__":
    main()
