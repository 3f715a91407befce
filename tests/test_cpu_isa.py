"""How the CPU ops are built: every level of the inner loops passes the op tests (this machine
picks its best level, AVX-512, AVX2 or the portable loops, csrc/cpu/isa.h; the tests rerun in
processes with KCACHE_OPS_CPU_ISA capping it at avx2 and at generic), the AVX-512 loops match the
reference (qk_topn's scores, its sums of exps) and the AVX2 loops' bits (lowbit_tail's sums, the
exps of its weights and of group_select's mass) on any x86-64 CPU with AVX2 (their intrinsics
emulated, avx512_emu/), and the parallel loops are compiled with OpenMP."""
import contextlib
import fcntl
import math
import os
import platform
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import DTYPES, TOL, run_pytest

import kcache_ops
from kcache_ops import reference as R

TESTS = os.path.dirname(os.path.abspath(__file__))
FLT_MAX = torch.finfo(torch.float32).max  # tail_weight's weight of an exp that overflows
# What the capped levels rerun: the CPU cases whatever devices this run tests (bench/run_gpu.sh
# narrows them to cuda), and the tests of rows split across threads, CPU-only, every case of them;
# not the hypothesis tests (test_random_shapes, test_mean_tail_random_shapes). "not random" left
# out the split-rows cases of qk_topn whose keys are "random" (24 of its 48).
CAPPED_FILES = [os.path.join(TESTS, f)
                for f in ("test_qk_topn.py", "test_sparse_attn_v.py", "test_lowbit_tail.py")]
CAPPED_CASES = "(cpu or across_threads) and not random_shapes"


