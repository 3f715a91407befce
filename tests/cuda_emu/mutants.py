"""How many missing barriers does the emulator catch? For every __syncthreads / __syncthreads_and in
csrc/cuda/*_kernel.cuh and the headers they include, run a set of cases with that one barrier
removed, under several schedule seeds, and report per barrier (file:line) whether the run was
stopped (a race, stale shared memory, a deadlock, outputs that depend on the schedule) or gave a
result the reference rejects; and the catch rate, with and without the shared-memory race check.

    PYTHONPATH=. python tests/cuda_emu/mutants.py [--seeds 1,2,3,4,5,6] [--rebuild]

By default a mutant is the unmodified build run with --skip-barrier FILE:LINE (the barrier's calls
do nothing: the same program as the barrier deleted, without a compile per mutant). --rebuild
instead writes a copy of csrc/cuda with the barrier deleted from the text into a temporary folder
and compiles the harness against it (slower; csrc is never touched)."""
import argparse
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

import torch  # noqa: E402
from conftest import seq_lens_tensor  # noqa: E402
from cuda_emu import emu  # noqa: E402
from test_gather_rows import make_indices  # noqa: E402
from test_qk_topn import check_top_p, check_topn, make_qk  # noqa: E402
from test_sparse_attn_v import (check_attn, check_tail, make_selection,  # noqa: E402
                                make_tail_case)

from kcache_ops import reference as R  # noqa: E402

BARRIER = re.compile(r"__syncthreads(_and|_or|_count)?\s*\(")


def kernel_files(kernel_dir):
    """*_kernel.cuh and the project headers they include, in order."""
    files, todo = [], sorted(Path(kernel_dir).glob("*_kernel.cuh"))
    while todo:
        f = todo.pop(0)
        if f in files:
            continue
        files.append(f)
        for inc in re.findall(r'#include\s+"([^"]+)"', f.read_text(encoding="utf-8")):
            if (f.parent / inc).exists():
                todo.append(f.parent / inc)
    return files


def find_barriers(kernel_dir):
    """[(file name, 1-based line, enclosing function, source line)] of every barrier call."""
    out = []
    for f in kernel_files(kernel_dir):
        function = "?"
        lines = f.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            # a declaration may put the kernel's name on the next line, after its launch bounds
            nxt = lines[i + 1] if "__global__" in line and i + 1 < len(lines) else ""
            decl = re.sub(r"__launch_bounds__\([^)]*\)", "", line + " " + nxt)
            m = re.search(r"(?:__global__|__device__).*?(\w+)\s*\(", decl)
            if m and not line.strip().startswith("//"):
                function = m.group(1)
            code = line.split("//")[0]
            if BARRIER.search(code) and "#define" not in code:
                out.append((f.name, i + 1, function, line.strip()))
    return out


def remove_barrier(text, line):
    """The source with the barrier call on 1-based `line` deleted (its predicate kept)."""
    lines = text.splitlines(keepends=True)
    src = lines[line - 1]
    src = re.sub(r"__syncthreads\s*\(\s*\)\s*;", ";", src)
    src = re.sub(r"__syncthreads_(?:and|or|count)\s*\(", "(", src)
    lines[line - 1] = src
    return "".join(lines)


