"""gather_rows bandwidth: rows of 128 B - 8 KB, 64 - 4096 rows per head, read zero-copy from pinned
host memory, against a large pinned cudaMemcpy host->device measured in the same run (the ceiling),
against a pinned cudaMemcpy of the row's own bytes (its ceiling at that size, latency included),
and against the PyTorch way (indices to the CPU, CPU gather into pinned memory, asynchronous
copy; bench/baselines.py, 3 warm-up calls and the median of 10). Up to 4 MiB
also as planned without the spread of small host reads over the multiprocessors (us_unspread,
KCACHE_OPS_HOST_READ_SPREAD=0): whether that spread pays, measured in the same run. Also the
same gather from write-combined host memory (KCACHE_OPS_HOST_ALLOC_WC=1). gather_rows is timed
inside a CUDA graph; the PyTorch way syncs the host and is timed as launched.

Those rows read from one 512 MiB buffer over and over. A model's layers each read their own V, and
on the H200 (2026-12-04) the decode step read the same 4 MiB of rows 3x slower from 8 GiB of host
V than from 2 GiB. So the footprint rows (--footprint GIBxBUFFERS) read 256-byte rows, 1024 per
head, from GIB of pinned host memory in BUFFERS buffers, a call's rows from one buffer, the calls
rotating through them as the layers of a step do (8x8: eight 1 GiB buffers); 1 to 8 GiB in one
buffer draw where the rate falls (on the H100, 2026-12-06: 90 % of a memcpy from 512 MiB, 44 %
from 2 GiB, 23 % from 8 GiB). The --thp-footprint
rows read the same from anonymous memory on transparent huge pages that cudaHostRegister maps
(bench/host_pages.py; mem "thp"), recording how much of it the kernel gave huge pages: whether 2
MiB pages would keep a large host V as fast as a small one.

    python bench/gpu_gather.py [--rows ...] [--row-bytes ...] [--footprint GIBxBUFFERS ...]
                               [--thp-footprint GIBxBUFFERS ...] [--out DIR] [--dry-run]

Targets (issue 3): >= 80% of the memcpy bandwidth for 256 B rows, >= 90% for rows >= 1 KB.
"""
import argparse
import math
import os

import torch

import kcache_ops
from kcache_ops.cli.args import positive_int

import baselines
import host_pages
import timing

B, H = 2, 8  # 16 heads of rows; H = Hs (no GQA sharing, every row is read)
SRC_BYTES = 512 << 20  # each host buffer (pinned, and write-combined)
UNSPREAD_BYTES = 4 << 20  # rows timed without the spread too: where the plans differ (132 SMs)


def src_view(buf, row_bytes, n_rows):
    """src [B, H, S, row_bytes / 2] bf16 over buf [SRC_BYTES / 2], S >= n_rows, as many rows as
    buf holds."""
    D = row_bytes // 2
    S = SRC_BYTES // (B * H * row_bytes)
    if S < n_rows:
        raise ValueError(f"{row_bytes}-byte rows: {S} rows per head fit, {n_rows} asked")
    return buf[: B * H * S * D].view(B, H, S, D)


def index_sets(S, n_rows, count):
    """`count` sets of distinct random rows per head: [B, H, n_rows] int32 on the GPU."""
    return [torch.stack([torch.randperm(S, device="cuda")[:n_rows] for _ in range(B * H)])
            .view(B, H, n_rows).to(torch.int32) for _ in range(count)]


def parse_footprint(text):
    """'GIBxBUFFERS' -> (GiB of host memory, buffers it is split in), the GiB a multiple of the
    buffers."""
    form = "a footprint is GIBxBUFFERS with GIB a multiple of BUFFERS, e.g. 8x8"
    gib, buffers = timing.int_pair(text, form)
    if gib % buffers:
        raise argparse.ArgumentTypeError(f"{form}, got {text!r}")
    return gib, buffers


