"""The throughput benchmark's machinery on the CPU at tiny sizes (``bench --device cpu --small``),
transformers' comparison included where it is installed."""
import argparse
import dataclasses
import functools
import json
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from kcache_ops import results
from kcache_ops.__main__ import main
from kcache_ops.caches import KCacheOptions
from kcache_ops.cli import bench
from kcache_ops.throughput import ceilings, measure, transformers_baseline
from kcache_ops.throughput import report as throughput_report
from kcache_ops.throughput.report import bench_section


def bench_parser():
    """The `bench` command's argument parser."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser


def cpu_ceilings(device):
    """measure_ceilings on a machine with no host-to-device copy to measure."""
    return {"device_copy_GBs": 1.0, "h2d_GBs": None}


def test_bench_small_on_cpu(tmp_path, monkeypatch):
    """A smoke run with no --out writes to the scratch folder (here tmp_path), never over the
    committed results."""
    monkeypatch.setattr(results, "SMOKE_DIR", str(tmp_path))
    parser = bench_parser()
    bench.run(parser.parse_args(["--device", "cpu", "--small", "--steps", "2"]))
    data = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    rows = {(r["context"], r["backend"]): r for r in data["rows"]}
    assert data["small"] and rows
    for (context, backend), r in rows.items():
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        if backend == "kcache":
            assert r["host_bytes"] > 0 and r["pcie_bytes_per_step"] > 0
            dense = rows.get((context, "dense"))
            if dense:  # K only on the device: at least as many sequences fit the same budget
                assert r["batch"] >= dense["batch"] and r["cache_device_bytes"] <= r["budget_bytes"]
        else:
            assert r["host_bytes"] == 0
            assert "hf_decode_tok_s" in r or "transformers" not in data["machine"]
    assert all(r["batch_limit"] in ("device", "host", "cap") for r in rows.values())  # no OOM
    assert all(r["decode_timed"] == "eager" for r in rows.values())  # no graphs on the CPU
    assert data["complete"]
    assert "cut off" not in (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert (tmp_path / "bench_throughput.png").is_file()
    report = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert "## Throughput (reference decoder, random weights)" in report
    assert "KCache options: topn=64, group_select=False" in report
    assert f"| {rows[256, 'kcache']['batch']} ({rows[256, 'kcache']['batch_limit']}) |" in report


def test_bench_small_through_transformers(tmp_path):
    """--engine transformers: the same caches under transformers' model code of the same shapes
    give the same batches, memory and PCIe bytes per step (they depend on the cache alone)."""
    parser = bench_parser()
    runs = {}
    for engine in ("kcache_ops", "transformers"):
        out = tmp_path / engine
        bench.run(parser.parse_args(["--device", "cpu", "--small", "--steps", "2", "--no-hf",
                                     "--contexts", "256", "--engine", engine, "--out", str(out)]))
        data = json.loads((out / "bench.json").read_text(encoding="utf-8"))
        assert data["machine"]["engine"] == engine
        runs[engine] = {r["backend"]: r for r in data["rows"]}
    assert set(runs["transformers"]) == {"dense", "kcache"}
    for backend, ours in runs["kcache_ops"].items():
        theirs = runs["transformers"][backend]
        for key in ("batch", "cache_device_bytes", "host_bytes", "pcie_bytes_per_step"):
            assert theirs[key] == ours[key], (backend, key)
        assert theirs["decode_tok_s"] > 0


@pytest.mark.parametrize("argv, steps", [(["--small"], 8), (["--small", "--steps", "12"], 12),
                                         (["--budget", "1"], 32),
                                         (["--budget", "1", "--steps", "40"], 40)])
def test_steps_given_are_the_steps_timed(argv, steps, tmp_path, monkeypatch):
    """--small times 8 steps unless --steps says otherwise (it capped a given --steps at 8)."""
    timed = []

    def measure_only_steps(*args, **kwargs):
        timed.append(args[5])
        raise KeyboardInterrupt  # stop before anything runs
    monkeypatch.setattr(bench, "measure", measure_only_steps)
    parser = bench_parser()
    with pytest.raises(KeyboardInterrupt):
        bench.run(parser.parse_args(["--device", "cpu", "--out", str(tmp_path), *argv]))
    assert timed == [steps]


def test_steps_are_timed_by_their_median():
    """A decode step is timed as the median of its runs (DESIGN.md §6), so one slow run (a
    host hiccup) does not move it; every run is called once."""
    from kcache_ops.devices import median_seconds
    pauses = iter([0.001, 0.2, 0.001, 0.002, 0.001])
    seconds = median_seconds(torch.device("cpu"), lambda: time.sleep(next(pauses)), 5)
    assert 0.001 <= seconds < 0.05
    assert next(pauses, None) is None


def test_the_median_of_the_runs_is_returned(monkeypatch):
    """median_seconds on the CPU: each run on the host clock, the median of them returned (not
    the least, the mean or the last), on a clock that is read, not slept on."""
    import statistics
    from kcache_ops import devices
    durations = [9.0, 1.0, 4.0, 100.0, 2.0]  # the median neither the first, last, least nor mean
    runs = len(durations)
    clock, pending = [0.0], iter(durations)

    def step():
        clock[0] += next(pending)
    monkeypatch.setattr(devices, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    seconds = devices.median_seconds(torch.device("cpu"), step, runs)
    assert seconds == pytest.approx(statistics.median(durations)), (durations, seconds)
    assert next(pending, None) is None, "a run was not called"


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_a_batch_the_step_cannot_hold_backs_off(monkeypatch, error):
    """Where the fitted batch runs the device out of memory in the step (its transient memory is
    not in the fit), or a cache refuses more than the memory holds (MemoryError: it ended the
    run), the batch backs off by 1/8 until it runs, and the row says "memory" set it; where not
    even one sequence runs, the configuration is left out. (The error is raised here by a
    wrapper: a CPU cannot run out of device memory.)"""
    ceiling = {"dense": 3, "kcache": 0}  # the largest batch each backend's step holds
    real = measure.time_decode

    def time_decode(model, backend, options, batch, context, steps):
        if batch > ceiling[backend]:
            raise error(f"CUDA out of memory asking for batch {batch}")
        return real(model, backend, options, batch, context, steps)

    monkeypatch.setattr(measure, "time_decode", time_decode)
    lines = []
    rows = measure.measure(["tiny"], [64], torch.device("cpu"), torch.float32,
                           KCacheOptions(topn=8), 2, budget_gb=0.01, max_batch=8, hf=False,
                           log=lines.append)
    assert [(r["backend"], r["batch"], r["batch_limit"]) for r in rows] == [("dense", 3, "memory")]
    assert "tiny          ctx     64 dense : out of memory at batch 8 (CUDA out of memory asking " \
           "for batch 8); trying 7" in lines
    assert "tiny          ctx     64 kcache: one sequence does not fit the memory" in lines


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_a_prefill_past_the_memory_leaves_its_configuration_out(monkeypatch, error):
    """A prefill of one sequence that runs out of memory (its activations are in no budget)
    leaves that configuration out with a line saying so, and the run goes on (it ended the run
    with a traceback); the other backend's row is measured."""
    real = measure.time_prefill

    def time_prefill(model, backend, options, context):
        if backend == "dense":
            raise error("CUDA out of memory. Tried to allocate 8.00 GiB\nmore")
        return real(model, backend, options, context)

    monkeypatch.setattr(measure, "time_prefill", time_prefill)
    lines = []
    rows = measure.measure(["tiny"], [64], torch.device("cpu"), torch.float32,
                           KCacheOptions(topn=8), 2, budget_gb=0.01, max_batch=2, hf=False,
                           log=lines.append)
    assert [(r["backend"], "vs_dense" in r) for r in rows] == [("kcache", False)]
    assert "tiny          ctx     64 dense : the prefill of one sequence runs out of memory " \
           "(CUDA out of memory. Tried to allocate 8.00 GiB); left out" in lines


