"""Predicted issue-bound and byte-bound times of qk_topn's kernels, from their SASS, without a GPU.

Compiles the torch-free kernel header csrc/cuda/qk_topn_kernel.cuh for sm_90 (nvcc -cubin, one
explicit instance per template instance the launcher uses for the configurations below), reads the
SASS (cuobjdump -sass) and the registers (cuobjdump -res-usage), and counts:

* score pass: the static instructions of qk_scores_kernel's key loop (the innermost backward branch
  around its 16-byte K loads) divided by the keys one warp covers per iteration = warp-instruction
  issues per key per block (one block serves one slice of <= GS query heads). Every instruction of
  the loop body is counted, including the cold NaN paths, so this is an upper bound of the issues.
* select pass: per innermost loop of qk_select_kernel around a 16-byte load (the group mass's
  head loop, the 3 radix passes and the collect pass; the per-head transform of a staged slice
  into shared memory is left out), its static instructions per load / 128 floats (a load is 4
  floats x 32 lanes) = issues per float read; the radix and collect loops summed = issues per
  ranked float. The passes come twice: over the ranking keys a block wrote itself (group mode,
  and per head when staged: the model's rows) and over a score row transformed in every pass (per
  head, not staged: recorded, not modelled). Group mode ranks the group mass, which each select
  block writes for its slice first: issues per score float. The count is static: the early exits
  of the select (after a radix pass whose threshold bin holds exactly the keys still needed; no
  index-order scan in the collect when every key equal to the threshold is taken) are not
  modelled, so the select's count is an upper bound. The merge of split rows (a tree of merges of
  the slices' sorted lists of N picks per row) is not counted.

Model (stated, not measured):
* issue bound = warp-instructions / (SMs x 4 issue slots per cycle (4 warp schedulers, one issue
  each per cycle) x clock), times the wave quantisation of the grid (ceil(waves) / waves) in waves
  of kScoreBlocksPerSm = 2 blocks per SM (fewer if the registers allow fewer; the launch bounds ask
  for 2, the chunk plan assumes 2); a block's own work cannot spread over several SMs, so the
  select bound is at least one block's instructions / (4 x clock): its slice of a row
  (qk_select_slices, at N = SELECT_N) times the issues per ranked float, plus in group mode G
  times the mass's issues per score float (the index-order scan for keys equal to the threshold,
  rare with real-valued scores, is not modelled).
* byte bound = bytes that must cross HBM / HBM bandwidth. Score pass: K once + the float32 score
  scratch written (G x 4 B per key per KV head). Select pass: the scores read once; unless the
  slice is staged in shared memory (select_staged), the ranked rows read 4 times and in group
  mode the mass written first (an upper bound: right after the score pass much of the scratch is
  still in L2, and a block re-reads its own slice of the mass).
* latency bound (score pass) = K bytes / the rate at which the warps keep loads in flight: a warp's
  iteration moves SCORE_UNROLL x 512 B (one 16-byte load per lane per row) and takes L + C with one
  stage (load, wait L, compute C) or max(L / (stages - 1), C) with K staged `stages` iterations
  deep (stages - 1 iterations' loads in flight while one computes), C = the loop's instructions at
  one per cycle; rate = SMs x warps per SM x bytes per iteration / that time, at a loaded
  device-memory latency L of 1 and 2 us (leads: the unloaded latency is ~0.5-0.8 us and rises
  under load).
Both are lower bounds of the time; the kernel is issue-bound where the first is the larger, and the
issue's target is issue bound <= HBM bound / 1.3 (bound_ratio = byte / issue >= 1.3).

Usage: python bench/sass_bounds.py [--label before] [--out bench/results]
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_DIR = os.path.join(ROOT, "csrc", "cuda")


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_hz: float  # SM clock under load
    hbm_bytes_s: float  # achievable device-memory bandwidth


# H100 SXM5: 132 SMs, 1.98 GHz max boost (NVIDIA H100 datasheet / whitepaper); HBM3 3.35 TB/s
# datasheet, ~3.0 TB/s measured by device-to-device copies (bench/NOTES.md, DESIGN.md §6).
# H200 SXM: the same processor (132 SMs, 1.98 GHz; .library/device/KINDS.md read 132 SMs and an SM
# clock of 1980 MHz under load); HBM3e 4.8 TB/s datasheet, ~4.3 TB/s moved by a device copy
# (KINDS.md).
GPUS = (Gpu("H100", 132, 1.98e9, 3.0e12), Gpu("H200", 132, 1.98e9, 4.3e12))

ISSUE_PER_SM_CYCLE = 4  # 4 warp schedulers, one warp-instruction each per cycle
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
SCORE_THREADS = 256  # kScoreThreads
SCORE_UNROLL = 4  # kScoreUnroll: K rows per thread per loop iteration
SCORE_STAGES = 3  # kScoreStages: iterations of K rows staged in shared memory (2 in flight)
LOADED_LATENCY_S = (1.0e-6, 2.0e-6)  # device-memory latency under full load (a lead, not measured)
SCORE_BLOCKS_PER_SM = 2  # kScoreBlocksPerSm: the residency the launch bounds and the chunk plan use
SCORE_BLOCK_OVERHEAD_KEYS = 128  # kScoreBlockOverheadKeys
SELECT_THREADS = 512  # kSelectThreads
SELECT_SLICE_KEYS = 4 * SELECT_THREADS  # kSelectSliceKeys: fewest keys per slice of a split
SELECT_BLOCKS_PER_SM = 4  # kSelectBlocksPerSm
MAX_TOP_N = 4096  # kMaxTopN: the merge holds the slices' lists of picks in this many slots
SELECT_N = 64  # the N of the predictions (the group_select step's; the default step's 128, N + hot
# rows, gives the same slices at these shapes)
SELECT_PASSES = 4  # 3 radix passes + the collect pass read the ranked row (where not staged)


@dataclass(frozen=True)
class Shape:
    name: str
    hq: int
    hkv: int
    d: int
    elem_bytes: int = 2  # bf16
    ctype: str = "__nv_bfloat16"


SHAPES = (Shape("Llama-3-8B", 32, 8, 128), Shape("SmolLM2", 9, 3, 64))
LENGTHS = ((32768, 8), (131072, 1))  # (tokens, batch)


def group_slice_width(g):
    """GS of launch_grid.h."""
    return 4 if g <= 4 else 8


def wave_chunk(s, blocks_per_chunk, wave, first, step, last, overhead_keys):
    """wave_chunk of launch_grid.h: of first, first + step, ... up to last, the chunk of keys with
    the fewest whole waves x (chunk + overhead_keys); the smallest on ties."""
    best, best_cost = first, None
    for chunk in range(first, last + 1, step):
        cost = -(-blocks_per_chunk * -(-s // chunk) // wave) * (chunk + overhead_keys)
        if best_cost is None or cost < best_cost:
            best, best_cost = chunk, cost
    return best


def score_chunk(s, blocks_per_chunk, sms):
    """qk_score_chunk of qk_topn_launch.h: the chunk (multiple of 256, >= 512) with the fewest
    whole waves x (chunk + overhead)."""
    return wave_chunk(s, blocks_per_chunk, sms * SCORE_BLOCKS_PER_SM, 512, 256,
                      max(-(-s // 256) * 256, 512), SCORE_BLOCK_OVERHEAD_KEYS)


def bitonic_size(n):
    """bitonic_size of kernel_utils.cuh: the smallest power of two >= n (1 for n <= 1)."""
    size = 1
    while size < n:
        size *= 2
    return size


def select_slices(s, rows, n, sms):
    """(slices, keys per slice) of a ranked row of s keys, as plan_qk_topn of qk_topn_launch.h
    (qk_select_slices, qk_select_slice_keys)."""
    want = min(max(1, SELECT_BLOCKS_PER_SM * sms // rows), max(1, s // SELECT_SLICE_KEYS),
               max(1, MAX_TOP_N // bitonic_size(n)))
    keys = max(1, -(-(-(-s // want)) // 4)) * 4
    return max(1, -(-s // keys)), keys


def select_staged(slice_keys, n):
    """select_staged of qk_topn_kernel.cuh: a slice's keys fit in the select block's shared memory
    (kStagedGroups = kMaxTopN / 2 + 32 groups of 4 keys) after the slots of its picks
    (staged_keys_offset)."""
    return (bitonic_size(n) + 1) // 2 + slice_keys // 4 <= MAX_TOP_N // 2 + 32


def find_tool(name):
    """nvcc / cuobjdump: the CUDA toolkit's, else (cuobjdump) the copy Triton's package carries."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton  # noqa: PLC0415 (optional: only for its cuobjdump)
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return path if os.path.isfile(path) else None
    except ImportError:
        return None


