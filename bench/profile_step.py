"""Where the time of one decode step goes, kernel by kernel. The step at the Llama-3-8B shape
(32 q / 8 KV heads, D = 128, bf16), at 32K tokens x batch 8 and 128K x 1 (the issue's two
targets; 128K x 1 missed its prediction on the H200, 2026-12-04), in three variants built as
bench/gpu_decode_attn.py builds them (bench/decode_steps.py): ``group_select`` and ``per_head``
(qk_topn + sparse_attn_v, N = 64) and ``default`` (the default layer step, KCache.decode with
KCacheOptions()). Each variant is warmed up, then a few steps run under a profiler.

    python bench/profile_step.py [--method torch|range] [--variant ...] [--steps N]
                                 [--shape SxB ...] [--out DIR] [--dry-run]

--method torch (default): torch.profiler records the device activity of the steps (CUPTI
  activity records, no hardware counters: it works where ncu cannot read them). One line per
  kernel, shape and variant: its device µs per step, launches per step and share of the
  kernels' time; then per shape and variant the kernels' sum beside the step timed whole in a
  CUDA graph
  (timing.time_us): the difference is the time between the kernels, negative where kernels
  overlap (the default step runs sparse_attn_v on a second stream beside lowbit_tail).
  <out>/profile_step.json.
--method range: only the steps run between torch.cuda.profiler.start() and stop()
  (cudaProfilerStart / Stop), so that `ncu --profile-from-start off` profiles those kernels and
  none of the set-up; bench/run_gpu.sh's profile stage runs one variant per ncu process.
"""
import argparse
import functools
import os

import torch
from torch.autograd import DeviceType

from kcache_ops.cli.args import positive_int

import decode_steps
import timing

Hq, Hkv, D = 32, 8, 128
VARIANTS = ("group_select", "default", "per_head")  # the order they run in
SHAPES = ((32768, 8), (131072, 1))  # (tokens, batch), the order they run in
WARMUP = 3  # steps per variant before any is profiled


def build(variants, S, B, n):
    """{variant: step()} over one random input set (K at 32K x 8 is 512 MiB, far beyond L2): q
    [B, Hq, D] and K [B, Hkv, S, D] on the device, V [B, Hkv, S, D] in pinned host memory (the
    op-level steps) or handed off to it by the default layer."""
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((B,), S, device="cuda", dtype=torch.int32)  # [B]
    v_host = None
    steps = {}
    for variant in variants:
        if variant == "default":
            layer = decode_steps.DefaultLayer([(q, k, torch.randn_like(k))])
            steps[variant] = functools.partial(layer.cache.decode, *layer.inputs[0])
            continue
        if v_host is None:
            v_host = timing.host_random((B, Hkv, S, D), torch.bfloat16)
        step = decode_steps.OpStep(v_host, lens, n, variant == "group_select", "none")
        steps[variant] = functools.partial(step, q, k)
    return steps


def kernel_times(step, steps):
    """Run step() ``steps`` times under torch.profiler -> {name: (device µs per step, launches
    per step)} for every kernel (and copy or memset) on the device."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            us, launches = total.get(e.name, (0.0, 0))
            total[e.name] = (us + e.time_range.elapsed_us(), launches + 1)
    if not total:
        raise RuntimeError("torch.profiler recorded no device activity")
    return {name: (us / steps, launches / steps) for name, (us, launches) in total.items()}


def short_name(name, width=120):
    """A kernel's name without "void " and its argument list (copies and memsets as named),
    cut to ``width`` characters."""
    if name.startswith("void ") and name.endswith(")"):  # drop the trailing "(...)" at depth 0
        name = name.removeprefix("void ")
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name if len(name) <= width else name[:width - 3] + "..."


def profile_torch(args):
    """The torch method: per shape, each variant's kernels, then its sum beside the graph-timed
    step."""
    rec = timing.Recorder("profile_step", args.out, "decode step kernels (torch.profiler)",
                          method="torch.profiler", shapes=args.shape, n=args.n, steps=args.steps)
    for S, B in args.shape:
        for variant, step in warmed_up(args.variant, S, B, args.n).items():
            times = kernel_times(step, args.steps)
            kernels_us = sum(us for us, _ in times.values())
            for name, (us, launches) in sorted(times.items(), key=lambda kv: -kv[1][0]):
                rec.add(S=S, B=B, variant=variant, kernel=short_name(name), us=us,
                        launches=launches, pct_of_kernels=100 * us / kernels_us)
            step_us, mode = timing.time_us(step, [()])
            rec.add(S=S, B=B, variant=variant, kernel="(all kernels)", us=kernels_us,
                    launches=sum(n for _, n in times.values()), step_us=step_us, timed=mode,
                    between_kernels_us=step_us - kernels_us)
    rec.done()


def profile_range(args):
    """The range method: the steps alone between cudaProfilerStart and cudaProfilerStop, per
    shape."""
    for S, B in args.shape:
        steps_by_variant = warmed_up(args.variant, S, B, args.n)
        torch.cuda.profiler.start()
        for step in steps_by_variant.values():
            for _ in range(args.steps):
                step()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"# {args.steps} step(s) of {', '.join(steps_by_variant)} at {S} x {B} ran between "
              "cudaProfilerStart and cudaProfilerStop")


def parse_shape(text):
    """'SxB' -> (S tokens, B sequences), both positive."""
    return timing.int_pair(text, "a shape is TOKENSxBATCH, e.g. 32768x8")


def warmed_up(variants, S, B, n):
    """{variant: step()} at S tokens x batch B (VARIANTS' order), each run WARMUP times."""
    steps_by_variant = build([v for v in VARIANTS if v in variants], S, B, n)
    for step in steps_by_variant.values():
        for _ in range(WARMUP):
            step()
    torch.cuda.synchronize()
    return steps_by_variant


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=("torch", "range"), default="torch")
    ap.add_argument("--variant", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--steps", type=positive_int, default=3, help="steps profiled per variant")
    ap.add_argument("--shape", nargs="+", type=parse_shape, default=list(SHAPES),
                    help="TOKENSxBATCH, each profiled in turn (default: 32768x8 131072x1)")
    ap.add_argument("--n", type=positive_int, default=64)
    timing.add_common_arguments(ap)
    args = ap.parse_args()
    if args.dry_run:
        configs = []
        for S, B in args.shape:
            kv_bytes = B * Hkv * S * D * 2  # K, or V
            default = decode_steps.default_layer_bytes(B, Hq, Hkv, S, D,
                                                       torch.bfloat16)  # K, 2-bit copy, hot rows
            configs.append({"variants": ",".join(v for v in VARIANTS if v in args.variant),
                            "S": S, "B": B, "bytes": kv_bytes + (kv_bytes + default
                                                                 if "default" in args.variant
                                                                 else 0)})
        timing.plan(f"profile_step, method {args.method}, {args.steps} step(s) of each variant",
                    configs)
        return
    timing.require_gpu(ap)
    os.environ["KCACHE_OPS_VALIDATE"] = "0"  # no host sync for the value range checks
    if args.method == "range":
        profile_range(args)
    else:
        profile_torch(args)


if __name__ == "__main__":
    main()
