"""bench/run_gpu.sh in its dry run on the CPU (every stage's CPU-side part, "no GPU" for the GPU
work, the log and the archive in $OUT), the PyTorch baselines of bench/baselines.py against
kcache_ops.reference on fresh random inputs, bench/cpu_ops.py at a tiny size, bench/timing.py's
timing and the rates of bench/gpu_gather.py and bench/gpu_decode_attn.py on faked timings, the
decode steps of bench/decode_steps.py (which the GPU benchmark and the profile time) on the CPU at a
small shape, with the count of the ops a default step launches (bench/step_ops.py), the reuse
step's timing over steps that advance (bench/reuse_step.py), the JSON of the reuse studies
(bench/reuse_step.py, reuse_hits.py, step_reuse.py) and the default step's tail inputs
(bench/gpu_decode_attn.py)."""
import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import pytest
import torch

import kcache_ops
from kcache_ops import reference

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import baselines  # noqa: E402  (bench/ is a folder of scripts, not a package)
import cpu_ops  # noqa: E402
import decode_steps  # noqa: E402
import gpu_decode_attn  # noqa: E402
import gpu_gather  # noqa: E402
import profile_step  # noqa: E402
import reuse_hits  # noqa: E402
import reuse_step  # noqa: E402
import step_ops  # noqa: E402
import step_reuse  # noqa: E402
import timing  # noqa: E402

STAGES = ("build", "tests", "e2e", "slow", "profile", "bench", "sanitize")


def run_gpu_sh(tmp_path, *args, timeout, **env):
    """bench/run_gpu.sh with args, this Python, $OUT and $WORK in tmp_path and env on top."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "gpu_logs"),
           "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", os.path.join(BENCH, "run_gpu.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_every_stage_and_packs_out(tmp_path):
    out, work = tmp_path / "out", tmp_path / "gpu_logs"
    run = run_gpu_sh(tmp_path, "--dry-run", timeout=180, OMP_NUM_THREADS="1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = (out / "run_gpu.log").read_text(encoding="utf-8")
    assert "dry run" in log
    for name in STAGES:
        assert f"no GPU: {name} not run (dry run)" in log
    stages = (work / "stages.txt").read_text(encoding="utf-8")
    for name in ("collect_tests", "collect_sanitizer_cases", "plan_benchmarks", "e2e_arguments",
                 "plan_profile"):
        assert any(line.split()[:2] == [name, "ok"] for line in stages.splitlines()), stages
    for plan in ("gather_rows: 28", "qk_topn: 24", "decode step: 9",  # the benchmarks' plans
                 "profile_step, method torch, 3 step(s) of each variant: 2"):
        assert f"# {plan} configurations" in log
    assert "--profile-from-start off --clock-control none" in log  # the ncu command, printed
    assert "--kernel-name qk_select_kernel --launch-count 1" in log  # the select's source view
    assert "--page source --print-source sass" in log
    assert sorted(os.listdir(out)) == ["gpu_results.tar.gz", "run_gpu.log"]
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu_logs/stages.txt" in names and "gpu_logs/plan_benchmarks.txt" in names


def test_a_hanging_command_outside_the_stages_is_cut_off(tmp_path):
    """A real run (no --dry-run) whose nvidia-smi hangs, on a machine without a GPU: the command is
    cut off at LIMIT_QUICK and the run goes on to its "no GPU" exit."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexec sleep 600\n")
    (fake / "nvidia-smi").chmod(0o755)
    run = run_gpu_sh(tmp_path, "build", timeout=60, PATH=f"{fake}:{os.environ['PATH']}",
                     LIMIT_QUICK="2", CUDA_VISIBLE_DEVICES="")
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    assert "no GPU was visible" in run.stdout


def test_unknown_stage_is_refused(tmp_path):
    run = run_gpu_sh(tmp_path, "--dry-run", "bild", timeout=30)
    assert run.returncode == 2 and "unknown stage 'bild'" in run.stdout


def test_a_python_without_torch_is_refused_before_any_stage(tmp_path):
    """PYTHON defaults to python3, which on a machine like CI's has no torch: the run says so and
    how to name the one that has it, instead of failing every stage on an ImportError."""
    bare = tmp_path / "python"  # this Python without its site-packages: no torch
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S -I "$@"\n')
    bare.chmod(0o755)
    run = run_gpu_sh(tmp_path, "--dry-run", timeout=60, PYTHON=str(bare))
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{bare} cannot import torch" in run.stdout and "PYTHON=.venv/bin/python" in run.stdout
    assert "====" not in run.stdout  # no stage started