def cases():
    """(name, run(exe, **opts) -> raises on a wrong result) covering every kernel and branch."""
    torch.manual_seed(1234)

    def topn(B, Hkv, G, S, D, n, lens, group_select, dtype=torch.float32, sms=132, ties=False,
             top_p=1.0):
        q, k = make_qk(B, Hkv * G, Hkv, S, D, dtype, "cpu")
        if ties:  # small integers: many equal scores, the collect's index-order path
            q, k = q.uniform_(-2, 3).floor(), k.uniform_(-2, 3).floor()
        lens = seq_lens_tensor(lens, "cpu")
        scale = 1 / math.sqrt(D)

        def run(exe, **opts):
            args = dict(n=n, scale=scale, group_select=int(group_select), sms=sms)
            tensors = dict(q=q, k_cache=k, seq_lens=lens)
            out = emu.run(exe, "qk_topn", dict(args, top_p=top_p), tensors, **opts)
            picked = out["scores"], out["indices"], out["lse"]
            if top_p < 1:  # the cut of the unmodified kernels' full selection
                full = emu.run(exe, "qk_topn", args, tensors, seeds=(1,))
                check_top_p((full["scores"], full["indices"], full["lse"]), picked, top_p)
                assert (picked[1] >= 0).sum() < (full["indices"] >= 0).sum(), "no cut: no case"
            else:
                check_topn(q, k, lens, n, scale, group_select, picked)
        return run

    def attn(B, Hkv, G, S, D, N, renormalize, group_rows, dtype=torch.float32, sms=132):
        scores, indices, lse = make_selection(B, Hkv * G, N, S, "cpu")
        if group_rows:
            indices = indices.view(B, Hkv, G, N)[:, :, :1].expand(B, Hkv, G, N).reshape(B, -1, N)
        v = torch.randn(B, Hkv, S, D).to(dtype)

        def run(exe, **opts):
            out = emu.run(exe, "sparse_attn_v", dict(renormalize=int(renormalize), sms=sms),
                          dict(scores=scores, indices=indices, v_cache=v, lse=lse), **opts)
            check_attn(scores, indices, v, lse, renormalize, out["out"])
        return run

    def tail(B, Hkv, G, S, N, lens):
        scores, indices, lse, v, v_sum, lens = make_tail_case(B, Hkv, G, N, S, lens,
                                                              torch.float32, "cpu")

        def run(exe, **opts):
            out = emu.run(exe, "sparse_attn_v", dict(renormalize=0, sms=132),
                          dict(scores=scores, indices=indices, v_cache=v, lse=lse, v_sum=v_sum,
                               seq_lens=lens), **opts)
            check_tail(scores, indices, v, lse, v_sum, lens, out["out"])
        return run

    def gather(B, Hs, G, S, D, N):
        src = torch.randn(B, Hs, S, D)
        indices = make_indices(B, Hs * G, N, S, "cpu")

        def run(exe, **opts):
            out = emu.run(exe, "gather_rows", dict(sms=132), dict(src=src, indices=indices),
                          **opts)
            assert torch.equal(out["dst"], R.gather_rows(src, indices))
        return run

    return [
        ("qk_topn per head, L > n and L < n", topn(2, 1, 4, 1100, 64, 40, [1100, 30], False)),
        ("qk_topn group, G=4", topn(2, 2, 4, 700, 64, 40, [700, 300], True)),
        ("qk_topn group, G=3, D=128 bf16", topn(1, 1, 3, 600, 128, 24, [600], True,
                                                torch.bfloat16)),
        ("qk_topn n=600 (sort over 1024)", topn(1, 1, 2, 1500, 64, 600, [1500], False)),
        ("qk_topn L > 2048 (two collect tiles)", topn(1, 1, 2, 2600, 64, 20, [2600], False,
                                                      sms=4)),
        ("qk_topn split select, ties", topn(1, 1, 2, 16400, 64, 60, [16400], False, sms=8,
                                            ties=True)),
        ("qk_topn group, split select", topn(2, 2, 2, 4500, 64, 40, [4500, 2051], True, sms=4)),
        ("qk_topn top_p, per head", topn(2, 1, 4, 1100, 64, 40, [1100, 30], False, top_p=0.1)),
        ("qk_topn top_p, group, split select", topn(2, 2, 2, 4500, 64, 40, [4500, 2051], True,
                                                    sms=4, top_p=0.1)),
        ("sparse_attn_v renormalize", attn(2, 2, 3, 200, 64, 70, True, False)),
        ("sparse_attn_v renormalize, one part", attn(2, 2, 3, 200, 64, 70, True, False, sms=1)),
        ("sparse_attn_v lse, group rows", attn(2, 1, 4, 200, 128, 40, False, True)),
        ("sparse_attn_v renormalize, group rows, 2 parts of 2 tiles",
         attn(1, 1, 8, 200, 64, 600, True, True, torch.float16, sms=2)),
        ("sparse_attn_v mean tail", tail(2, 1, 3, 300, 150, [300, 200])),
        ("gather_rows", gather(2, 2, 2, 100, 64, 50)),
    ]