def footprint_sets(gib, buffers, alloc, row_bytes=256, n_rows=1024):
    """(src, indices) sets over ``buffers`` host buffers of gib / buffers GiB each, each from
    alloc(shape) (pinned, device-mapped, filled), set i from buffer i % buffers, as many as make
    a round read past L2 (timing.rotations, as the other rows): src [B, H, S, row_bytes / 2]
    bf16, indices [B, H, n_rows] int32."""
    D = row_bytes // 2
    S = (gib << 30) // buffers // (B * H * row_bytes)  # rows per head of one buffer
    srcs = [alloc((B, H, S, D)) for _ in range(buffers)]
    count = timing.rotations(B * H * n_rows * row_bytes)
    return [(srcs[i % buffers], index_sets(S, n_rows, 1)[0]) for i in range(count)]


def huge_page_alloc(pages):
    """alloc(shape) for footprint_sets that places each src [shape] bf16 on a HugePageBuffer,
    registered for the GPU and filled; the buffers go to ``pages`` (to be closed after the row)."""
    def alloc(shape):
        nbytes = math.prod(shape) * torch.bfloat16.itemsize
        buf = host_pages.HugePageBuffer(nbytes)
        pages.append(buf)
        buf.register()
        return timing.fill_random(buf.data[:nbytes].view(torch.bfloat16).view(shape))
    return alloc


def memcpy_us(pinned, nbytes):
    """µs of a pinned cudaMemcpy host->device of ``nbytes`` (from the start of ``pinned``), timed
    as gather_rows is (in a CUDA graph): the ceiling of a read of that size, its latency
    included, which the 1 GiB copy's bandwidth is not for a read of a few hundred KiB."""
    src = pinned.view(-1).view(torch.uint8)[:nbytes]  # [nbytes] pinned
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")  # [nbytes]
    return timing.time_us(lambda d, s: d.copy_(s, non_blocking=True), [(dst, src)])[0]


def add_row(rec, c, sets, mem, where, pinned):
    """Times gather_rows (in a CUDA graph; up to UNSPREAD_BYTES also as planned without the spread
    of small host reads, timing.host_read_spread(False)), a memcpy of the same bytes from
    ``pinned`` (a pinned host tensor of at least that many) and the PyTorch way (not for
    write-combined memory, which the CPU reads slowly) over ``sets`` and records row ``c``: mem,
    where (the host memory read), the times and the ratios to the ceiling, to the memcpy and to
    torch."""
    us, mode = timing.time_us(kcache_ops.gather_rows, sets)
    us_unspread = None
    if c["bytes"] <= UNSPREAD_BYTES:
        with timing.host_read_spread(False):
            us_unspread = timing.time_us(kcache_ops.gather_rows, sets)[0]
    copy_us = memcpy_us(pinned, c["bytes"])
    torch_us = (float("nan") if mem == "wc" else
                timing.time_us(baselines.torch_gather_rows, sets, 3, 10, graph=False)[0])
    gbs = c["bytes"] / us / 1e3
    rec.add(op="gather_rows", mem=mem, row_bytes=c["row_bytes"], rows_per_head=c["rows"],
            heads=B * H, MiB=c["bytes"] / 2**20, **where, us=us, timed=mode, GBs=gbs,
            pct_ceiling=100 * gbs / rec.meta["h2d_ceiling_GBs"], memcpy_us=copy_us,
            pct_memcpy_same_bytes=100 * copy_us / us, us_unspread=us_unspread, torch_us=torch_us,
            speedup_vs_torch=torch_us / us)


def huge_page_row(c, rec, pinned):
    """Footprint row ``c`` from HugePageBuffers (mem "thp"), recording the machine's THP mode and
    the AnonHugePages its buffers gained (None where /proc/meminfo has no such line, as under
    gVisor). A buffer that cannot be registered skips the row with the reason, so the rest of the
    run and its plot stand; the buffers are unregistered after the row whatever happens. pinned:
    as add_row's."""
    pages = []  # the row's HugePageBuffers
    try:
        before = host_pages.meminfo_bytes("AnonHugePages")
        sets = footprint_sets(c["host_GiB"], c["buffers"], huge_page_alloc(pages))
        after = host_pages.meminfo_bytes("AnonHugePages")
        gained = (after - before) / 2**30 if min(before, after) >= 0 else None
        add_row(rec, c, sets, "thp", {"host_GiB": c["host_GiB"], "buffers": c["buffers"],
                                      "thp_mode": host_pages.thp_mode(),
                                      "anon_huge_GiB": gained}, pinned)
        del sets
    except RuntimeError as e:
        print(f"# skipped the huge-page row ({c['host_GiB']} GiB in {c['buffers']}): {e}")
    finally:
        for buf in pages:
            buf.close()