@pytest.mark.parametrize("log, ran", [
    ("....\n7 passed in 40.12s\n========= ERROR SUMMARY: 0 errors\n", True),
    ("7 passed in 3.1s\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n",
     True),
    ("SKIPPED [4] tests/test_cuda_ops.py:42: needs a CUDA GPU\n3 passed, 4 skipped in 2.99s\n"
     "========= ERROR SUMMARY: 0 errors\n", False),
    ("7 skipped in 1.00s\n", False),
    ("========= Error: Device not supported\n", False),
])
def test_sanitizer_log_must_show_its_cases_ran(tmp_path, log, ran):
    """bench/sanitize.sh passes a tool only where pytest's summary (not the tool's own summary
    after it) shows passes and no skip: under a tool that hides the device, every case skips."""
    path = tmp_path / "tool.log"
    path.write_text(log, encoding="utf-8")
    run = subprocess.run(["bash", os.path.join(BENCH, "sanitize.sh"), "--ran", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert (run.returncode == 0) == ran, run.stdout


def random_qkv(B=2, Hq=8, Hkv=2, S=384, D=64):
    """q [B, Hq, D], k and v [B, Hkv, S, D] float32, fresh random values."""
    return torch.randn(B, Hq, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)


def test_torch_qk_topn_and_decode_match_reference():
    q, k, v = random_qkv()
    lens = torch.tensor([384, 100], dtype=torch.int32)
    scores, indices, lse = baselines.torch_qk_topn(q, k, lens, 32, 0.125)
    want = reference.qk_topn(q, k, lens, 32, 0.125)
    assert torch.equal(indices.int(), want[1])
    torch.testing.assert_close(scores, want[0])
    torch.testing.assert_close(lse, want[2])
    torch.testing.assert_close(baselines.torch_decode(q, k, v, lens, 32, 0.125),
                               reference.decode_attention(q, k, v, lens, 32, 0.125))


@pytest.mark.parametrize("Hq, Hkv", [(8, 2), (9, 3), (4, 4)])
def test_torch_qk_topn_group_matches_reference(Hq, Hkv):
    """The group_select baseline (the group's mass Σ_h exp(s_h − lse_h), topk per KV head)
    selects what the reference's group_select does, a length below S among the sequences."""
    q, k, _ = random_qkv(Hq=Hq, Hkv=Hkv)
    lens = torch.tensor([384, 100], dtype=torch.int32)
    scores, indices, lse = baselines.torch_qk_topn_group(q, k, lens, 32, 0.125)
    want = reference.qk_topn(q, k, lens, 32, 0.125, group_select=True)
    assert torch.equal(indices.int(), want[1])
    torch.testing.assert_close(scores, want[0])
    torch.testing.assert_close(lse, want[2])


@pytest.mark.parametrize("chunk", [128, 384, 4096])
def test_dense_baselines_are_exact_attention(chunk):
    q, k, v = random_qkv()
    S = k.shape[2]
    lens = torch.full((2,), S, dtype=torch.int32)
    want = reference.decode_attention(q, k, v, lens, S)  # every key picked: exact attention
    torch.testing.assert_close(baselines.split_kv_attention(q, k, v, chunk), want)
    torch.testing.assert_close(baselines.dense_attention(q, k, v), want)


def test_split_kv_refuses_uneven_chunks():
    with pytest.raises(ValueError, match="multiple of chunk"):
        baselines.split_kv_attention(*random_qkv(S=300), chunk=128)


@pytest.mark.parametrize("skip, chunk", [((4, 7), 4096), ((0, 0), 100)])
@pytest.mark.parametrize("bits", [2, 4])
def test_torch_lowbit_tail_matches_reference(bits, skip, chunk):
    """The tail's PyTorch way against the reference: selected rows (padding among them), skipped
    first and last keys and lengths below S left out; in chunks of fewer keys than S (the last
    one shorter), and where no key is skipped (padding leaves key 0 in)."""
    q, k, v = random_qkv()
    lens = torch.tensor([384, 100], dtype=torch.int32)
    every, lse = reference.qk_scores(q, k, lens, 0.125)  # [B, Hq, S], [B, Hq]
    indices = reference.qk_topn(q, k, lens, 32, 0.125)[1]  # [B, Hq, 32]
    indices[:, :, -3:] = -1  # padding
    codes, meta = reference.quantize_rows(v, bits)
    want = reference.lowbit_tail(every, lens, lse, indices, codes, meta, bits, *skip)
    torch.testing.assert_close(
        baselines.torch_lowbit_tail(every, lens, lse, indices, codes, meta, bits, skip, chunk),
        want)


def test_torch_qk_topn_past_the_keys_selects_them_all():
    """N above S: both selection baselines pick every key, min(N, S) of them (the reference
    pads its N entries past them), with their scores and lse."""
    q, k, _ = random_qkv(S=96)
    lens = torch.full((2,), 96, dtype=torch.int32)
    for fn, group_select in ((baselines.torch_qk_topn, False),
                             (baselines.torch_qk_topn_group, True)):
        scores, indices, lse = fn(q, k, lens, 200, 0.125)
        want_scores, want, want_lse = reference.qk_topn(q, k, lens, 200, 0.125,
                                                        group_select=group_select)
        assert indices.shape == (2, 8, 96) and (want[..., 96:] == -1).all()
        order, want_order = indices.argsort(-1), want[..., :96].long().argsort(-1)
        assert torch.equal(indices.gather(-1, order).int(), want.gather(-1, want_order))
        torch.testing.assert_close(scores.gather(-1, order), want_scores.gather(-1, want_order))
        torch.testing.assert_close(lse, want_lse)


def test_dense_candidates_each_run_their_own_backend(monkeypatch):
    """dense_candidates: SDPA restricted to each fused back-end under its own name (each
    candidate its own back-end, not the last one's), and split_kv at batch 1 only; each is
    exact attention (sdpa_kernel recorded rather than entered)."""
    used = []
    monkeypatch.setattr(baselines, "sdpa_kernel",
                        lambda backend: used.append(backend) or contextlib.nullcontext())
    q, k, v = random_qkv(B=1, S=256)
    want = reference.decode_attention(q, k, v, torch.full((1,), 256, dtype=torch.int32), 256)
    found = baselines.dense_candidates(1)
    assert list(found) == [*baselines.SDPA_BACKENDS, "split_kv"]
    for fn in found.values():
        torch.testing.assert_close(fn(q, k, v), want)
    assert used == list(baselines.SDPA_BACKENDS.values())
    assert list(baselines.dense_candidates(2)) == list(baselines.SDPA_BACKENDS)


def test_short_kernel_names():
    """A kernel's name without "void " and its argument list (parentheses inside it and in its
    template arguments kept), cut to the width with "..."; copies as named."""
    assert profile_step.short_name("void ns::qk_select<float, 64>(float const*, int*)") == \
        "ns::qk_select<float, 64>"
    assert profile_step.short_name("void k<(int)4>(void (*)(int), at::Tensor)") == "k<(int)4>"
    assert profile_step.short_name("Memcpy DtoD (Device -> Device)") == \
        "Memcpy DtoD (Device -> Device)"
    assert profile_step.short_name("x" * 120) == "x" * 120
    assert profile_step.short_name("x" * 121) == "x" * 117 + "..."


def test_kernel_times_are_per_step_device_activity(monkeypatch):
    """kernel_times (on a fake profiler): each kernel's device µs and launches summed over the
    steps and divided by them; host events left out; no device event at all is an error."""
    from torch.autograd import DeviceType
    events = []

    class Profile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return events

    def event(name, us, device=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))

    def step():
        events.extend([event("qk", 10.0), event("qk", 6.0), event("attn", 5.0),
                       event("aten::mm", 100.0, DeviceType.CPU)])
    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert profile_step.kernel_times(step, 2) == {"qk": (16.0, 2.0), "attn": (5.0, 1.0)}
    events.clear()
    with pytest.raises(RuntimeError, match="recorded no device activity"):
        profile_step.kernel_times(lambda: None, 2)


def test_profile_rows_are_each_kernels_share_and_the_time_between(monkeypatch):
    """profile_torch (its steps, kernel times and graph timing faked): a row per kernel, the
    longest first, with its share of the kernels' sum; then the sum beside the step timed whole,
    the difference being the time between the kernels."""
    rows = []

    class Recorder:
        def __init__(self, *args, **meta):
            pass

        def add(self, **fields):
            rows.append(fields)

        def done(self):
            rows.append("done")
    monkeypatch.setattr(timing, "Recorder", Recorder)
    monkeypatch.setattr(profile_step, "warmed_up", lambda variants, S, B, n: {"per_head": None})
    monkeypatch.setattr(profile_step, "kernel_times", lambda step, steps: {
        "b": (5.0, 1.0), "void a<int>(float*)": (15.0, 2.0)})
    monkeypatch.setattr(timing, "time_us", lambda step, sets: (30.0, "graph"))
    profile_step.profile_torch(argparse.Namespace(out=None, shape=[(64, 2)], n=8, steps=3,
                                                  variant=["per_head"]))
    where = {"S": 64, "B": 2, "variant": "per_head"}
    assert rows == [{**where, "kernel": "a<int>", "us": 15.0, "launches": 2.0,
                     "pct_of_kernels": 75.0},
                    {**where, "kernel": "b", "us": 5.0, "launches": 1.0, "pct_of_kernels": 25.0},
                    {**where, "kernel": "(all kernels)", "us": 20.0, "launches": 3.0,
                     "step_us": 30.0, "timed": "graph", "between_kernels_us": 10.0}, "done"]


def test_profile_variants_run_in_their_order_after_a_warm_up(monkeypatch):
    """warmed_up builds the variants asked for in VARIANTS' order, however given, and runs each
    step WARMUP times."""
    calls = []
    monkeypatch.setattr(profile_step, "build", lambda variants, S, B, n: {
        v: functools.partial(calls.append, v) for v in variants})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    steps = profile_step.warmed_up(["per_head", "group_select"], 64, 2, 8)
    assert list(steps) == ["group_select", "per_head"]
    assert calls == ["group_select"] * profile_step.WARMUP + ["per_head"] * profile_step.WARMUP


def test_profile_dry_run_counts_each_variants_device_bytes(monkeypatch, capsys):
    """The profile's dry run: K alone for the op-level variants, and with the default layer its
    V on the device and the layer's own bytes besides."""
    shape = (32768, 8)
    kv = shape[1] * profile_step.Hkv * shape[0] * profile_step.D * 2  # bf16 K
    layer = decode_steps.default_layer_bytes(shape[1], profile_step.Hq, profile_step.Hkv,
                                             shape[0], profile_step.D, torch.bfloat16)
    for variants, nbytes in ((["per_head"], kv), (["default", "per_head"], 2 * kv + layer)):
        monkeypatch.setattr(sys, "argv", ["profile_step.py", "--dry-run", "--shape", "32768x8",
                                          "--variant", *variants])
        profile_step.main()
        line = capsys.readouterr().out.splitlines()[-1]
        assert line.split() == [f"variants={','.join(variants)}", "S=32768", "B=8",
                                f"bytes={nbytes / 2**30:.2f}GiB"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA device")
@pytest.mark.parametrize("script", ["gpu_qk_topn.py", "gpu_gather.py", "gpu_decode_attn.py",
                                    "profile_step.py"])
def test_gpu_benchmarks_without_a_gpu_say_so(script):
    """A GPU benchmark run for real where torch sees no CUDA device: a usage error that says
    what runs where (it was torch's traceback, "Found no NVIDIA driver"), before any work."""
    run = subprocess.run([sys.executable, os.path.join(BENCH, script)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.splitlines()[-1].endswith(
        "error: this benchmark needs a CUDA GPU, and torch sees none: --dry-run prints its plan "
        "anywhere; bash bench/run_gpu.sh runs it on a GPU machine"), run.stderr


def test_cpu_ops_bench_prints_every_row(tmp_path):
    """bench/cpu_ops.py (make bench-cpu) at a tiny size: a line for each of its four rows, and
    its JSON and table."""
    run = subprocess.run([sys.executable, os.path.join(BENCH, "cpu_ops.py"), "--batch", "1",
                          "--tokens", "256", "--dtypes", "bfloat16", "--runs", "1", "--out",
                          str(tmp_path), "--rotate-mib", "8"], capture_output=True, text=True,
                         timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ops = [line.split()[0] for line in run.stdout.splitlines()[1:]]
    assert ops == ["qk_topn", "decode", "tail", "default"], run.stdout
    table = (tmp_path / "cpu_ops.md").read_text(encoding="utf-8")
    assert all(f"| {op} | 1 | 256 | bfloat16 |" in table for op in ops)
    assert "Inputs rotate over 8 MiB." in table


class FakeEvent:
    """A CUDA event with nothing behind it: each pair is 1 ms apart."""

    def __init__(self, enable_timing):
        pass

    def record(self):
        pass

    def elapsed_time(self, end):
        return 1.0


def test_the_benchmarks_ceilings_are_the_bench_commands():
    """bench/timing.py measures its ceilings with kcache_ops' own functions, those the bench
    command measures at its start (it had copies of its own)."""
    from kcache_ops.throughput import ceilings
    assert timing.d2d_bandwidth_gbs is ceilings.d2d_bandwidth_gbs
    assert timing.h2d_bandwidth_gbs is ceilings.h2d_bandwidth_gbs


@pytest.mark.parametrize("sizes, llc", [(["48K", "2048K", "491520K"], 491520 << 10),
                                         (["1G", "32K", "64M"], 1 << 30),
                                         (["32K", "96M", "1M"], 96 << 20), (["", "x"], 0)])
def test_cpu_ops_inputs_rotate_past_the_last_level_cache(tmp_path, monkeypatch, sizes, llc):
    """bench/cpu_ops.py reads the largest cache from sysfs' sizes (K, M or G; a size it cannot
    parse or a file it cannot open counts nothing) and rotates its inputs over twice that, 256 MiB
    at least."""
    files = []
    for i, size in enumerate(sizes):
        files.append(tmp_path / f"index{i}_size")
        files[-1].write_text(size + "\n")

    def glob(pattern):
        assert pattern == "/sys/devices/system/cpu/cpu0/cache/index*/size"
        return [str(f) for f in files] + [str(tmp_path / "unreadable")]  # a name with no file

    monkeypatch.setattr(cpu_ops.glob, "glob", glob)
    assert cpu_ops.last_level_cache_bytes() == llc
    assert cpu_ops.rotate_bytes() == max(256 << 20, 2 * llc)


def test_timed_runs_go_on_after_the_warm_up(monkeypatch):
    """bench/cpu_ops.py and bench/timing.py (its launch timing, on fake events) time the inputs
    after the warm-up's, not the ones it just left in the cache."""
    calls = []
    assert cpu_ops.median_ms(calls.append, [(0,), (1,), (2,)], runs=3, warmup=2) >= 0
    assert calls == [0, 1, 2, 0, 1]
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls.clear()
    assert timing._eager_us(calls.append, [(0,), (1,), (2,)], warmup=2, iters=3) == 1e3
    assert calls == [0, 1, 2, 0, 1]


class FakeGraph:
    """A CUDA stream or graph with nothing behind it."""

    def wait_stream(self, other):
        pass

    def replay(self):
        pass


def test_graph_timing_is_per_captured_call(monkeypatch):
    """bench/timing.py's graph timing (on fake streams, graphs and events): the calls captured are
    GRAPH_CALLS (8) rounded up to whole rounds of the 3 input sets, 9, after the warm-up's, and a
    replay's time (1 ms a pair of fake events) is divided among them: 1000 / 9 µs a call."""
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", FakeGraph)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeGraph)
    monkeypatch.setattr(torch.cuda, "stream", lambda side: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    calls = []
    assert timing._graph_us(calls.append, [(0,), (1,), (2,)], warmup=2, iters=3) == 1e3 / 9
    assert calls == [0, 1] + [0, 1, 2] * 3


def test_torch_gather_rows_is_a_copy():
    src = torch.randn(2, 3, 50, 16)
    indices = torch.randint(0, 50, (2, 9, 7), dtype=torch.int32)
    assert torch.equal(baselines.torch_gather_rows(src, indices),
                       reference.gather_rows(src, indices))


def test_decode_steps_split_into_their_parts():
    """The op-level step is its qk_topn and its sparse_attn_v; the default layer step
    (KCache.decode) is its host part and its low-bit tail with the hot rows, each called alone."""
    B, Hq, Hkv, S, D = 2, 8, 2, 256, 64
    G = Hq // Hkv
    sets = [(torch.randn(B, Hq, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D))
            for _ in range(2)]
    q, k, v = sets[0]
    lens = torch.full((B,), S, dtype=torch.int32)
    for group_select, tail in decode_steps.MODES:
        step = decode_steps.OpStep(v, lens, 64, group_select, tail, torch.randn(B, Hkv, D))
        selection = step.select(q, k)
        assert torch.equal(step(q, k), step.attend(*selection))
        indices = selection[1]  # [B, Hq, 64]
        distinct = sum(len(set(indices[b, h * G:(h + 1) * G].flatten().tolist()))
                       for b in range(B) for h in range(Hkv))  # rows of a group's heads, once
        assert decode_steps.host_row_bytes(indices, v) == distinct * D * 4
        assert distinct == B * Hkv * 64 if group_select else distinct > B * Hkv * 64
    layer = decode_steps.DefaultLayer(sets)
    i, q, _, _ = layer.inputs[1]
    out = layer.cache.decode(*layer.inputs[1])  # [B, Hq, D]
    scores, indices, lse = layer.select(i, q)
    picked = layer.qk_topn(i, q)[1]  # [B, Hq, 64]: the cold rows only, before the top_p cut
    assert indices.shape == picked.shape == (B, Hq, 64)
    assert ((picked >= 4) & (picked < S - 60)).all()  # sinks 4, window 60: never a hot row
    tail_args = layer.tail_args(i, q)  # (every score of the step, ...)
    host = layer.attend_host(i, scores, indices, lse)  # [B, Hq, D]
    parts = host + layer.lowbit_tail(*tail_args)  # the hot rows in lowbit_tail's call
    torch.testing.assert_close(parts, out)
    assert layer.device_bytes_beside_k() == decode_steps.default_layer_bytes(
        B, Hq, Hkv, S, D, torch.float32) - k.nbytes


def test_decode_bench_rotates_the_tail_by_its_own_bytes():
    """bench/gpu_decode_attn.py counts the bytes lowbit_tail reads (every score, the codes and
    meta, the hot rows) as the tensors of its arguments hold them, and rotates copies of them
    beyond L2 (the K and V sets, ten times its bytes each, are too few for it)."""
    B, S = 2, 512
    c = gpu_decode_attn.configs(argparse.Namespace(seq=[S], batch=[B]))[0]
    sets = [(torch.randn(B, gpu_decode_attn.Hq, gpu_decode_attn.D, dtype=torch.bfloat16),
             torch.randn(B, gpu_decode_attn.Hkv, S, gpu_decode_attn.D, dtype=torch.bfloat16),
             torch.randn(B, gpu_decode_attn.Hkv, S, gpu_decode_attn.D, dtype=torch.bfloat16))]
    layer = decode_steps.DefaultLayer(sets)
    every, _, _, _, codes, meta, _, _, hot = args = layer.tail_args(0, sets[0][0])
    read = every.nbytes + codes.nbytes + meta.nbytes + hot[0].nbytes + hot[1].nbytes
    assert abs(c["tail_bytes"] - read) < read / 100
    for c in gpu_decode_attn.configs(argparse.Namespace(seq=[4096, 131072], batch=[1, 32])):
        sets = timing.rotations(c["tail_bytes"])
        assert sets * c["tail_bytes"] > 60 << 20  # past an H200's L2 (60 MB) at every size run
        assert sets >= timing.rotations(2 * c["kv_bytes"])
    copy = gpu_decode_attn.cloned(args)
    for mine, theirs in zip((copy[0], copy[4], copy[8][0]), (every, codes, hot[0])):
        assert torch.equal(mine, theirs) and mine.data_ptr() != theirs.data_ptr()


def test_decode_bench_gives_each_graph_call_its_own_query():
    """fresh_queries: at least GRAPH_CALLS calls, each with its own query and the same K and V
    (the op-level step's (q, k, v) and the layer step's (layer, q, new k, new v))."""
    k, v = torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8)
    calls = gpu_decode_attn.fresh_queries([(torch.randn(2, 4, 8), k, v)], 0)
    assert len(calls) == timing.GRAPH_CALLS
    assert all(c[1] is k and c[2] is v for c in calls)
    assert len({c[0].sum().item() for c in calls}) == len(calls)  # fresh, not one query again
    layer_inputs = [(i, torch.randn(2, 4, 8), k, v) for i in range(10)]  # (layer, q, k, v)
    calls = gpu_decode_attn.fresh_queries(layer_inputs, 1)
    assert [c[0] for c in calls] == list(range(10)) and calls[3][2] is k


def test_decode_bench_floor_is_the_bytes_at_the_ceilings_in_series():
    """floor_fields: the device bytes at the device copy's rate plus the host rows at the pinned
    copy's, in µs, and the step's ratio to that."""
    fields = gpu_decode_attn.floor_fields(4e9, 5e8, 3000.0, (4000.0, 50.0))  # bytes, µs, GB/s
    assert fields == {"floor_us": 1000.0 + 10000.0, "ratio_vs_floor": 3000.0 / 11000.0}


def test_decode_bench_rates_are_of_their_own_ceilings():
    """rates: qk_topn's K bytes a µs against the device copy, sparse_attn_v's host rows against
    the pinned host->device copy (1e9 B in 1000 µs: 1000 GB/s, a third of a 3000 GB/s device
    copy; 5e8 B in 10000 µs: 50 GB/s, all of a 50 GB/s host copy)."""
    fields = gpu_decode_attn.rates(1e9, 1000.0, 5e8, 10000.0, (3000.0, 50.0))
    assert fields == pytest.approx({"qk_topn_GBs": 1000.0, "qk_topn_pct_d2d": 100 / 3,
                                    "host_MiB": 5e8 / 2**20, "sparse_attn_v_GBs": 50.0,
                                    "sparse_attn_v_pct_h2d": 100.0})


def test_gather_bench_rates_its_time_against_the_ceiling_memcpy_and_torch(monkeypatch):
    """bench/gpu_gather.py's row (on faked timings): 256 KiB gathered in 10 µs is 26.2 GB/s, 52 %
    of a 50 GB/s ceiling; a memcpy of the same bytes in 8 µs makes it 80 % of the memcpy, and the
    PyTorch way in 25 µs 2.5x slower."""
    us = {kcache_ops.gather_rows: 10.0, baselines.torch_gather_rows: 25.0}
    monkeypatch.setattr(timing, "time_us", lambda fn, sets, *a, **k: (us[fn], "graph"))
    monkeypatch.setattr(gpu_gather, "memcpy_us", lambda pinned, nbytes: 8.0)
    rows = []
    rec = SimpleNamespace(meta={"h2d_ceiling_GBs": 50.0}, add=lambda **row: rows.append(row))
    c = {"bytes": 2 * 8 * 64 * 256, "row_bytes": 256, "rows": 64}  # B x H heads of 64 rows
    gpu_gather.add_row(rec, c, [], "pinned", {"host_GiB": 0.5, "buffers": 1}, None)
    (row,) = rows
    assert {k: row[k] for k in ("us", "GBs", "pct_ceiling", "memcpy_us", "pct_memcpy_same_bytes",
                                "torch_us", "speedup_vs_torch")} == pytest.approx(
        {"us": 10.0, "GBs": 262144 / 10 / 1e3, "pct_ceiling": 100 * 26.2144 / 50,
         "memcpy_us": 8.0, "pct_memcpy_same_bytes": 80.0, "torch_us": 25.0,
         "speedup_vs_torch": 2.5})


def test_gather_bench_footprint_rows_rotate_past_l2(monkeypatch):
    """bench/gpu_gather.py's footprint rows rotate as many sets of 4 MiB as its other rows (a
    round past L2; 8 sets were 32 MiB, under it), set i from buffer i % buffers."""
    monkeypatch.setattr(gpu_gather, "index_sets", lambda S, n, count: [
        torch.zeros(gpu_gather.B, gpu_gather.H, n, dtype=torch.int32) for _ in range(count)])
    sets = gpu_gather.footprint_sets(8, 8, lambda shape: torch.empty(shape, device="meta"))
    set_bytes = gpu_gather.B * gpu_gather.H * 1024 * 256
    assert len(sets) == timing.rotations(set_bytes) and len(sets) * set_bytes > 60 << 20
    srcs = [src for src, _ in sets]
    assert srcs[0].shape == (gpu_gather.B, gpu_gather.H, (1 << 30) // (set_bytes // 1024), 128)
    assert all(srcs[i] is srcs[i % 8] for i in range(len(sets)))
    assert len({id(src) for src in srcs}) == 8


def test_host_row_bytes_reads_as_the_kernel_does():
    """The decode benchmark's host bytes: a slice of a group's heads (4, or 8 for groups past 4)
    reads each distinct row once where its entries fit the union (heads x N <= 2048) or its heads
    share their rows, and every valid entry otherwise; a benchmark's rotated sets, on average."""
    row = 4 * 4  # D = 4 float32
    v = torch.zeros(1, 2, 10, 4)  # [B, Hkv, S, D]
    ix = torch.tensor([[[0, 1], [1, 2], [5, -1], [5, 6]]], dtype=torch.int32)  # [1, 4, 2]: G = 2
    assert decode_steps.host_row_bytes(ix, v) == (3 + 2) * row
    v = torch.zeros(1, 1, 512, 4)  # G = 16: two slices of 8 heads
    for n in (200, 300):
        ix = torch.stack([torch.randperm(400)[:n] for _ in range(16)])[None].int()  # [1, 16, n]
        union = sum(len(set(ix[0, s:s + 8].flatten().tolist())) for s in (0, 8))
        assert decode_steps.host_row_bytes(ix, v) == (union if n == 200 else 16 * n) * row
        shared = ix[:, :1].expand(1, 16, n)  # group_select: every head the same rows
        assert decode_steps.host_row_bytes(shared, v) == 2 * n * row
        assert decode_steps.mean_host_row_bytes([ix, shared], v) == (
            decode_steps.host_row_bytes(ix, v) + 2 * n * row) / 2  # over the rotated sets


def test_step_ops_count_the_launches_of_a_decode_step():
    """bench/step_ops.py records the ops that are not views, each at its line of the cache: the
    paper-literal step is its appends and its two kernels; the default step runs all four of the
    library's kernels and does not recompute the hot rows' positions (it reads them)."""
    from kcache_ops.caches import KCacheOptions

    literal = step_ops.step_ops(1, 128, "cpu", KCacheOptions.paper_literal())
    assert [op for _, op in literal if op.startswith("kcache_ops::")] == [
        "kcache_ops::qk_topn", "kcache_ops::sparse_attn_v"]
    assert all(site.split()[0].startswith("kcache.py:") or op.startswith("kcache_ops::")
               for site, op in literal)
    default = step_ops.step_ops(1, 128, "cpu", KCacheOptions())
    sites = {site for site, _ in default}
    kernels = {op for _, op in default if op.startswith("kcache_ops::")}
    assert kernels == {"kcache_ops::qk_topn", "kcache_ops::sparse_attn_v",
                       "kcache_ops::lowbit_tail", "kcache_ops::quantize_rows"}
    assert "(outside the cache)" not in sites
    assert not any(site.endswith(" positions") for site in sites)


def test_step_reuse_counts_the_rows_of_the_steps_before():
    """bench/step_reuse.py: a step reads the union of its group's heads' top N cold rows; a hit
    is a row one of the W steps before read too, and a cache of those steps holds their
    distinct rows."""
    k = torch.eye(12)[None, :10]  # [Hkv=1, T=10, D=12]: key j points along axis j
    q = torch.eye(12)[[5, 7]][:, None]  # [Hq=2, Q=1, D]: head 0 likes key 5, head 1 key 7
    reads = step_reuse.step_reads(q, k, 1, sinks=0, window=0)  # [1, 1, 10]
    assert reads[0, 0].nonzero().flatten().tolist() == [5, 7]
    assert not step_reuse.step_reads(q, k, 1, sinks=6, window=0)[0, 0, 5]  # a sink: not cold
    sets = [{0, 1}, {1, 2}, {2, 3}, {0, 3}]  # the rows of 4 consecutive steps
    reads = torch.zeros(1, 4, 6, dtype=torch.bool)  # [Hkv, Q, T]
    for i, rows in enumerate(sets):
        reads[0, i, list(rows)] = True
    assert step_reuse.reuse(reads, 1) == (3, 6, 6)  # each step shares one row with the last
    assert step_reuse.reuse(reads, 2) == (2, 4, 6)  # steps 2 and 3 against the two before


def caches_made(module, monkeypatch):
    """The caches ``module`` makes from now on, in order."""
    made = []

    def make_cache(*args):
        made.append(module_make_cache(*args))
        return made[-1]
    module_make_cache = module.make_cache
    monkeypatch.setattr(module, "make_cache", make_cache)
    return made


def test_reuse_step_times_steps_that_advance(monkeypatch):
    """bench/reuse_step.py on the CPU at a tiny context: the timed steps record nothing (the
    counting ops are not the step's); an untimed replay counts them. With a pool the steps find
    rows there and move fewer host bytes than without, and both count distinct rows per KV head:
    the pool's misses are (1 - hit rate) of what reuse 0 reads, below every head's rows."""
    from kcache_ops.caches import KCacheOptions

    made = caches_made(reuse_step, monkeypatch)
    a = SimpleNamespace(warm=2, steps=3, drift=0.5)
    run = ("cpu", torch.float32, 1, 300, 1)
    assert reuse_step.timed_steps(*run, KCacheOptions(reuse=512), a) > 0
    assert made[0].record_mass is False and made[0].rows_read().isnan().all()
    plain = reuse_step.counted_steps(*run, KCacheOptions(), a)
    pooled = reuse_step.counted_steps(*run, KCacheOptions(reuse=512), a)
    assert plain[0] is None and 0 < pooled[0] <= 1
    row = reuse_step.D * 4  # float32 bytes of a V row
    written = reuse_step.Hkv * row  # the new token's rows
    every_head = reuse_step.Hq * KCacheOptions().topn * row + written
    assert pooled[1] < plain[1] < every_head
    assert pooled[1] - written == pytest.approx((1 - pooled[0]) * (plain[1] - written))


def test_reuse_step_writes_its_json(tmp_path, monkeypatch):
    """bench/reuse_step.py writes one row per configuration to --out, none with --no-save."""
    argv = ["reuse_step.py", "--device", "cpu", "--batch", "1", "--context", "200", "--pools",
            "2", "--layers", "1", "--steps", "2", "--warm", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    reuse_step.main()
    data = json.loads((tmp_path / "reuse_step.json").read_text(encoding="utf-8"))
    assert [(r["B"], r["C"]) for r in data["rows"]] == [(1, 0), (1, 512)]
    assert data["rows"][0]["hit_rate"] is None and 0 < data["rows"][1]["hit_rate"] <= 1
    assert data["settings"]["context"] == 200 and data["machine"]["device"] == "cpu"
    monkeypatch.setattr(sys, "argv", [*argv, "--no-save", "--out", str(tmp_path / "none")])
    reuse_step.main()
    assert not (tmp_path / "none").exists()


def test_reuse_hits_times_a_pass_that_records_nothing(tmp_path, monkeypatch):
    """bench/reuse_hits.py (a random tiny model): the counts come from one pass, the time from a
    second that records nothing, both with the logits of reuse 0; its JSON has a row per N and C."""
    from kcache_ops.throughput.shapes import SHAPES, random_model

    torch.manual_seed(0)
    model = random_model(SHAPES["tiny"], "cpu", torch.float32)
    monkeypatch.setattr(reuse_hits, "load_model", lambda **_: (model, None))
    monkeypatch.setattr(reuse_hits, "prompt_ids", lambda *_: (list(range(1, 41)), 0))
    made = caches_made(reuse_hits, monkeypatch)
    monkeypatch.setattr(sys, "argv", ["reuse_hits.py", "--queries", "6", "--warm", "2", "--n",
                                      "4", "--pools", "1", "--window", "4", "--threads", "1",
                                      "--out", str(tmp_path)])
    reuse_hits.main()
    assert len(made) == 4  # C = 0 and C = 8: a counted pass, then a timed one
    for counted, timed in (made[:2], made[2:]):
        assert counted.rows_read().isfinite().all()
        assert not timed.record_mass and timed.rows_read().isnan().all()
    rows = json.loads((tmp_path / "reuse_hits.json").read_text(encoding="utf-8"))["rows"]
    assert [(r["N"], r["C"]) for r in rows] == [(4, 0), (4, 8)]
    assert rows[0]["hit_rate"] is None and 0 <= rows[1]["hit_rate"] <= 1
    assert all(r["logits_equal"] and r["ms_per_step"] > 0 for r in rows)


def test_step_reuse_writes_its_json(tmp_path, monkeypatch):
    """bench/step_reuse.py writes one row per N and W, the hit rate of each layer in it."""
    k = torch.eye(12)[None, :10]  # [Hkv=1, T=10, D=12]
    q = torch.eye(12)[[5, 7, 5]][:, None].repeat(1, 3, 1)  # [Hq=3, Q=3, D]
    config = SimpleNamespace(num_kv_heads=1)
    monkeypatch.setattr(step_reuse, "essay_queries",
                        lambda a: iter([("short", config, [q, q], [k, k], None, range(10))]))
    monkeypatch.setattr(sys, "argv", ["step_reuse.py", "--queries", "3", "--n", "1", "--w", "1",
                                      "--sinks", "0", "--window", "0", "--out", str(tmp_path)])
    step_reuse.main()
    rows = json.loads((tmp_path / "step_reuse.json").read_text(encoding="utf-8"))["rows"]
    assert [(r["N"], r["W"], r["hit_rate"]) for r in rows] == [(1, 1, 1.0)]
    assert rows[0]["layer_hit_rates"] == [1.0, 1.0] and rows[0]["rows_held"] == 2.0