def test_a_budget_past_the_memory_skips_the_model_naming_it(monkeypatch):
    """--budget above what the device has (on the CPU: the host RAM available) skips the model
    with a line naming --budget (a batch fitted to it ended the run with a cache's MemoryError
    that said to lower the batch, which the bench has no flag for); weights that do not fit the
    device skip the model too (they ended the run)."""
    def skipped(budget_gb):  # what measure logs, none of its configurations run
        lines = []
        with pytest.raises(ValueError, match="no configuration ran"):
            measure.measure(["tiny"], [64], torch.device("cpu"), torch.float32,
                            KCacheOptions(topn=8), 1, budget_gb=budget_gb, hf=False,
                            log=lines.append)
        return lines

    monkeypatch.setattr(measure, "host_bytes_available", lambda: 10**9)
    assert "# tiny: skipped: --budget 2 GB is more than the 1.000 GB the host RAM has " \
           "available (cpu); give a smaller --budget" in skipped(2)

    def no_room(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(measure, "build_model", no_room)
    assert skipped(0.5) == ["# tiny: skipped: its weights do not fit the device: CUDA out of "
                            "memory. Tried to allocate 2.00 GiB"]
    # on the CPU, weights past the host RAM available are not built (the allocator's refusal
    # was a RuntimeError: a traceback from `bench --budget 1`, whose default models are large)
    monkeypatch.setattr(measure, "build_model", lambda *args: pytest.fail("built"))
    monkeypatch.setattr(measure, "host_bytes_available", lambda: 10**6)
    assert skipped(0.0005) == ["# tiny: skipped: its weights need 0.004 GB, more than the 0.001 "
                               "GB the host RAM has available"]


def test_transformers_steps_make_no_tensor_from_host_data(monkeypatch):
    """The timed steps of transformers' decode pass their positions as slices of one device
    tensor made before timing: no step makes a tensor from host data (on a GPU each would wait
    for the stream and lose transformers' launch/compute overlap)."""
    pytest.importorskip("transformers")
    model = transformers_baseline.hf_model(measure.SHAPES["tiny"], torch.device("cpu"),
                                           torch.float32, 64)
    positions, made = [], []
    real_call, real_tensor = type(model).__call__, torch.tensor
    real_median = transformers_baseline.median_seconds

    def call(self, *args, **kwargs):
        positions.append(kwargs["cache_position"])
        return real_call(self, *args, **kwargs)

    def watched_tensor(*args, **kwargs):
        made.append(args)
        return real_tensor(*args, **kwargs)

    def timed(device, step, runs):  # torch.tensor watched while the steps are timed
        positions.clear()
        monkeypatch.setattr(torch, "tensor", watched_tensor)
        try:
            return real_median(device, step, runs)
        finally:
            monkeypatch.setattr(torch, "tensor", real_tensor)

    monkeypatch.setattr(type(model), "__call__", call)
    monkeypatch.setattr(transformers_baseline, "median_seconds", timed)
    assert transformers_baseline.time_hf(model, 2, 32, 3) > 0
    assert made == []
    # where the static cache writes: after the prefill's 16 rows and the 2 warm-up steps
    assert [p.tolist() for p in positions] == [[18], [19], [20]]
    assert len({p.untyped_storage().data_ptr() for p in positions}) == 1


@pytest.mark.parametrize("models, message", [
    ("tiny,tiny", "--models: expected each shape once, got tiny twice"),
    ("tiny,", "--models: unknown ''; known: llama3-8b"),
])
def test_models_given_twice_or_empty_are_an_error_line(models, message, capsys, tmp_path):
    """--models takes each shape once (a shape twice ran twice), as --contexts its values; an
    empty name is named as one."""
    assert main(["bench", "--small", "--models", models, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--topn", "0"], "KCache: topn must be an integer >= 1, got 0"),
    (["--models", "nope"], "--models: unknown nope"),
    (["--budget", "1000"], "--budget 1000 GB is more than the "),  # one line, not one a model
])
def test_bad_flags_are_refused_before_anything_is_made_or_measured(flags, message, capsys,
                                                                   tmp_path, monkeypatch):
    """A flag refused is an error line before the run makes its --out folder or measures its
    ceilings (a bad --topn came after both: an empty folder and a second of copying)."""
    monkeypatch.setattr(bench, "measure_ceilings", lambda device: pytest.fail("measured"))
    out = tmp_path / "new"
    assert main(["bench", "--small", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_models_may_have_spaces_after_commas(tmp_path, monkeypatch):
    """'tiny, tiny2'-style lists: the names are stripped (' tiny' was an unknown shape)."""
    monkeypatch.setitem(bench.SHAPES, "tiny2", bench.SHAPES["tiny"])
    ran = []
    monkeypatch.setattr(bench, "measure", lambda models, *a, **k: ran.append(models) or [])
    monkeypatch.setattr(throughput_report, "plot", lambda rows, path: None)
    parser = bench_parser()
    bench.run(parser.parse_args(["--small", "--models", "tiny, tiny2", "--out", str(tmp_path)]))
    assert ran == [["tiny", "tiny2"]]


def test_report_says_where_transformers_ran_out_of_memory():
    """A dense row whose transformers run ran out of device memory says so in the transformers
    column (it read "—", as where transformers is not installed)."""
    row = {"model": "tiny", "context": 256, "backend": "dense", "batch": 7, "budget_bytes": 2**22,
           "cache_device_bytes": 2**22, "host_bytes": 0, "prefill_tok_s": 1.0,
           "decode_tok_s": 1.0, "pcie_bytes_per_step": 0}
    data = {"machine": results.machine("cpu"), "command": "bench", "rows": [
        {**row, "hf_error": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"},
        {**row, "context": 512}]}
    lines = [line for line in bench_section(data) if line.startswith("| tiny |")]
    assert "| out of memory |" in lines[0] and "| — |" in lines[1]


def test_report_says_how_the_decode_steps_were_timed():
    """The report says whether a CUDA run's decode steps were graph replays or launched eagerly
    (rows written before decode_timed was recorded were all eager: an eager step of many small
    kernels times the host that launches them)."""
    row = {"model": "tiny", "context": 256, "backend": "dense", "batch": 7, "budget_bytes": 2**22,
           "cache_device_bytes": 2**22, "host_bytes": 0, "prefill_tok_s": 1.0,
           "decode_tok_s": 1.0, "pcie_bytes_per_step": 0}
    cuda = {**results.machine("cpu"), "device": "cuda"}

    def text(machine, *timed):
        rows = [{**row, **({"decode_timed": t} if t else {})} for t in timed]
        return "\n".join(bench_section({"machine": machine, "command": "bench", "rows": rows}))
    assert "each captured once in a CUDA graph" in text(cuda, "graph", "graph")
    # a device named by --device is recorded with its index
    assert "each captured once in a CUDA graph" in text({**cuda, "device": "cuda:1"}, "graph")
    for timed in [("graph", None), ("eager",)]:
        assert "**Decode steps: launched eagerly from Python**" in text(cuda, *timed)
    assert "timed on the host clock" in text(results.machine("cpu"), None)
    # the transformers column's steps are eager beside graphed ones: the report says so
    row = {**row, "hf_decode_tok_s": 2.0, "dense_vs_hf": 0.5}
    assert "each step launched eagerly from Python" in text(cuda, "graph")
    assert "each step launched eagerly from Python" not in text(results.machine("cpu"), None)


def test_report_of_a_bench_json_before_complete_was_recorded():
    """A bench.json written before ``complete`` was recorded is a whole run's: the report does not
    say it was cut off, and links its plot (bench_section's default: the plot drawn)."""
    data = results.load_json(f"{results.RESULTS_DIR}/bench.json")  # the committed run's
    del data["complete"]
    section = bench_section(data)
    assert results.CUT_OFF[0] not in section
    assert "![throughput vs context](bench_throughput.png)" in section


def test_report_settings_of_a_budget_from_the_free_memory():
    """The settings line of a run with no --budget (the free device memory after the weights
    less --reserve) and an unchecked host RAM names the reserve, and lists every context of
    every model."""
    settings = {"dtype": "bfloat16", "steps": 8, "max_batch": 256, "reserve_gb": 6.0,
                "budget_gb": None, "host_budget_bytes": None,
                "contexts": {"llama3-8b": [8192, 32768], "smollm2-135m": [2048, 4096]}}
    assert throughput_report.settings_lines(settings, None) == [
        "Settings: bfloat16, 8 timed decode steps, batch at most 256, cache budget the free "
        "device memory after the weights less 6 GB (--reserve), host RAM budget unchecked "
        "(unknown); contexts llama3-8b 8192, 32768; smollm2-135m 2048, 4096.", ""]


def test_a_reuse_pool_too_small_for_a_context_fails_before_any_measurement(monkeypatch):
    """A reuse pool below a step's rows (N = min(topn, capacity) x the GQA group) depends on the
    context: it is refused for every context before the first one is measured, not when its
    KCache is built after the dense row."""
    timed = []
    monkeypatch.setattr(measure, "time_prefill", lambda *args: timed.append(args))
    with pytest.raises(ValueError, match="reuse must hold the rows of a whole step"):
        measure.measure(["tiny"], [1, 64], torch.device("cpu"), torch.float32,
                        KCacheOptions(topn=8, group_select=True, reuse=5), 2,
                        budget_gb=0.01, hf=False, log=lambda line: None)
    assert timed == []


@pytest.fixture
def untested_transformers(monkeypatch):
    """transformers 4.44 as far as kcache_ops' integration sees (its version check runs again
    at the next import; the modules already imported come back after the test)."""
    import importlib.metadata
    import sys
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "4.44.0" if name == "transformers" else real(name))
    for name in ("kcache_ops.integrations.transformers",
                 "kcache_ops.integrations.transformers_engine"):
        if name in sys.modules:
            monkeypatch.delitem(sys.modules, name)


def test_an_untested_transformers_skips_the_comparison(untested_transformers, tmp_path, capsys):
    """transformers outside the tested range: the comparison is skipped with a line saying why,
    before the measurement, and the run completes (it measured, then failed on an ImportError,
    leaving no report); its version is not recorded, as no row ran on it. --engine transformers
    is an error line before anything is measured."""
    argv = ["bench", "--small", "--contexts", "64", "--steps", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "# the transformers comparison is skipped: kcache_ops.integrations.transformers is " \
           "tested with transformers>=5.17,<6, but transformers 4.44.0 is installed" in out
    assert out.index("comparison is skipped") < out.index("ctx     64 dense ")
    data = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert data["complete"] and "transformers" not in data["machine"]
    assert [r["backend"] for r in data["rows"]] == ["dense", "kcache"]
    assert (tmp_path / "REPORT.md").is_file()
    assert main(argv + ["--engine", "transformers"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --engine transformers: kcache_ops.integrations."
                                   "transformers is tested with transformers>=5.17,<6")
    assert "ctx" not in captured.out
    assert main(["eval", "--quick", "--engine", "transformers", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --engine transformers: kcache_ops.")


def test_the_recorded_command_is_the_one_parsed(tmp_path):
    """bench.json records the command ``main`` parsed, to reproduce the run (it read sys.argv,
    which is pytest's here, or a caller's own); ``run(args)`` called from Python says so."""
    argv = ["bench", "--small", "--contexts", "64", "--steps", "1", "--no-hf",
            "--out", str(tmp_path / "a b")]
    assert main(argv) == 0
    data = json.loads((tmp_path / "a b" / "bench.json").read_text(encoding="utf-8"))
    assert data["command"] == ("python -m kcache_ops bench --small --contexts 64 --steps 1 "
                               f"--no-hf --out '{tmp_path / 'a b'}'")
    parser = bench_parser()
    bench.run(parser.parse_args(argv[1:]))
    data = json.loads((tmp_path / "a b" / "bench.json").read_text(encoding="utf-8"))
    assert data["command"] == "kcache_ops.cli.bench.run(args), from Python"


def test_transformers_with_a_context_shorter_than_its_prefill():
    """A context under 16 tokens: transformers' timing prefills that many tokens (it prefilled
    16 into a static cache of context + steps + 2, an IndexError at --contexts 8 --steps 2)."""
    pytest.importorskip("transformers")
    model = transformers_baseline.hf_model(measure.SHAPES["tiny"], torch.device("cpu"),
                                           torch.float32, 12)
    for context in (1, 8):
        assert transformers_baseline.time_hf(model, 2, context, 2) > 0


def test_transformers_model_is_the_shape_asked():
    """hf_model: transformers' model of a shape has the shape's parameters (GQA heads, MLP width
    and a tied or untied LM head among them), in the dtype asked, with SDPA attention and the
    positions asked; torch's default dtype is left as it was."""
    pytest.importorskip("transformers")
    default = torch.get_default_dtype()
    for name in ("tiny", "smollm2-135m"):  # an untied LM head, a tied one
        config = measure.SHAPES[name]
        model = transformers_baseline.hf_model(config, torch.device("meta"), torch.bfloat16, 100)
        assert torch.get_default_dtype() == default, name
        count = ceilings.weight_bytes(config, torch.int8)  # one byte a parameter: the shape's count
        assert sum(p.numel() for p in model.parameters()) == count, name
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, name
        assert model.config._attn_implementation == "sdpa", name
        assert model.config.max_position_embeddings == 100, name


def test_transformers_is_timed_at_the_batch_and_context_asked(monkeypatch):
    """time_hf: a static cache of context + steps + 2 rows (a step attends over all of them), a
    prefill of 16 tokens and every decode step at the batch asked."""
    transformers = pytest.importorskip("transformers")
    model = transformers_baseline.hf_model(measure.SHAPES["tiny"], torch.device("cpu"),
                                           torch.float32, 64)
    lengths, inputs = [], []
    real_call = type(model).__call__

    transformers = sys.modules["transformers"]  # the first model built replaces it (5.24)

    class StaticCache(transformers.StaticCache):
        def __init__(self, *args, **kwargs):
            lengths.append(kwargs["max_cache_len"])
            super().__init__(*args, **kwargs)

    def call(self, *args, **kwargs):
        inputs.append(tuple(kwargs["input_ids"].shape))
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(transformers, "StaticCache", StaticCache)
    monkeypatch.setattr(type(model), "__call__", call)
    assert transformers_baseline.time_hf(model, 3, 40, 2) > 0
    assert lengths == [40 + 2 + 2]
    assert inputs == [(3, 16)] + [(3, 1)] * (2 + 2)  # the prefill, 2 warm-up and 2 timed steps


def test_transformers_out_of_memory_is_the_rows_alone(monkeypatch):
    """compare_with_hf: one model addressing the longest context, each dense row timed at its
    own batch and context; a row that runs transformers out of device memory gets the error's
    first line and a line saying so, no rate (not the row before's), and the run goes on."""
    built, timed = [], []

    def time_hf(model, batch, context, steps):
        timed.append((batch, context, steps))
        if context == 128:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return 0.040
    monkeypatch.setattr(transformers_baseline, "hf_model", lambda *args: built.append(args))
    monkeypatch.setattr(transformers_baseline, "time_hf", time_hf)
    rows = [{"model": "tiny", "context": c, "batch": b, "decode_step_ms": 10.0}
            for c, b in ((64, 4), (128, 2), (32, 8))]
    lines = []
    transformers_baseline.compare_with_hf("config", "cpu", torch.float32, rows, 3,
                                          log=lines.append)
    assert built == [("config", "cpu", torch.float32, 128 + 3 + 2)]
    assert timed == [(4, 64, 3), (2, 128, 3), (8, 32, 3)]
    assert rows[1]["hf_error"] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "hf_decode_tok_s" not in rows[1] and "dense_vs_hf" not in rows[1]
    assert lines[1] == ("tiny          ctx    128 transformers: out of memory: CUDA out of "
                        "memory. Tried to allocate 2.00 GiB")
    assert rows[2]["hf_decode_tok_s"] == pytest.approx(8 / 0.040)
    assert "hf_error" not in rows[0] and "hf_error" not in rows[2]


def test_no_device_memory_left_after_the_reserve_is_an_error(monkeypatch):
    """Free device memory at or under --reserve is an error naming both (the budget went
    negative: every configuration was skipped as not fitting, and the empty run passed); a
    negative budget fits a batch of 0, not a negative one."""
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * 10**9, 80 * 10**9))
    with pytest.raises(ValueError, match=r"cuda has 4.000 GB free, not more than the 6.0 GB "
                                         r"reserved for activations \(--reserve\)"):
        measure.device_budget(torch.device("cuda"), None, 6.0)
    assert measure.device_budget(torch.device("cuda"), None, 1.5) == 25 * 10**8
    model = SimpleNamespace(config=measure.SHAPES["tiny"], dtype=torch.float32)
    for backend in ("dense", "kcache"):
        options = KCacheOptions(topn=8) if backend == "kcache" else None
        assert measure.fit_batch(model, backend, options, 64, -2 * 10**9, -1, 8) == (0, "device")


def test_a_model_the_reserve_leaves_no_room_for_is_skipped(monkeypatch):
    """Where one model's weights leave no budget after the reserve, that model is skipped with a
    line saying why and the next one is measured (the error ended the run before the smaller
    model); a run where nothing fits is an error, not an empty table."""
    monkeypatch.setitem(measure.SHAPES, "tiny2", measure.SHAPES["tiny"])
    real = measure.device_budget
    budgets = iter([ValueError("cuda has 1.000 GB free, not more than the 6.0 GB reserved"),
                    None])

    def device_budget(*args):
        failure = next(budgets)
        if failure:
            raise failure
        return real(*args)
    monkeypatch.setattr(measure, "device_budget", device_budget)
    lines = []
    rows = measure.measure(["tiny", "tiny2"], [64], torch.device("cpu"), torch.float32,
                           KCacheOptions(topn=8), 1, budget_gb=0.01, hf=False, log=lines.append)
    assert "# tiny: skipped: cuda has 1.000 GB free, not more than the 6.0 GB reserved" in lines
    assert {r["model"] for r in rows} == {"tiny2"} and len(rows) == 2
    monkeypatch.setattr(measure, "device_budget", real)
    with pytest.raises(ValueError, match="no configuration ran: none fit the budget"):
        measure.measure(["tiny"], [64], torch.device("cpu"), torch.float32,
                        KCacheOptions(topn=8), 1, budget_gb=1e-12, hf=False, log=lines.append)


@pytest.mark.parametrize("stop", ["interrupt", "sigterm"])
def test_a_run_cut_off_keeps_its_rows_and_a_report_of_them(tmp_path, monkeypatch, stop):
    """bench.json is rewritten after each configuration: a run stopped after its first (Ctrl-C,
    or SIGTERM, a time limit or ``kill``, which is taken as Ctrl-C while the run measures) keeps
    that row, marked incomplete, and rewrites REPORT.md from it (it left the previous run's
    REPORT.md and plot beside the new JSON; SIGTERM killed the process): the report has the rows
    of the JSON, says it was cut off, and the previous run's plot is gone. The SIGTERM handler
    is the previous one afterwards."""
    import os
    import signal
    before = signal.getsignal(signal.SIGTERM)
    (tmp_path / "bench_throughput.png").write_bytes(b"the previous run's plot")
    (tmp_path / "REPORT.md").write_text("the previous run's report", encoding="utf-8")
    real = measure.time_decode
    calls = []

    def time_decode(*args):
        if calls and stop == "interrupt":
            raise KeyboardInterrupt  # the 2nd configuration
        if calls:  # never SIGTERM a test process that has no handler for it
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, before)
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(measure, "time_decode", time_decode)
    parser = bench_parser()
    with pytest.raises(KeyboardInterrupt):
        bench.run(parser.parse_args(["--device", "cpu", "--small", "--steps", "2", "--no-hf",
                                     "--contexts", "64", "--out", str(tmp_path)]))
    assert signal.getsignal(signal.SIGTERM) is before
    data = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert not data["complete"] and [r["backend"] for r in data["rows"]] == ["dense"]
    report = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert "**This run was cut off before its end**" in report
    table = [line for line in report.splitlines() if line.startswith("| tiny |")]
    row = data["rows"][0]
    assert table == [line for line in bench_section(data) if line.startswith("| tiny |")]
    assert len(table) == 1 and table[0].startswith(f"| tiny | 64 | dense | {row['batch']} (")
    assert "bench_throughput.png" not in report
    assert not (tmp_path / "bench_throughput.png").exists()


def test_no_vs_dense_where_max_batch_capped_a_batch(capsys):
    """--max-batch capped the batch (a batch the budget does not set): the two backends do not
    fill one device memory, so a KCache row has no vs_dense ratio (it had one), printed and
    tabled as "–" with a note saying why; uncapped, the ratio is there."""
    lines = []
    # both capped; neither; only KCache's (the paper's options: K alone on the device, where
    # dense's batch is set by the budget)
    for max_batch, budget, options in ((2, 0.01, KCacheOptions(topn=8)),
                                       (256, 0.0005, KCacheOptions(topn=8)),
                                       (3, 0.0006, KCacheOptions.paper_literal(topn=8))):
        lines.clear()
        rows = measure.measure(["tiny"], [64], torch.device("cpu"), torch.float32, options, 1,
                               budget_gb=budget, max_batch=max_batch, hf=False, log=lines.append)
        dense, kcache = rows
        capped = "cap" in (dense["batch_limit"], kcache["batch_limit"])
        assert capped == (max_batch != 256), rows
        if max_batch == 3:
            assert (dense["batch_limit"], kcache["batch_limit"]) == ("device", "cap"), rows
        data = {"machine": results.machine("cpu"), "command": "bench", "rows": rows}
        section = bench_section(data)
        table = [line for line in section if line.startswith("| tiny | 64 | kcache |")]
        if capped:
            assert kcache["vs_dense"] is None
            assert "vs dense – (capped by --max-batch, not at equal memory)" in lines[-1]
            assert table[0].endswith("| – |")
            assert any("capped by `--max-batch`, not at equal memory" in line
                       for line in section)
        else:
            assert kcache["vs_dense"] == pytest.approx(kcache["decode_tok_s"]
                                                       / dense["decode_tok_s"])
            assert f"vs dense {kcache['vs_dense']:.2f}x" in lines[-1]
            assert table[0].endswith(f"| {kcache['vs_dense']:.2f}× |")
            assert not any("not at equal memory" in line for line in section)


def test_a_context_past_the_models_positions_is_skipped_before_any_measurement(monkeypatch):
    """A context whose context + steps + 2 positions exceed the shape's max_position_embeddings
    (smollm2-135m's 8192 at the default 8192/32768/65536) was measured as if it were addressable:
    it is skipped with a line saying why, before the first measurement; where nothing is left,
    the run is an error."""
    from dataclasses import replace
    monkeypatch.setitem(measure.SHAPES, "tiny-short",
                        replace(measure.SHAPES["tiny"], max_position_embeddings=70))
    lines = []
    real = measure.time_prefill

    def time_prefill(*args):
        lines.append("measured")
        return real(*args)
    monkeypatch.setattr(measure, "time_prefill", time_prefill)
    rows = measure.measure(["tiny-short"], [64, 66, 67], torch.device("cpu"), torch.float32,
                           KCacheOptions(topn=8), 2, budget_gb=0.01, hf=False, log=lines.append)
    assert {r["context"] for r in rows} == {64, 66}
    assert lines[0] == ("# tiny-short ctx 67: skipped: context + steps + 2 = 71 positions, more "
                        "than its max_position_embeddings 70")
    lines.clear()
    with pytest.raises(ValueError, match="no \\(model, context\\) to measure"):
        measure.measure(["tiny-short"], [100], torch.device("cpu"), torch.float32,
                        KCacheOptions(topn=8), 2, budget_gb=0.01, hf=False, log=lines.append)
    assert "measured" not in lines and "ctx 100: skipped" in lines[0]


def test_ceilings_are_measured_and_set_each_rows_floor(monkeypatch):
    """The run's own ceilings (DESIGN.md §6): a device copy's bytes read + written a second (no
    PCIe on the CPU), and per row the floor of its bytes at them over the measured step; the
    bytes are the weights read once and the cache's reads at the median timed step's keys."""
    assert ceilings.d2d_bandwidth_gbs("cpu", 1 << 20, warmup=1, runs=3) > 0
    monkeypatch.setattr(ceilings, "d2d_bandwidth_gbs", lambda device, **kwargs: 20.0)
    assert ceilings.measure_ceilings("cpu") == {"device_copy_GBs": 20.0, "h2d_GBs": None}
    # CUDA: the pinned host->device copy too (its copies stubbed: no GPU needed)
    monkeypatch.setattr(ceilings, "h2d_bandwidth_gbs", lambda device: 50.0)
    assert ceilings.measure_ceilings("cuda") == {"device_copy_GBs": 20.0, "h2d_GBs": 50.0}
    # CUDA: the PCIe reads after the device reads; the CPU: one RAM
    assert ceilings.floor_seconds(4e9, 1e9, {"device_copy_GBs": 2000.0, "h2d_GBs": 50.0}) == \
        pytest.approx(2e-3 + 20e-3)
    assert ceilings.floor_seconds(4e9, 1e9, {"device_copy_GBs": 20.0, "h2d_GBs": None}) == \
        pytest.approx(0.25)
    cpu = {"device_copy_GBs": 20.0, "h2d_GBs": None}
    lines = []
    rows = measure.measure(["tiny"], [64], torch.device("cpu"), torch.float32,
                           KCacheOptions(topn=8), 2, budget_gb=0.01, max_batch=3, hf=False,
                           log=lines.append, ceilings=cpu)
    config = measure.SHAPES["tiny"]
    for row, line in zip(rows, lines[1:]):
        cache = measure.new_cache(measure.random_model(config, "cpu", torch.float32),
                                  row["backend"], KCacheOptions(topn=8) if row["options"] else None,
                                  row["batch"], 64 + 2 + 2)
        device = (ceilings.weight_bytes_per_step(config, row["batch"], torch.float32)
                  + cache.device_bytes_read_per_step(64 + 3))  # the median of 2 timed steps
        assert row["device_bytes_per_step"] == device
        floor = (device + row["pcie_bytes_per_step"]) / 20e9
        assert row["floor_step_ms"] == pytest.approx(1e3 * floor)
        assert row["of_ceiling"] == pytest.approx(floor / (row["decode_step_ms"] / 1e3))
        assert f"floor {row['floor_step_ms']:.3g} ms ({row['of_ceiling']:.1%} of the ceiling)" \
            in line


def test_rates_and_the_copy_ceiling_by_hand(monkeypatch):
    """The numbers of a row from its timings: prefill tokens over the prefill's seconds (one
    sequence), decode tokens of the whole batch over a step's seconds; the device copy counts
    the bytes read and written; transformers' tok/s at the dense row's batch, and dense's speed
    over it."""
    monkeypatch.setattr(ceilings, "median_seconds", lambda device, step, runs: 0.5)
    copied = 2 * (1 << 20)  # bytes read + written
    assert ceilings.d2d_bandwidth_gbs("cpu", 1 << 20, warmup=0, runs=1) == copied / 0.5 / 1e9
    monkeypatch.setattr(measure, "time_prefill", lambda *args: 0.5)
    rows = measure.measure(["tiny"], [64], torch.device("cpu"), torch.float32,
                           KCacheOptions(topn=8), 2, budget_gb=0.01, max_batch=3, hf=False,
                           log=lambda line: None)
    for row in rows:
        assert row["batch"] == 3 and row["prefill_tok_s"] == 64 / 0.5
        assert row["decode_tok_s"] == pytest.approx(3 / (row["decode_step_ms"] / 1e3))
    monkeypatch.setattr(transformers_baseline, "hf_model", lambda *args: None)
    monkeypatch.setattr(transformers_baseline, "time_hf",
                        lambda model, batch, context, steps: 0.040)
    row = {"model": "tiny", "context": 64, "batch": 4, "decode_step_ms": 10.0}
    transformers_baseline.compare_with_hf(None, "cpu", None, [row], 2, log=lambda line: None)
    assert row["hf_decode_tok_s"] == pytest.approx(4 / 0.040)
    assert row["dense_vs_hf"] == pytest.approx(4.0)  # 40 ms a step against our 10


def test_a_prefill_is_timed_by_the_median_of_its_runs_after_a_warm_up(monkeypatch):
    """time_prefill: a 64-token warm-up (5 s here) and three timed runs (1, 1 and 4 s) -> 1 s,
    the median of the timed runs alone."""
    clock, durations = [0.0], iter([5.0, 1.0, 1.0, 4.0])

    def prefill(tokens, lens, cache):
        clock[0] += next(durations)
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(measure, "new_cache", lambda *args: None)
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=10), device=torch.device("cpu"),
                            prefill=prefill)
    assert measure.time_prefill(model, "dense", None, 128) == 1.0


def test_the_batch_is_the_least_of_the_device_host_and_cap_limits(monkeypatch):
    """fit_batch: 100 device bytes and 1000 host bytes a sequence in 10 kB of device and 3 kB
    of host memory -> 3 sequences, set by the host; unchecked host memory -> the device's 100,
    or the cap below it; a tie goes to the device."""
    monkeypatch.setattr(measure, "sequence_bytes", lambda *args: (100, 1000))
    model = SimpleNamespace(config=None, dtype=None)
    fit = functools.partial(measure.fit_batch, model, "kcache", None, 67)
    assert fit(10_000, 3_000, 256) == (3, "host")
    assert fit(10_000, None, 256) == (100, "device")
    assert fit(10_000, None, 40) == (40, "cap")
    assert fit(10_000, 100_000, 100) == (100, "device")


@pytest.mark.parametrize("bias", [{}, {"attention_bias": True},
                                  {"attention_bias": True, "output_bias": True}], ids=str)
@pytest.mark.parametrize("name", ["tiny", "smollm2-135m"])
def test_weight_bytes_per_step_are_the_parameters_read(name, bias):
    """The weights a step reads: every parameter, of an untied input embedding only the batch's
    rows (a tied one is the LM head, read whole), against the model's own parameters."""
    from kcache_ops.model import Llama
    config = dataclasses.replace(measure.SHAPES[name], **bias)
    with torch.device("meta"):
        model = Llama(config).to(torch.bfloat16)
    params = sum(p.nbytes for p in model.parameters())  # a tied table counted once
    embedding = model.embed_tokens.weight.nbytes
    rows = 0 if config.tie_word_embeddings else embedding - 5 * config.hidden_size * 2
    assert ceilings.weight_bytes_per_step(config, 5, torch.bfloat16) == params - rows
    assert ceilings.weight_bytes(config, torch.bfloat16) == params


def test_shapes_are_the_published_models():
    """The benchmark's shapes are the models they are named for: their parameter counts are
    the published ones (Llama-3-8B's 8,030,261,248; SmolLM2-135M's 134,515,008, tied)."""
    for name, params in (("llama3-8b", 8_030_261_248), ("smollm2-135m", 134_515_008)):
        assert ceilings.weight_bytes(measure.SHAPES[name], torch.int8) == params, name


def test_random_model_weights_and_the_default_dtype():
    """random_model: every weight in the dtype asked, the norms ones and the rest normal with
    std 0.02; torch's default dtype is left as it was."""
    default = torch.get_default_dtype()
    try:
        model = measure.random_model(measure.SHAPES["tiny"], "cpu", torch.bfloat16)
        assert torch.get_default_dtype() == default
    finally:  # a leaked default would fail the tests after this one too
        torch.set_default_dtype(default)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.numel() > 10_000:
            std = p.float().std().item()
            assert abs(std - 0.02) < 0.002 and abs(p.float().mean().item()) < 0.002, (name, std)


def test_bench_json_records_the_settings_and_ceilings(tmp_path):
    """bench.json records the resolved settings and the ceilings beside the machine (the git
    commit of the checkout among them), and REPORT.md prints them. On the CPU where a GPU is
    there too (the command's default): a CPU run measures no PCIe ceiling."""
    assert main(["bench", "--small", "--contexts", "64", "--steps", "1", "--no-hf",
                 "--max-batch", "3", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert data["settings"] == {"dtype": "bfloat16", "steps": 1, "max_batch": 3,
                                "reserve_gb": 6.0, "budget_gb": 0.004,
                                "host_budget_bytes": data["settings"]["host_budget_bytes"],
                                "contexts": {"tiny": [64]}}
    assert data["settings"]["host_budget_bytes"] is None or \
        data["settings"]["host_budget_bytes"] > 0
    assert data["ceilings"]["device_copy_GBs"] > 0 and data["ceilings"]["h2d_GBs"] is None
    assert "git_commit" in data["machine"]
    assert all(r["floor_step_ms"] > 0 and r["of_ceiling"] > 0 for r in data["rows"])
    report = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert "Settings: bfloat16, 1 timed decode steps, batch at most 3, cache budget 0.004 GB" \
        in report and "contexts tiny 64." in report
    assert (f"Ceilings measured in this run: device memory copy "
            f"{data['ceilings']['device_copy_GBs']:.1f} GB/s (bytes read + written), no PCIe") \
        in report
    assert "| PCIe MiB/step | floor ms | of ceiling | vs dense |" in report


def test_default_contexts_are_each_models_own(tmp_path, monkeypatch):
    """Each default model measures at default contexts it can address (SmolLM2's 8192 positions
    skipped all of 8192, 32768 and 65536); --contexts applies to every model given."""
    for name in bench.DEFAULT_MODELS:
        assert measure.usable_contexts(name, bench.DEFAULT_CONTEXTS[name], 32, print) == \
            list(bench.DEFAULT_CONTEXTS[name])
    assert bench.DEFAULT_CONTEXTS["llama3-8b"] == (8192, 32768, 65536)
    assert bench.DEFAULT_CONTEXTS["smollm2-135m"] == (2048, 4096, 8000)  # the README's
    ran = []
    monkeypatch.setattr(bench, "measure", lambda models, contexts, *a, **k: ran.append(contexts)
                        or [])
    monkeypatch.setattr(bench, "measure_ceilings", cpu_ceilings)
    monkeypatch.setattr(throughput_report, "plot", lambda rows, path: None)
    parser = bench_parser()
    for extra in ([], ["--contexts", "64,128"]):
        bench.run(parser.parse_args(["--device", "cpu", "--budget", "0.01", "--out",
                                     str(tmp_path), *extra]))
    assert ran == [{name: bench.DEFAULT_CONTEXTS[name] for name in bench.DEFAULT_MODELS},
                   {name: (64, 128) for name in bench.DEFAULT_MODELS}]


def test_a_plot_that_fails_leaves_no_link_to_it(tmp_path, monkeypatch, capsys):
    """A complete run whose plot fails to draw: the previous run's plot is gone, REPORT.md says
    the plot was not drawn instead of linking a missing (or old) file, and the run's rows
    stand."""
    (tmp_path / "bench_throughput.png").write_bytes(b"the previous run's plot")

    def broken(rows, path):
        raise RuntimeError("no display")
    monkeypatch.setattr(throughput_report, "plot", broken)
    parser = bench_parser()
    bench.run(parser.parse_args(["--device", "cpu", "--small", "--steps", "1", "--no-hf",
                                 "--contexts", "64", "--out", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "# the plot could not be drawn: RuntimeError: no display" in out
    assert f"# wrote {tmp_path / 'bench.json'}, REPORT.md" in out
    assert not (tmp_path / "bench_throughput.png").exists()
    assert json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))["complete"]
    report = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert "](bench_throughput.png)" not in report
    assert "The plot (bench_throughput.png) could not be drawn (the output of the command" in report
    assert "cut off" not in report


def test_a_plot_that_fails_midway_leaves_no_part_of_it(tmp_path, monkeypatch):
    """draw: a plot that fails after writing part of its file leaves no file (the report would
    link a broken image) and says what failed."""
    path = tmp_path / "bench_throughput.png"
    path.write_bytes(b"the previous run's plot")

    def half_written(rows, path):
        with open(path, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError("no space left on device")
    monkeypatch.setattr(throughput_report, "plot", half_written)
    assert throughput_report.draw([], str(path)) == "OSError: no space left on device"
    assert not path.exists()


def test_the_plot_has_a_curve_per_model_and_backend(tmp_path, monkeypatch):
    """plot: one curve per (model, backend), labelled so, of its rows' decode tokens/s against
    context in context order (rows given in any order)."""
    import matplotlib.pyplot as plt
    axes = []
    real = plt.subplots

    def subplots(*args, **kwargs):
        fig, ax = real(*args, **kwargs)
        axes.append(ax)
        return fig, ax
    monkeypatch.setattr(plt, "subplots", subplots)
    rows = [{"model": m, "backend": b, "context": c, "decode_tok_s": d, "prefill_tok_s": 1e6}
            for m, b, c, d in (("tiny", "kcache", 512, 30.0), ("tiny", "dense", 512, 10.0),
                               ("tiny", "kcache", 256, 40.0), ("tiny", "dense", 256, 20.0),
                               ("tiny2", "dense", 256, 5.0))]
    throughput_report.plot(rows, str(tmp_path / "bench_throughput.png"))
    assert (tmp_path / "bench_throughput.png").stat().st_size > 0
    curves = [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
              for line in axes[0].get_lines()]
    assert curves == [("tiny dense", [256, 512], [20.0, 10.0]),
                      ("tiny kcache", [256, 512], [40.0, 30.0]), ("tiny2 dense", [256], [5.0])]


def test_report_only_draws_the_bench_plot_a_folder_lacks(tmp_path):
    """eval --report-only over a complete bench.json without its plot (copied alone, as from a
    GPU machine that gives back a few files) draws it and links it (REPORT.md said the run could
    not draw it); a plot that fails is a warning, and the report says so."""
    import shutil
    shutil.copy(f"{results.RESULTS_DIR}/bench.json", tmp_path)  # the committed run's
    with pytest.MonkeyPatch.context() as m, \
            pytest.warns(UserWarning, match=f"^{tmp_path / 'bench_throughput.png'} could not be "
                                            f"drawn: OSError: no disk$"):
        m.setattr(throughput_report, "plot", lambda rows, path: exec("raise OSError('no disk')"))
        assert main(["eval", "--report-only", "--out", str(tmp_path)]) == 0
    assert "could not be drawn" in (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert main(["eval", "--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench_throughput.png").stat().st_size > 0
    assert "![throughput vs context](bench_throughput.png)" in (tmp_path / "REPORT.md").read_text(
        encoding="utf-8")


def test_flags_reach_the_measurement_and_bench_json(tmp_path, monkeypatch):
    """What the flags set reaches measure as given and bench.json as resolved: --small alone
    times 8 steps in a 4 MB budget, batch at most 256, the default KCache options and the
    transformers comparison on (and its version recorded where it can run); --budget, --steps,
    --max-batch, --no-hf and the KCache flags given with --small win."""
    calls = []
    monkeypatch.setattr(bench, "measure", lambda *args, **kwargs: calls.append((args, kwargs))
                        or [])
    monkeypatch.setattr(bench, "measure_ceilings", cpu_ceilings)
    monkeypatch.setattr(bench, "host_budget", lambda: 12345)
    monkeypatch.setattr(throughput_report, "plot", lambda rows, path: None)
    parser = bench_parser()
    settings = []
    for flags in ([], ["--budget", "0.01", "--steps", "3", "--max-batch", "5", "--no-hf",
                       "--topn", "8", "--group-select"]):
        bench.run(parser.parse_args(["--device", "cpu", "--small", "--out", str(tmp_path),
                                     *flags]))
        data = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
        settings.append({k: data["settings"][k] for k in ("steps", "budget_gb", "max_batch",
                                                          "host_budget_bytes")})
        if flags == [] and bench.transformers_missing() is None:
            import transformers
            assert data["machine"]["transformers"] == transformers.__version__
    assert settings == [{"steps": 8, "budget_gb": 0.004, "max_batch": 256,
                         "host_budget_bytes": 12345},
                        {"steps": 3, "budget_gb": 0.01, "max_batch": 5,
                         "host_budget_bytes": 12345}]
    # (options, steps, budget, reserve, max_batch, hf) of each call, and the host bytes
    assert [(args[4:10], kwargs["host_bytes"]) for args, kwargs in calls] == [
        ((KCacheOptions(), 8, 0.004, 6.0, 256, True), 12345),
        ((KCacheOptions(topn=8, group_select=True), 3, 0.01, 6.0, 5, False), 12345)]


def test_a_run_cut_off_before_its_first_row_leaves_the_previous_results(tmp_path, monkeypatch):
    """A run stopped before it saved a row has not touched the previous run's bench.json: its
    plot and REPORT.md, which go with it, are left as they were (only a run that saved rows
    rewrites the report as cut off)."""
    files = {"bench.json": '{"the previous run": 1}', "REPORT.md": "the previous run's report",
             "bench_throughput.png": "the previous run's plot"}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "measure", interrupted)
    monkeypatch.setattr(bench, "measure_ceilings", cpu_ceilings)
    parser = bench_parser()
    with pytest.raises(KeyboardInterrupt):
        bench.run(parser.parse_args(["--device", "cpu", "--small", "--out", str(tmp_path)]))
    assert {name: (tmp_path / name).read_text(encoding="utf-8") for name in files} == files
