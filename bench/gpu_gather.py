"""gather_rows bandwidth: rows of 128 B - 8 KB, 64 - 4096 rows per head, read zero-copy from pinned
host memory, against a large pinned cudaMemcpy host->device measured in the same run (the ceiling)
and against the PyTorch way (indices to the CPU, CPU index_select, non_blocking copy). Also the
same gather from write-combined host memory (KCACHE_OPS_HOST_ALLOC_WC=1).

Targets (issue 3): >= 80% of the memcpy bandwidth for 256 B rows, >= 90% for rows >= 1 KB.
"""
import argparse
import os

import torch

import kcache_ops
import timing

B, H = 2, 8  # 16 heads of rows; H = Hs (no GQA sharing, every row is read)


SRC_BYTES = 512 << 20


def host_buffer(wc):
    """512 MiB of pinned mapped host memory (write-combined when `wc`), random bf16 values."""
    os.environ["KCACHE_OPS_HOST_ALLOC_WC"] = "1" if wc else "0"
    buf = kcache_ops.alloc_host((SRC_BYTES // 2,), torch.bfloat16)
    os.environ["KCACHE_OPS_HOST_ALLOC_WC"] = "0"
    buf.copy_(torch.randn(SRC_BYTES // 2))
    return buf


def src_view(buf, row_bytes, n_rows):
    """src [B, H, S, row_bytes / 2] bf16 over buf, S >= n_rows, as many rows as buf holds."""
    D = row_bytes // 2
    S = SRC_BYTES // (B * H * row_bytes)
    assert S >= n_rows, f"{row_bytes}-byte rows: {S} rows per head, {n_rows} asked"
    return buf[: B * H * S * D].view(B, H, S, D)


def index_sets(S, n_rows, count=8):
    """`count` sets of distinct random rows per head: [B, H, n_rows] int32 on the GPU."""
    return [torch.stack([torch.randperm(S, device="cuda")[:n_rows] for _ in range(B * H)])
            .view(B, H, n_rows).to(torch.int32) for _ in range(count)]


def torch_way(src, idx):
    """Indices to the CPU, CPU gather, copy to the GPU."""
    i = idx.cpu().long()  # [B, H, N]
    rows = src[torch.arange(B)[:, None, None], torch.arange(H)[None, :, None], i]  # [B, H, N, D]
    return rows.to("cuda", non_blocking=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--row-bytes", type=int, nargs="+",
                    default=[128, 256, 1024, 4096, 8192])
    args = ap.parse_args()
    os.environ["KCACHE_OPS_VALIDATE"] = "0"  # no host sync for the index range check
    gpu = timing.header("gather_rows from pinned host memory")
    ceiling = timing.h2d_bandwidth_gbs()
    print(f"# ceiling: pinned cudaMemcpy host->device {ceiling:.1f} GB/s")
    buffers = {False: host_buffer(False), True: host_buffer(True)}
    rows = []
    for row_bytes in args.row_bytes:
        for n_rows in args.rows:
            for wc in ([False, True] if row_bytes in (256, 1024) and n_rows == 1024 else [False]):
                src = src_view(buffers[wc], row_bytes, n_rows)
                sets = [(src, ix) for ix in index_sets(src.shape[2], n_rows)]
                moved = B * H * n_rows * row_bytes
                us = timing.time_us(kcache_ops.gather_rows, sets)
                torch_us = (timing.time_us(torch_way, sets, warmup=1, iters=5)
                            if not wc else float("nan"))
                gbs = moved / us / 1e3
                rows.append(timing.line(
                    op="gather_rows", mem="wc" if wc else "pinned", row_bytes=row_bytes,
                    rows_per_head=n_rows, heads=B * H, MiB=moved / 2**20, us=us, GBs=gbs,
                    pct_ceiling=100 * gbs / ceiling, torch_us=torch_us,
                    speedup_vs_torch=torch_us / us))
    meta = {"gpu": gpu, "torch": torch.__version__, "h2d_ceiling_GBs": ceiling}

    def plot(ax, rs):
        for n_rows in args.rows:
            pts = [r for r in rs if r["rows_per_head"] == n_rows and r["mem"] == "pinned"]
            ax.plot([r["row_bytes"] for r in pts], [r["GBs"] for r in pts], "o-",
                    label=f"gather_rows, {n_rows} rows/head")
            ax.plot([r["row_bytes"] for r in pts], [r["row_bytes"] * n_rows * B * H /
                                                    r["torch_us"] / 1e3 for r in pts], "x--",
                    label=f"torch CPU gather + copy, {n_rows} rows/head")

    timing.save("gpu_gather", meta, rows, plot, "row bytes", "GB/s",
                (ceiling, "pinned memcpy H2D"))


if __name__ == "__main__":
    main()