def describe(message):
    """The kind of an emulator error and where, in a few words."""
    m = re.search(r"EMU-ERROR (?:\S+ block \S+ thread \S+ seed \S+: )?(.*)", message)
    text = m.group(1) if m else message
    text = re.split(r" \(byte | with thread |; access at |: every thread| \(it holds", text)[0]
    text = re.sub(r"kcache_ops::(\w+(?:<[^>]*>)?)\([^)]*\)::", r"\1::", text)
    text = re.sub(r"read of shared memory (.+?) not written in this block", r"stale read of \1",
                  text)
    text = text.replace(" race on shared memory ", " race on ")
    return re.sub(r"\s+", " ", text).strip()[:90]


def judge(exe, case_list, seeds, race_check, skip=None):
    """-> (verdict, how, skip count): 'caught' with the first case that failed and how, or
    'missed' with the number of times the removed barrier was reached."""
    hits = 0
    for name, run in case_list:
        stats = {}
        try:
            run(exe, seeds=seeds, skip_barrier=skip, race_check=race_check, stats=stats)
        except emu.EmulatorError as e:
            return "caught", f"{name}: {describe(str(e))}", None
        except AssertionError as e:
            first = (str(e).strip().splitlines() or ["?"])[0]
            return "caught", f"{name}: wrong result ({first[:50]})", None
        hits += stats.get("skip_hits", 0)
    return "missed", "", hits


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3,4,5,6")
    ap.add_argument("--rebuild", action="store_true",
                    help="compile a copy of the kernels with the barrier deleted, per mutant")
    ap.add_argument("--only", default="",
                    help="comma-separated FILE:LINE sites to test (default: every barrier)")
    args = ap.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    barriers = find_barriers(emu.KERNEL_DIR)
    if args.only:
        barriers = [b for b in barriers if f"{b[0]}:{b[1]}" in args.only.split(",")]
    case_list = cases()
    exe = emu.build("race")
    for name, run in case_list:  # the unmodified kernels must pass every case
        run(exe, seeds=seeds)

    rows = []
    for fname, line, function, src in barriers:
        site = f"{fname}:{line}"
        if args.rebuild:
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / "cuda"
                shutil.copytree(emu.KERNEL_DIR, copy)
                text = (copy / fname).read_text(encoding="utf-8")
                (copy / fname).write_text(remove_barrier(text, line), encoding="utf-8")
                mexe = emu.build("race", kernel_dir=copy, cache_dir=Path(tmp) / "build")
                with_check = judge(mexe, case_list, seeds, True)
                without = judge(mexe, case_list, seeds, False)
        else:
            with_check = judge(exe, case_list, seeds, True, skip=site)
            without = judge(exe, case_list, seeds, False, skip=site)
        rows.append((site, function, src, with_check, without))
        print(f"{site:28} {with_check[0]:7} {without[0]:7} {with_check[1] or without[1]}",
              file=sys.stderr, flush=True)

    caught = sum(r[3][0] == "caught" for r in rows)
    caught_plain = sum(r[4][0] == "caught" for r in rows)
    print("| barrier | function | race check | first catch | results only | first catch |")
    print("|---|---|---|---|---|---|")
    for site, function, src, with_check, without in rows:
        if with_check[1]:
            note = with_check[1]
        elif args.rebuild:
            note = "not caught"
        elif with_check[2] == 0:
            note = "never reached by the cases"
        else:
            note = f"reached {with_check[2]} times, not caught"
        print(f"| `{site}` | `{function}` | {with_check[0]} | {note} | {without[0]} | "
              f"{without[1]} |")
    print(f"\ncaught with the race check: {caught} of {len(rows)} "
          f"({100 * caught / max(len(rows), 1):.0f}%); by results alone: {caught_plain} of "
          f"{len(rows)} ({100 * caught_plain / max(len(rows), 1):.0f}%); seeds {args.seeds}"
          f"{'; rebuilt per mutant' if args.rebuild else ''}")


if __name__ == "__main__":
    main()