@pytest.mark.parametrize("level", ["avx2", "generic"])
def test_capped_level_matches_reference(level):
    env = dict(os.environ, KCACHE_OPS_CPU_ISA=level, KCACHE_OPS_TEST_DEVICES="cpu")
    run = run_pytest("-x", "-k", CAPPED_CASES, *CAPPED_FILES, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_capped_levels_rerun_every_split_rows_case():
    """The capped levels' selection holds every case of the split-rows tests and every CPU case
    of the three files, and no hypothesis test."""
    env = dict(os.environ, KCACHE_OPS_TEST_DEVICES="cpu")

    def collected(*k):
        run = run_pytest("--collect-only", *k, *CAPPED_FILES, env=env, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return {line for line in run.stdout.splitlines() if "::" in line}

    every, chosen = collected(), collected("-k", CAPPED_CASES)
    split = {c for c in every if "across_threads" in c}
    on_cpu = {c for c in every if "[cpu" in c or "-cpu" in c}
    assert split and split <= chosen, sorted(split - chosen)[:5]
    assert on_cpu <= chosen, sorted(on_cpu - chosen)[:5]
    assert not any("random_shapes" in c for c in chosen)


def test_unknown_level_is_an_error():
    code = ("import torch, kcache_ops; q = torch.randn(1, 1, 64); "
            "kcache_ops.qk_topn(q, q[:, :, None], torch.ones(1, dtype=torch.int32), 1)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, KCACHE_OPS_CPU_ISA="bogus"))
    assert run.returncode != 0
    assert 'KCACHE_OPS_CPU_ISA must be generic, avx2 or avx512, got "bogus"' in run.stderr


def test_parallel_for_is_built_with_openmp():
    """at::parallel_for is inline: compiled without -fopenmp the CPU ops would run on one thread."""
    with open(kcache_ops._C.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read()


def _cpu_flags():
    """This CPU's feature flags (x86-64 Linux; none elsewhere)."""
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"):
        return set()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        return set(next((line.split() for line in f if line.startswith("flags")), []))


def _has_avx2():
    """Whether this CPU has AVX2, FMA and F16C, the target of the emulated loops."""
    return {"avx2", "fma", "f16c"} <= _cpu_flags()


def _has_avx512():
    """Whether this CPU runs the AVX-512 loops (csrc/cpu/isa.h's isa_level)."""
    return _has_avx2() and {"avx512f", "avx512bw", "avx512vl", "avx512dq",
                            "avx512_bf16"} <= _cpu_flags()


@pytest.fixture(scope="module")
def emulated():
    """avx512_emu/loops.cpp built (ninja keeps it between runs), each loop through Avx512Isa on
    emulated intrinsics ("avx512") or Avx2Isa: ``scores(q, k, scale, isa, tile, s_stride)`` scores
    one group's keys into a NaN-poisoned [G + 1, s_stride]; ``tail_rows(w, codes, sb, acc, bits,
    isa)`` adds one chunk's tail sums to the first G rows of a copy of acc [G + 1, D];
    ``exps(x, acc, shift, isa)`` gives tail_weights of x [n] (over NaN), add_exp of x onto acc
    [n + 1], each with a guard element, sum_exp [1], and tail_weights of x in place;
    ``scans(x, n, begin, end, thr, isa)`` gives max_of x [n] and first_above thr in [begin, end)."""
    if not _has_avx2():
        pytest.skip("the emulated AVX-512 loops are compiled for AVX2 (x86-64)")
    from torch.utils.cpp_extension import load
    build = os.path.join(tempfile.gettempdir(), f"kcache_ops_avx512_emu-torch{torch.__version__}")
    os.makedirs(build, exist_ok=True)
    # load() waits for as long as build/lock exists. torch 2.14's lock leaves that file behind
    # after every build, and torch 2.13's when its build is killed; a later run would wait forever.
    # Under this flock no other run is inside load(), so a build/lock left there is stale.
    with open(build + ".flock", "w") as flock:
        fcntl.flock(flock, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(build, "lock"))
        return load("kcache_ops_avx512_emu", [os.path.join(TESTS, "avx512_emu", "loops.cpp")],
                    extra_cflags=["-O2", "-std=c++20", "-Wno-psabi"], build_directory=build)


@pytest.fixture(scope="module")
def emulated_scores(emulated):
    return emulated.scores


def check_scores(s, G, L, ref, what):
    """s [G + 1, s_stride] holds ref [G, L] in its first G rows and L columns, NaN elsewhere."""
    torch.testing.assert_close(s[:G, :L], ref, atol=TOL[torch.float32], rtol=TOL[torch.float32],
                               msg=lambda m: f"{what}: {m}")
    assert s[:G, L:].isnan().all() and s[G].isnan().all(), f"{what}: a store outside [G, L]"


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_scoring_loop_matches_reference(emulated_scores, isa, D, dtype):
    """Every head count score_heads splits a group into (8, 4, 2, 1 and their sums), rows in steps
    and a tail, strided K, tiles of keys into a wider row of scores (as qk_topn calls it); bfloat16
    K by the vdpbf16ps dot product (AVX-512)."""
    for G in (1, 2, 3, 4, 5, 7, 8, 9, 12, 16):
        for L in (1, 2, 3, 4, 5, 67, 130):
            q = torch.randn(G, D).to(dtype).float()  # [G, D], the op's float32 copy of q
            k = torch.randn(L, 2 * D).to(dtype)[:, D:]  # [L, D], rows 2D apart
            ref, _ = R.qk_scores(q[None], k[None, None].float(), torch.tensor([L]), 0.125)
            for tile, s_stride in ((L, L), (64, L + 3)):
                s = emulated_scores(q, k, 0.125, isa, tile, s_stride)  # [G + 1, s_stride]
                check_scores(s, G, L, ref[0], f"G={G} L={L} tile={tile} s_stride={s_stride}")


def test_scoring_loop_keeps_a_nan_to_its_row(emulated_scores):
    """A NaN in K row 5 is the score of row 5 only, for every head (the 4-row steps' sums are
    transposed into place)."""
    q = torch.randn(8, 128).bfloat16().float()  # [8, 128]
    k = torch.randn(11, 128).bfloat16()  # [11, 128]
    k[5, 17] = float("nan")
    for isa in ("avx512", "avx2"):
        s = emulated_scores(q, k, 1.0, isa, 11, 11)[:8]  # [8, 11]
        assert s[:, 5].isnan().all() and not s[:, :5].isnan().any() and not s[:, 6:].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_equal_keys_score_alike(emulated_scores, dtype):
    """Equal K rows get equal scores wherever they lie, in the 4-row steps or the single rows
    after them, so that their ties go to the lower index (AVX-512 summed a single row's lanes in
    another order: of 10 equal keys qk_topn took [8, 9, 0, 1])."""
    for G in (1, 3, 8):
        q = torch.randn(G, 64).to(dtype).float()  # [G, D]
        k = torch.randn(1, 64).to(dtype).expand(11, 64).contiguous()  # [L, D]: 11 equal rows
        for isa in ("avx512", "avx2"):
            s = emulated_scores(q, k, 0.125, isa, 11, 11)[:G]  # [G, L]
            assert (s == s[:, :1]).all(), f"{isa} G={G}: {s}"


def tail_reference(w, codes, sb, acc, bits):
    """acc [G, D] + sum over keys i of w[h, i] * (base_i + step_i * code_i) in float64, the codes
    [n, >= D * bits / 8] uint8 unpacked low bits first, sb [n, 2] (step, base)."""
    D = acc.shape[1]
    shifts = torch.arange(0, 8, bits)  # [8 / bits]
    unpacked = (codes[:, :D * bits // 8, None].long() >> shifts) & ((1 << bits) - 1)
    rows = sb[:, 1:].double() + sb[:, :1].double() * unpacked.reshape(len(codes), D)  # [n, D]
    return acc.double() + w.double() @ rows


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("D", [64, 128])
def test_tail_sums_give_the_avx2_loops_bits(emulated, D, bits):
    """lowbit_tail's AVX-512 sums (16 columns a vector) give Avx2Isa's bits, and both the float64
    sums: every head count tail_rows splits a group into (4, 3, 2, 1 and their sums), runs of
    256 keys and their remainders, strided codes, weights of 0, negative and large values."""
    gen = torch.Generator().manual_seed(0)
    for G in (1, 2, 3, 4, 5, 7, 8, 9):
        for n in (1, 3, 255, 256, 257, 600):
            w = torch.rand(G, n, generator=gen)  # [G, n]
            w[torch.rand(G, n, generator=gen) < 0.2] = 0  # selected keys
            codes = torch.randint(0, 256, (n, D * bits // 8 + 5), dtype=torch.uint8,
                                  generator=gen)  # [n, D * bits / 8 + 5]: rows 5 bytes apart
            step = torch.rand(n, generator=gen).bfloat16().float()  # [n]
            base = (100 * torch.randn(n, generator=gen)).bfloat16().float()  # [n]
            sb = torch.stack([step, base], 1)  # [n, 2]
            acc = torch.randn(G + 1, D, generator=gen)  # [G + 1, D]: the sums add to G rows
            got = {isa: emulated.tail_rows(w, codes, sb, acc, bits, isa)
                   for isa in ("avx512", "avx2")}
            what = f"G={G} n={n}"
            assert torch.equal(got["avx512"], got["avx2"]), what
            assert torch.equal(got["avx512"][G], acc[G]), f"{what}: a store past the G rows"
            want = tail_reference(w, codes, sb, acc[:G], bits)
            torch.testing.assert_close(got["avx512"][:G].double(), want, rtol=1e-5, atol=1e-3,
                                       msg=lambda m: f"{what}: {m}")


def exp_inputs(gen):
    """x [1100] float32 whose exps (shift 0) cover every branch of exp8: +-0, a spread from -110
    to 95, x at the halfway points of n = round(x / ln 2) (where its rounding ties), subnormal
    results (below -87.3), the underflow to 0 (below -103.98), the clamp at 88 (tail_weights then
    takes std::exp), +-inf and NaN."""
    spread = torch.linspace(-110, 95, 700)  # [700]
    halves = (torch.arange(-150, 128) + 0.5) * math.log(2)  # [278]: x / ln 2 halfway
    specials = torch.tensor([0.0, -0.0, 88.0, 88.5, 88.72, 89.0, -87.33, -103.97, -103.99,
                             -104.0, 1e-30, -1e-30, float("inf"), float("-inf"), float("nan")])
    rest = 1100 - 700 - 278 - len(specials)
    noise = torch.randn(rest, generator=gen) * 30  # [rest]
    return torch.cat([spread, halves.float(), specials, noise])[torch.randperm(1100, generator=gen)]


@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 64, 100, 1100])
def test_exps_give_the_avx2_loops_bits(emulated, n):
    """The AVX-512 exps (16 keys a vector) of lowbit_tail's weights and of group_select's mass
    give Avx2Isa's bits lane for lane (exp16 is exp8's operations over 16 lanes), the weights
    those of tail_weight in float64 (and the same in place), and qk_topn's sum of exps the
    float64 sum; no store past n."""
    gen = torch.Generator().manual_seed(n)
    x = exp_inputs(gen)[:n].contiguous()  # [n]
    acc = torch.rand(n + 1, generator=gen)  # [n + 1], the last a guard
    for shift in (0.0, 3.5, -20.0):
        got = {isa: emulated.exps(x, acc, shift, isa) for isa in ("avx512", "avx2")}
        for i, what in enumerate(("tail_weights", "add_exp")):
            a, b = got["avx512"][i], got["avx2"][i]
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{what} shift={shift}"
            assert a[n] == acc[n], f"{what} shift={shift}: a store past n"
        for isa, (w, _, _, w_x) in got.items():  # the weights in place: the same bits
            assert torch.equal(w_x.view(torch.int32), w.view(torch.int32)), f"{isa} in place"
        want = (x - shift).double().exp().nan_to_num(nan=0.0).clamp(max=FLT_MAX)  # [n]
        torch.testing.assert_close(got["avx512"][0][:n].double(), want, rtol=1e-6, atol=1e-37,
                                   msg=lambda m: f"tail_weights shift={shift}: {m}")
        assert got["avx512"][2].isnan() == x.isnan().any(), f"sum_exp shift={shift}: NaN"
    # sum_exp as qk_topn calls it: finite scores, none above the shift (their max) by 88
    xs = x.nan_to_num(nan=-1.0, posinf=50.0, neginf=float("-inf")).clamp(max=50.0)  # [n]
    for shift in (50.0, 0.0, -20.0):
        got = emulated.exps(xs, acc, shift, "avx512")[2].double()  # [1]
        want = torch.exp(xs.double() - shift).sum()
        torch.testing.assert_close(got[0], want, rtol=1e-5, atol=0,
                                   msg=lambda m: f"sum_exp shift={shift}: {m}")


@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 64, 100])
@pytest.mark.parametrize("nan_at", [None, "inside", "past"])
def test_scans_give_the_avx2_loops_answers(emulated, n, nan_at):
    """The AVX-512 scans of qk_topn's selection (16 keys a compare, the last few through a masked
    load) give Avx2Isa's answers and the plain ones: max_of the max of x [n], NaN where one of
    them is NaN, never a key past n; first_above the first key above thr in [begin, end) for
    every begin, ends up to n and thresholds at, between and beyond the keys, never one past
    end (the 17 keys after x [n] are above every finite threshold, or NaN)."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n + 17, generator=gen) * 10  # [n + 17]
    x[n:] = 1e30  # past n: above every finite threshold
    x[torch.randint(0, n, (n // 8,), generator=gen)] = float("-inf")
    if nan_at is not None:
        x[torch.randint(0, n, (1,), generator=gen) if nan_at == "inside" else n + 3] = float("nan")
    want = x[:n].max().item()  # NaN where x [n] holds one
    for isa in ("avx512", "avx2"):
        got = emulated.scans(x, n, 0, 0, 0.0, isa)[0]
        assert got == want or math.isnan(got) and math.isnan(want), f"{isa} max_of: {got}"
    thresholds = [*x[:n][x[:n].isfinite()].tolist()[:4], float("-inf"), float("inf"),
                  float("nan"), 0.5]
    for thr in thresholds:
        for begin in range(n + 1):
            for end in {begin, min(n, begin + 1), min(n, begin + 16), min(n, begin + 17), n}:
                above = [i for i in range(begin, end) if x[i] > thr]
                want = above[0] if above else end
                for isa in ("avx512", "avx2"):
                    got = emulated.scans(x, n, begin, end, thr, isa)[1]
                    assert got == want, f"{isa} first_above({begin}, {end}, {thr}): {got}"


TAIL_AT_A_LEVEL = """
import sys, torch, kcache_ops
from kcache_ops import reference as R
torch.manual_seed(0)
outs = []
# heads 4 at a time: 3; 4; 4 + 4 + 1; 1; 4 + 2; 3. Scores spread by 3, or by 40: weights down
# to subnormal and 0 (exp16's every branch but its clamp at 88, which an lse never reaches).
for Hkv, G, D, bits, spread in ((3, 3, 64, 2, 3), (2, 4, 128, 4, 3), (1, 9, 128, 2, 3),
                                (2, 1, 64, 4, 3), (1, 6, 128, 4, 3), (1, 3, 64, 2, 40)):
    S, N = 700, 16
    lens = torch.tensor([700, 300], dtype=torch.int32)
    scores = torch.randn(2, Hkv * G, S) * spread  # [B, Hq, S]
    lse = torch.logsumexp(scores, -1)  # [B, Hq]
    indices = torch.randint(0, 300, (2, Hkv * G, N), dtype=torch.int32)  # [B, Hq, N]
    codes, meta = R.quantize_rows(torch.randn(2, Hkv, S, D) * 2 + 0.5, bits)
    outs.append(kcache_ops.lowbit_tail(scores, lens, lse, indices, codes, meta, bits,
                                       skip_first=4, skip_last=30))
torch.save(outs, sys.argv[1])
"""


@pytest.mark.skipif(not _has_avx512(), reason="this CPU has no AVX-512 loops")
def test_lowbit_tail_gives_the_same_bits_at_avx512_and_avx2(tmp_path):
    """On this CPU's own AVX-512 instructions, not emulated: lowbit_tail's output is the AVX2
    level's bit for bit (the same operations on each column and each weight, 16 a vector, not
    8)."""
    outs = {}
    for level in ("avx512", "avx2"):
        path = tmp_path / f"{level}.pt"
        run = subprocess.run([sys.executable, "-c", TAIL_AT_A_LEVEL, str(path)], timeout=300,
                             capture_output=True, text=True,
                             env=dict(os.environ, KCACHE_OPS_CPU_ISA=level))
        assert run.returncode == 0, run.stderr[-3000:]
        outs[level] = torch.load(path)
    for i, (a, b) in enumerate(zip(outs["avx512"], outs["avx2"])):
        assert torch.equal(a, b), f"case {i}: {(a - b).abs().max()}"
