"""Predicted issue, tensor-core and byte bounds of lowbit_tail's kernel, from its SASS, no GPU.

Compiles csrc/cuda/lowbit_tail_kernel.cuh for sm_90 (nvcc -cubin, one explicit instance
lowbit_tail_kernel<D, GS, bits> per shape of bench/sass_bounds.py), reads its SASS and resources
(cuobjdump) and counts the key loop: the innermost backward branch around its tensor-core mma,
divided by the keys one warp covers per iteration = warp-instruction issues per key per block (a
block serves one KV head's slice of <= GS query heads). Every instruction of the body counts, the
paths for keys a head selected included: an upper bound.

Model (stated, not measured), per configuration and GPU:
* residency = blocks of the instance per SM as its registers and shared memory allow;
* the plan's chunk (lowbit_tail_launch.h: the wave model of launch_grid.h at that residency) gives
  the blocks; an SM runs at most ceil(blocks / SMs) of them, and its 4 schedulers issue one
  warp-instruction each per cycle, so issue bound = ceil(blocks / SMs) x chunk x per key / (4 x
  clock) (a block's work cannot spread over SMs);
* tensor bound = the same keys x the loop's mma.sync (HMMA) per key / (MMA_PER_SM_CYCLE x clock);
* byte bound = per key and KV head, G float32 scores + D * bits / 8 code bytes + 4 meta bytes,
  over the HBM bandwidth (an upper bound: the scores were just written by qk_topn with an
  evict-last hint and may still be in L2).

    python bench/tail_bounds.py [--bits 2|4] [--out bench/results]
"""
import argparse
import json
import os
import sys
import tempfile

import sass_bounds as sb

TAIL_THREADS = 128  # kTailThreads
TAIL_CODE_WORDS = 8  # kTailCodeWords: 4-byte code words a lane stages per iteration
TAIL_CHUNK_STEP = 256  # kTailChunkStep
TAIL_MAX_CHUNK = 4096  # kTailMaxChunk
TAIL_BLOCK_OVERHEAD_KEYS = 128  # kTailBlockOverheadKeys
SHARED_PER_SM = 228 * 1024  # bytes of shared memory per SM (H100 / H200)
# mma.sync m16n8k8 (tf32) per SM and cycle: the H100 / H200 dense tf32 peak (494.7 TFLOPS at
# 1.83 GHz over 132 SMs) is one such mma (2048 flops) per SM and cycle; mma.sync (not wgmma) is
# reported to reach about half of the peak on Hopper.
MMA_PER_SM_CYCLE = 0.5


def mangled(d, gs, bits):
    return (f"_ZN10kcache_ops18lowbit_tail_kernelILi{d}ELi{gs}ELi{bits}EEEv"
            f"NS_16LowbitTailParamsE")


def compile_instances(instances, workdir, nvcc):
    """cubin of lowbit_tail_kernel.cuh with lowbit_tail_kernel<D, GS, bits> for each (D, GS,
    bits)."""
    return sb.compile_cubin("lowbit_tail_kernel", [
        f"template __global__ void lowbit_tail_kernel<{d}, {gs}, {bits}>(LowbitTailParams);"
        for d, gs, bits in instances], workdir, nvcc)