def compile_cubin(header, instantiations, workdir, nvcc):
    """cubin for sm_90 of csrc/cuda/<header>.cuh with the explicit instantiations given (lines of
    C++ inside namespace kcache_ops)."""
    src = os.path.join(workdir, f"{header}_instances.cu")
    lines = [f'#include "{header}.cuh"', "namespace kcache_ops {", *instantiations, "}"]
    with open(src, "w") as f:
        f.write("\n".join(lines) + "\n")
    cubin = os.path.join(workdir, f"{header}.cubin")
    subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                    "-I", KERNEL_DIR, "-o", cubin, src], check=True)
    return cubin


def compile_instances(instances, workdir, nvcc):
    """cubin of qk_topn_kernel.cuh with qk_scores_kernel<T, D, GS> for each (T, D, GS)."""
    return compile_cubin("qk_topn_kernel", [
        f"template __global__ void qk_scores_kernel<{t}, {d}, {gs}>(QkScoresParams);"
        for t, d, gs in instances], workdir, nvcc)


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_functions(cuobjdump, cubin):
    """{mangled name: [(address, instruction text)]} from cuobjdump -sass."""
    out = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True,
                         text=True).stdout
    funcs, cur = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _INSN.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def resources(cuobjdump, cubin):
    """{mangled name: (registers per thread, static shared bytes)} from cuobjdump -res-usage (the
    shared figure includes the runtime's 1 KiB per block)."""
    out = subprocess.run([cuobjdump, "-res-usage", cubin], check=True, capture_output=True,
                         text=True).stdout
    return {m.group(1): (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+)\s.*?SHARED:(\d+)", out)}


def loops(code):
    """(start, end) address ranges of the backward branches: [target, branch] of each loop."""
    out = []
    for addr, text in code:
        m = re.match(r"(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            out.append((int(m.group(1), 16), addr))
    return out


def body(code, lo, hi):
    """Instructions in [lo, hi], NOPs excluded."""
    return [t for a, t in code if lo <= a <= hi and not t.startswith("NOP")]


def innermost_loops_with(code, pattern):
    """Loops whose body holds an instruction matching pattern and no smaller such loop."""
    hits = [(lo, hi) for lo, hi in loops(code) if any(re.search(pattern, t)
                                                       for t in body(code, lo, hi))]
    return [(lo, hi) for lo, hi in hits
            if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in hits)]


# A 16-byte load of K in the score loop: an asynchronous copy to shared memory (cp.async), or a
# load to registers.
K_LOAD = r"LDGSTS\.E(?:\.\w+)*\.128|LDG\.E\.128"


def score_loop_count(code, elem_bytes, d):
    """(warp-instructions per key, loop body size, keys per warp iteration) of the K loop."""
    inner = innermost_loops_with(code, K_LOAD)
    lo, hi = min(inner, key=lambda r: r[1] - r[0])
    insns = body(code, lo, hi)
    lanes_per_key = d * elem_bytes // 16
    keys = SCORE_UNROLL * (32 // lanes_per_key)
    return len(insns) / keys, len(insns), keys


# A 16-byte load of what the select ranks: from device memory, or generic (the ranked keys are in
# device memory or, staged, in shared memory: one pointer serves both).
RANK_LOAD = r"\bLDG?\.E\.128"


def per_float(code):
    """[(warp-instructions per float read, kind)] of each innermost loop around a 16-byte load, in
    code order: its body per load / 128 (a load: 4 floats x 32 lanes); kind "mass" (the group
    mass: exponentials), "scores" (over a score row: float_key's float compares in the loop) or
    "keyed" (over keys written by the block: no float instruction). The loop that transforms a
    staged slice into shared memory (per head: STS.128, no exponential) is left out."""
    out = []
    for lo, hi in innermost_loops_with(code, RANK_LOAD):
        insns = body(code, lo, hi)
        mass = any("MUFU" in t for t in insns)
        if any("STS.128" in t for t in insns) and not mass:
            continue
        kind = ("mass" if mass else
                "scores" if any(re.match(r"(@!?U?P\w+\s+)?FSETP\b", t) for t in insns) else "keyed")
        out.append((len(insns) / sum(bool(re.search(RANK_LOAD, t)) for t in insns) / 128, kind))
    return out


def mangled_scores(t, d, gs):
    tmangle = {"__nv_bfloat16": "13__nv_bfloat16", "__half": "6__half", "float": "f"}[t]
    return f"_ZN10kcache_ops16qk_scores_kernelI{tmangle}Li{d}ELi{gs}EEEvNS_14QkScoresParamsE"


SELECT_NAME = "_ZN10kcache_ops16qk_select_kernelENS_14QkSelectParamsE"


def blocks_per_sm(regs, threads):
    regs_alloc = -(-regs // 8) * 8  # registers are allocated per warp in units of 256 (8/thread)
    return max(1, min(REGS_PER_SM // (regs_alloc * threads), MAX_THREADS_PER_SM // threads))


def latency_rate(score, blocks, gpu, latency_s):
    """Bytes per second the score pass's warps keep moving when every load waits latency_s (the
    latency bound of the module docstring)."""
    compute_s = score["loop_insns"] / gpu.clock_hz
    if SCORE_STAGES == 1:  # load, wait, compute
        iter_s = latency_s + compute_s
    else:  # SCORE_STAGES - 1 iterations' loads in flight while one computes
        iter_s = max(latency_s / (SCORE_STAGES - 1), compute_s)
    warps = blocks * SCORE_THREADS // 32
    return gpu.sms * warps * SCORE_UNROLL * 512 / iter_s


def inflight_kib(blocks):
    """K bytes per SM in flight: (while the warps compute, at most)."""
    per_stage = blocks * SCORE_THREADS * SCORE_UNROLL * 16 / 1024
    return [per_stage * (SCORE_STAGES - 1), per_stage * SCORE_STAGES]


def predict(shape, s, b, gpu, score, select):
    """One row of the table, with group_select (the decode step's selection): the two bounds of
    each pass (microseconds) and their ratios."""
    g = shape.hq // shape.hkv
    gs = group_slice_width(g)
    slices = -(-g // gs)
    chunk = score_chunk(s, b * shape.hkv * slices, gpu.sms)
    blocks = -(-s // chunk) * shape.hkv * slices * b
    bps = min(SCORE_BLOCKS_PER_SM, blocks_per_sm(score["regs"], SCORE_THREADS))
    waves = blocks / (gpu.sms * bps)
    quant = math.ceil(waves) / waves
    issue_rate = gpu.sms * ISSUE_PER_SM_CYCLE * gpu.clock_hz
    score_issue = b * shape.hkv * slices * s * score["per_key"] / issue_rate * quant
    k_bytes = b * shape.hkv * s * shape.d * shape.elem_bytes
    scratch_bytes = b * shape.hq * s * 4
    score_bytes = (k_bytes + scratch_bytes) / gpu.hbm_bytes_s
    latency = [k_bytes / latency_rate(score, bps, gpu, lat) for lat in LOADED_LATENCY_S]

    # Select: each block ranks a slice of a row (the KV head's group mass, which it writes first
    # from its slice of the G heads' scores) by 3 radix passes and the collect; where the slice
    # fits in shared memory (staged) it writes the mass there, and the passes read no device
    # memory.
    rows = b * shape.hkv
    slices, slice_keys = select_slices(s, rows, SELECT_N, gpu.sms)
    staged = select_staged(slice_keys, SELECT_N)
    ranked = select["passes_per_float"]  # the passes over the mass the block wrote
    mass = select["mass_per_float"] * g
    sel_instr = rows * s * (ranked + mass)
    per_block = min(s, slice_keys) * (ranked + mass) / (ISSUE_PER_SM_CYCLE * gpu.clock_hz)
    select_issue = max(sel_instr / issue_rate, per_block)
    # the scores read once; unstaged, the mass written and read by each pass
    select_bytes = scratch_bytes + (0 if staged else (1 + SELECT_PASSES) * rows * s * 4)
    select_bytes /= gpu.hbm_bytes_s
    us = 1e6
    return {
        "gpu": gpu.name, "shape": shape.name, "tokens": s, "batch": b, "select": "group",
        "score_blocks": blocks, "score_blocks_per_sm": bps, "score_waves": round(waves, 2),
        "score_issue_us": round(score_issue * us, 1), "score_bytes_us": round(score_bytes * us, 1),
        "score_bound_ratio": round(score_bytes / score_issue, 2),
        "score_latency_us": [round(t * us, 1) for t in latency],
        "score_inflight_kib": inflight_kib(bps),
        "select_blocks": rows, "select_slices": slices, "select_staged": staged,
        "select_issue_us": round(select_issue * us, 1),
        "select_bytes_us": round(select_bytes * us, 1),
        "k_floor_us": round(k_bytes / gpu.hbm_bytes_s * us, 1),
    }


def analyse(instances_for_shapes=SHAPES, workdir=None):
    """Compile, count, predict. Returns {"counts": ..., "rows": [...]}."""
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(f"needs nvcc and cuobjdump (found nvcc={nvcc}, cuobjdump={cuobjdump})")
    insts = sorted({(sh.ctype, sh.d, group_slice_width(sh.hq // sh.hkv))
                    for sh in instances_for_shapes})
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cubin = compile_instances(insts, tmp, nvcc)
        funcs = sass_functions(cuobjdump, cubin)
        regs = {name: r for name, (r, _) in resources(cuobjdump, cubin).items()}
    counts = {}
    for t, d, gs in insts:
        name = mangled_scores(t, d, gs)
        elem = 4 if t == "float" else 2
        per_key, n, keys = score_loop_count(funcs[name], elem, d)
        counts[f"qk_scores_kernel<{t},{d},{gs}>"] = {
            "regs": regs[name], "loop_insns": n, "keys_per_warp_iter": keys,
            "per_key": round(per_key, 2)}
    # each kind in code order: the group mass's head loop; 3 radix passes and the collect twice
    loops = per_float(funcs[SELECT_NAME])
    kinds = {k: [x for x, kind in loops if kind == k] for k in ("mass", "keyed", "scores")}
    if [len(v) for v in kinds.values()] != [1, 4, 4]:
        raise RuntimeError(f"qk_select_kernel: expected 9 loops around 16-byte loads (the group "
                           f"mass; 3 radix passes and the collect over keys and over scores), "
                           f"found {[(round(x, 3), k) for x, k in loops]}")
    (mass,), passes, score_passes = kinds.values()
    counts["qk_select_kernel"] = {"regs": regs[SELECT_NAME],
                                  "per_pass_per_float": [round(x, 3) for x in passes],
                                  "passes_per_float": round(sum(passes), 3),
                                  "mass_per_float": round(mass, 3),
                                  "score_row_passes_per_float": round(sum(score_passes), 3)}
    rows = []
    for sh in instances_for_shapes:
        score = counts[f"qk_scores_kernel<{sh.ctype},{sh.d},{group_slice_width(sh.hq // sh.hkv)}>"]
        for s, b in LENGTHS:
            for gpu in GPUS:
                rows.append(predict(sh, s, b, gpu, score, counts["qk_select_kernel"]))
    return {"model": {"issue_slots_per_sm_cycle": ISSUE_PER_SM_CYCLE,
                      "gpus": [asdict(g) for g in GPUS], "select_passes": SELECT_PASSES},
            "counts": counts, "rows": rows}


def markdown(result, label):
    """The counts and the table of bounds as markdown."""
    out = [f"### {label}", "", "| kernel | regs | SASS per key (score) / per scratch float, "
           "4 passes (select) |", "|---|---|---|"]
    for name, c in result["counts"].items():
        if "per_key" in c:
            what = (f"{c['per_key']} ({c['loop_insns']} in the loop / "
                    f"{c['keys_per_warp_iter']} keys)")
        else:
            what = (f"{c['passes_per_float']} per ranked float, 4 passes over keys "
                    f"({c['score_row_passes_per_float']} over a score row); group mass "
                    f"{c['mass_per_float']} per score float")
        out.append(f"| `{name}` | {c['regs']} | {what} |")
    out += ["", "| GPU | shape | tokens × batch | score blocks (per SM, waves) | score issue µs | "
            "score bytes µs | bytes / issue | "
            "score latency µs (L 1 / 2 µs; KiB in flight per SM) | "
            "select (group) issue µs | select bytes µs |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        out.append(
            f"| {r['gpu']} | {r['shape']} | {r['tokens'] // 1024}K × {r['batch']} | "
            f"{r['score_blocks']} ({r['score_blocks_per_sm']}, {r['score_waves']}) | "
            f"{r['score_issue_us']} | {r['score_bytes_us']} | {r['score_bound_ratio']} | "
            f"{' / '.join(map(str, r['score_latency_us']))} "
            f"({' – '.join(f'{k:g}' for k in r['score_inflight_kib'])}) | "
            f"{r['select_issue_us']} | {r['select_bytes_us']} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", default="current", help="name of this state (before, after, ...)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    result = analyse()
    result["label"] = args.label
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sass_bounds_{args.label}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    sys.stdout.write(markdown(result, args.label))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