def configs(args):
    """(row_bytes, rows per head, write-combined) in run order; WC only at 256 B / 1 KB rows and
    1024 rows per head."""
    return ([{"row_bytes": rb, "rows": n, "wc": wc, "bytes": B * H * n * rb}
             for rb in args.row_bytes for n in args.rows
             for wc in ([False, True] if rb in (256, 1024) and n == 1024 else [False])]
            + [{"row_bytes": 256, "rows": 1024, "wc": False, "bytes": B * H * 1024 * 256,
                "host_GiB": gib, "buffers": buffers, "thp": thp}
               for thp, pairs in ((False, args.footprint), (True, args.thp_footprint))
               for gib, buffers in pairs])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=positive_int, nargs="+", default=[1024, 64, 256, 4096])
    ap.add_argument("--row-bytes", type=positive_int, nargs="+",
                    default=[256, 1024, 128, 4096, 8192])
    ap.add_argument("--footprint", type=parse_footprint, nargs="*",
                    default=[(1, 1), (2, 1), (4, 1), (8, 1), (8, 8)],
                    help="GIBxBUFFERS of host memory the footprint rows read from (default: "
                         "1x1 2x1 4x1 8x1 8x8; none without values)")
    ap.add_argument("--thp-footprint", type=parse_footprint, nargs="*", default=[(8, 1)],
                    help="the same from transparent huge pages (default: 8x1; none without "
                         "values)")
    timing.add_common_arguments(ap)
    args = ap.parse_args()
    todo = configs(args)
    if args.dry_run:
        timing.plan("gather_rows", todo)
        return
    timing.require_gpu(ap)
    os.environ["KCACHE_OPS_VALIDATE"] = "0"  # no host sync for the index range check
    ceiling = timing.h2d_bandwidth_gbs()
    rec = timing.Recorder("gpu_gather", args.out, "gather_rows from pinned host memory",
                          h2d_ceiling_GBs=ceiling)
    print(f"# ceiling: pinned cudaMemcpy host->device {ceiling:.1f} GB/s")
    buffers = {wc: timing.host_random((SRC_BYTES // 2,), torch.bfloat16, wc)
               for wc in (False, True)}
    for c in todo:
        if c.get("thp"):
            huge_page_row(c, rec, buffers[False])
            continue
        if "host_GiB" in c:  # its own buffers, freed after it
            sets = footprint_sets(c["host_GiB"], c["buffers"],
                                  lambda shape: timing.host_random(shape, torch.bfloat16))
            where = {"host_GiB": c["host_GiB"], "buffers": c["buffers"]}
        else:
            src = src_view(buffers[c["wc"]], c["row_bytes"], c["rows"])
            # host rows of other sets until a round reads past L2 (8 sets of 4 MiB fit in it)
            sets = [(src, ix) for ix in index_sets(src.shape[2], c["rows"],
                                                   timing.rotations(c["bytes"]))]
            where = {"host_GiB": SRC_BYTES / 2**30, "buffers": 1}
        add_row(rec, c, sets, "wc" if c["wc"] else "pinned", where, buffers[False])
        del sets

    def plot(ax, rs):
        for n_rows in sorted(args.rows):
            pts = sorted((r["row_bytes"], r["GBs"], r["row_bytes"] * n_rows * B * H
                          / r["torch_us"] / 1e3) for r in rs
                         if r["rows_per_head"] == n_rows and r["mem"] == "pinned"
                         and r.get("host_GiB") == SRC_BYTES / 2**30)
            if pts:
                x, ours, torch_gbs = zip(*pts)
                ax.plot(x, ours, "o-", label=f"gather_rows, {n_rows} rows/head")
                ax.plot(x, torch_gbs, "x--",
                        label=f"torch CPU gather + pinned copy, {n_rows} rows/head")

    rec.finish(plot, "row bytes", "GB/s", (ceiling, "pinned memcpy H2D"))


if __name__ == "__main__":
    main()