def warp_keys(d, bits):
    """Keys one warp covers per iteration (TailLayout<D, Bits>::kWarpKeys): 4 lanes per key
    column, as many keys per lane as its staged code words hold (one word per key, two where a
    lane's D / 8 codes take 64 bits)."""
    key_words = 2 if d // 8 * bits > 32 else 1
    return 4 * (TAIL_CODE_WORDS // key_words)


def loop_count(code, d, bits):
    """(warp-instructions per key, loop body size, keys per warp iteration, tensor-core mma per
    key) of the key loop."""
    inner = sb.innermost_loops_with(code, r"HMMA")
    lo, hi = max(inner, key=lambda r: r[1] - r[0])
    body = sb.body(code, lo, hi)
    keys = warp_keys(d, bits)
    mma = sum(1 for line in body if "HMMA" in line)
    return len(body) / keys, len(body), keys, mma / keys


def residency(regs, shared):
    """Blocks of TAIL_THREADS threads per SM as registers and shared memory (cuobjdump's figure,
    the runtime's 1 KiB per block included) allow."""
    return min(sb.blocks_per_sm(regs, TAIL_THREADS), SHARED_PER_SM // shared)


def tail_chunk(s, blocks_per_chunk, wave):
    """lowbit_tail_chunk of lowbit_tail_launch.h: a multiple of TAIL_CHUNK_STEP up to
    TAIL_MAX_CHUNK, by the wave model."""
    last = min(max(-(-s // TAIL_CHUNK_STEP), 1) * TAIL_CHUNK_STEP, TAIL_MAX_CHUNK)
    return sb.wave_chunk(s, blocks_per_chunk, wave, TAIL_CHUNK_STEP, TAIL_CHUNK_STEP, last,
                         TAIL_BLOCK_OVERHEAD_KEYS)


def predict(shape, s, b, gpu, count, bits):
    """One row: the plan's grid, the issue and byte bounds (microseconds)."""
    g = shape.hq // shape.hkv
    slices = -(-g // sb.group_slice_width(g))
    bps = count["blocks_per_sm"]
    chunk = tail_chunk(s, b * shape.hkv * slices, gpu.sms * bps)
    blocks = -(-s // chunk) * shape.hkv * slices * b
    busiest_keys = -(-blocks // gpu.sms) * chunk  # keys of the busiest SM
    issue = busiest_keys * count["per_key"] / (sb.ISSUE_PER_SM_CYCLE * gpu.clock_hz)
    tensor = busiest_keys * count["mma_per_key"] / (MMA_PER_SM_CYCLE * gpu.clock_hz)
    per_key_bytes = g * 4 + shape.d * bits // 8 + 4
    byte = b * shape.hkv * s * per_key_bytes / gpu.hbm_bytes_s
    return {"gpu": gpu.name, "shape": shape.name, "tokens": s, "batch": b, "bits": bits,
            "chunk": chunk, "blocks": blocks, "waves": round(blocks / (gpu.sms * bps), 2),
            "bytes_per_key": per_key_bytes, "issue_us": round(issue * 1e6, 1),
            "tensor_us": round(tensor * 1e6, 1), "bytes_us": round(byte * 1e6, 1)}


def analyse(shapes=sb.SHAPES, bits=2, workdir=None):
    """Compile, count, predict -> {"counts": {instance: ...}, "rows": [...]}."""
    nvcc, cuobjdump = sb.find_tool("nvcc"), sb.find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(f"needs nvcc and cuobjdump (found nvcc={nvcc}, cuobjdump={cuobjdump})")
    insts = sorted({(sh.d, sb.group_slice_width(sh.hq // sh.hkv), bits) for sh in shapes})
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cubin = compile_instances(insts, tmp, nvcc)
        funcs = sb.sass_functions(cuobjdump, cubin)
        res = sb.resources(cuobjdump, cubin)
    counts = {}
    for d, gs, _ in insts:
        regs, shared = res[mangled(d, gs, bits)]
        per_key, n, keys, mma = loop_count(funcs[mangled(d, gs, bits)], d, bits)
        counts[f"lowbit_tail_kernel<{d},{gs},{bits}>"] = {
            "regs": regs, "shared": shared, "blocks_per_sm": residency(regs, shared),
            "loop_insns": n, "keys_per_warp_iter": keys, "per_key": round(per_key, 2),
            "mma_per_key": round(mma, 2)}
    rows = [predict(sh, s, b, gpu, counts[
                f"lowbit_tail_kernel<{sh.d},{sb.group_slice_width(sh.hq // sh.hkv)},{bits}>"],
                    bits)
            for sh in shapes for s, b in sb.LENGTHS for gpu in sb.GPUS]
    return {"counts": counts, "rows": rows}


def markdown(result):
    """The counts and the bounds as markdown tables."""
    out = ["| kernel | regs | shared B | blocks / SM | SASS per key | mma per key |",
           "|---|---|---|---|---|---|"]
    for name, c in result["counts"].items():
        out.append(f"| `{name}` | {c['regs']} | {c['shared']} | {c['blocks_per_sm']} | "
                   f"{c['per_key']} ({c['loop_insns']} / {c['keys_per_warp_iter']} keys) | "
                   f"{c['mma_per_key']} |")
    out += ["", "| GPU | shape | tokens × batch | bits | chunk, blocks (waves) | bytes per key | "
            "issue µs | tensor µs | bytes µs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        out.append(f"| {r['gpu']} | {r['shape']} | {r['tokens'] // 1024}K × {r['batch']} | "
                   f"{r['bits']} | {r['chunk']}, {r['blocks']} ({r['waves']}) | "
                   f"{r['bytes_per_key']} | {r['issue_us']} | {r['tensor_us']} | "
                   f"{r['bytes_us']} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, choices=(2, 4), default=2)
    ap.add_argument("--out", default=os.path.join(sb.ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    result = analyse(bits=args.bits)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tail_bounds_int{args.bits}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    sys.stdout.write(markdown(result))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
