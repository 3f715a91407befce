"""The results layer: the machine description and its report line, the JSON files, where a
command writes them (a smoke run never over the committed results), and REPORT.md assembled from
whichever JSON files are present (here only the GPU gather script's)."""
import argparse
import ctypes
import json
import os
import pathlib
import re
import subprocess

import pytest
import torch

from kcache_ops import report, results
from kcache_ops.cli import bench, eval as eval_cli
from kcache_ops.eval.report import EVAL_JSON
from kcache_ops.results import (RESULTS_DIR, SMOKE_DIR, load_json, machine, out_dir, ran_on,
                                results_dir, write_json)
from kcache_ops.throughput.report import BENCH_JSON, BENCH_PLOT


def test_machine_and_json_round_trip(tmp_path):
    m = machine("cpu")
    assert {"cpu", "cores", "threads", "torch", "device"} <= set(m) and "gpu" not in m
    assert m["threads"] == torch.get_num_threads()
    assert ran_on(m, ".").startswith(f"Ran on {m['cpu']} ({m['cores']} cores, torch threads: "
                                     f"{m['threads']}, load average ")
    path = tmp_path / "new" / "x.json"
    write_json(path, {"machine": m, "rows": [1, 2]})
    assert load_json(path) == {"machine": m, "rows": [1, 2]}
    assert load_json(tmp_path / "missing.json") is None


def test_machine_counts_the_cores_apart_from_torch_threads(monkeypatch):
    """"cores" are the CPUs the process may run on, "threads" torch's (``--threads 1`` on a
    machine of 3); a file written before "threads" was recorded kept torch's threads as
    "cores", and its line still says so."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.delattr(os, "getloadavg", raising=False)  # the line without a load average
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = machine("cpu")
    finally:
        torch.set_num_threads(threads)
    assert (m["cores"], m["threads"]) == (3, 1)
    assert "(3 cores, torch threads: 1), device cpu" in ran_on(m)
    old = {"cpu": "c", "cores": 2, "torch": "t", "device": "cpu"}
    assert ran_on(old).startswith("Ran on c (torch threads: 2), device cpu")


def test_machine_records_the_load_average_at_the_start(monkeypatch):
    """The host's 1-minute load average as the run begins is recorded (pyperf's metadata does
    the same) and printed after the threads: a CPU run beside other work says so; a machine
    without os.getloadavg records none."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.937, 0.5, 0.25), raising=False)
    m = machine("cpu")
    assert m["load_avg_1min"] == 1.94
    assert f"(2 cores, torch threads: {m['threads']}, load average 1.94 at the start), device " \
           f"cpu, torch" in ran_on(m)
    monkeypatch.delattr(os, "getloadavg")
    assert "load_avg_1min" not in machine("cpu")


def test_machine_records_the_commit_and_on_cuda_its_versions(tmp_path, monkeypatch):
    """The machine of a run records the commit of the checkout it ran from ("-dirty" with
    changes to tracked files; None, no error, outside a checkout or without git) and, on CUDA
    only, torch's CUDA runtime and the driver's CUDA version; the report line prints them."""
    head = subprocess.run(["git", "-C", results.PACKAGE_PARENT, "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    if head:  # the tests run from a checkout
        assert results.git_commit().removesuffix("-dirty") == head
    monkeypatch.delenv("KCACHE_OPS_GIT_COMMIT", raising=False)
    assert results.git_commit(str(tmp_path)) is None
    monkeypatch.setenv("KCACHE_OPS_GIT_COMMIT", "abc123")  # a copy without .git, told its commit
    assert results.git_commit(str(tmp_path)) == "abc123"
    monkeypatch.delenv("KCACHE_OPS_GIT_COMMIT")
    (tmp_path / ".git").mkdir()  # a checkout git cannot read
    assert results.git_commit(str(tmp_path)) is None
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.setattr(results.subprocess, "run", no_git)
    assert results.git_commit() is None and machine("cpu")["git_commit"] is None
    assert "cuda_runtime" not in machine("cpu") and "cuda_driver" not in machine("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Test GPU")
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # None in a CPU-only torch build
    monkeypatch.setattr(results, "cuda_driver", lambda: "13.1")
    m = {**machine("cuda"), "git_commit": "0123456789abcdef-dirty"}
    assert (m["gpu"], m["cuda_runtime"], m["cuda_driver"]) == ("Test GPU", torch.version.cuda,
                                                               "13.1")
    assert ran_on(m, ".").endswith(f", torch {m['torch']} (CUDA {torch.version.cuda}, driver "
                                   f"CUDA 13.1), commit 0123456789ab (uncommitted changes).")
    unknown = ran_on({**m, "cuda_driver": None})  # a driver library that could not be asked
    assert f"(CUDA {torch.version.cuda}, driver CUDA unknown)" in unknown, unknown


def test_the_commit_is_dirty_for_changed_tracked_files_only(tmp_path, monkeypatch):
    """git_commit marks "-dirty" a checkout whose tracked files differ from its commit, not one
    that merely holds untracked files (a results file a run just wrote, a build folder)."""
    for outer in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY"):
        monkeypatch.delenv(outer, raising=False)  # as in a git hook: the repository is tmp_path's
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)  # no signing or hooks of the user's
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c",
                               "user.email=t@t", *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not installed")
    (tmp_path / "tracked.txt").write_text("a", encoding="utf-8")
    git("add", "tracked.txt")
    git("commit", "-qm", "base")
    head = git("rev-parse", "HEAD")
    assert results.git_commit(str(tmp_path)) == head
    (tmp_path / "untracked.json").write_text("{}", encoding="utf-8")
    assert results.git_commit(str(tmp_path)) == head, "an untracked file made it dirty"
    (tmp_path / "tracked.txt").write_text("b", encoding="utf-8")
    assert results.git_commit(str(tmp_path)) == f"{head}-dirty"


def test_cuda_driver_reads_the_drivers_version(monkeypatch):
    """cuda_driver: cuDriverGetVersion's 1000 * major + 10 * minor as "major.minor"; None where
    the call fails or the library is not there (a machine without a driver)."""
    major, minor = 12, 4  # a minor version the reading could drop

    class Driver:
        def __init__(self, status):
            self.status = status

        def cuDriverGetVersion(self, version):  # a ctypes.byref(c_int)
            version._obj.value = 1000 * major + 10 * minor
            return self.status
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver(0))
    assert results.cuda_driver() == f"{major}.{minor}"
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver(3))  # CUDA_ERROR_NOT_INITIALIZED
    assert results.cuda_driver() is None

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert results.cuda_driver() is None


@pytest.mark.parametrize("content", [b"{\"rows\": [1,", b"\xff\xfe{}"], ids=["cut", "not-utf8"])
def test_a_broken_json_file_is_named(tmp_path, content):
    """A results file cut short or in another encoding is a ValueError naming it."""
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not valid JSON"):
        load_json(path)


def test_json_is_standard_json(tmp_path):
    """A float that is not finite is written as null (standard JSON has no NaN or Infinity,
    which JSON.parse and other strict readers refuse); the committed results hold none."""

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))

    path = tmp_path / "x.json"
    write_json(path, {"a": float("nan"), "b": [float("inf"), 1.5, (2, float("-inf"))],
                      "c": {"d": float("nan"), "e": "nan"}})
    assert strict(path.read_text(encoding="utf-8")) == {
        "a": None, "b": [None, 1.5, [2, None]], "c": {"d": None, "e": "nan"}}
    for committed in pathlib.Path(RESULTS_DIR).glob("*.json"):
        strict(committed.read_text(encoding="utf-8"))


@pytest.mark.parametrize("cli, smoke", [(eval_cli, "--quick"), (bench, "--small")])
def test_smoke_runs_write_aside(cli, smoke, tmp_path):
    """``eval --quick`` and ``bench --small`` write to a scratch folder unless --out says where;
    the full runs to bench/results (the committed results)."""
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert out_dir(parser.parse_args([smoke]).out, True) == SMOKE_DIR != RESULTS_DIR
    assert out_dir(parser.parse_args([]).out, False) == RESULTS_DIR
    assert out_dir(parser.parse_args([smoke, "--out", str(tmp_path)]).out, True) == str(tmp_path)


def test_results_go_to_the_checkout_or_the_working_folder(tmp_path, monkeypatch):
    """Run from a checkout, full runs write to its bench/results; from an installed package
    (site-packages has no setup.py) to kcache_ops_results in the working folder, not into
    site-packages."""
    assert RESULTS_DIR == str(pathlib.Path(__file__).resolve().parents[1] / "bench" / "results")
    monkeypatch.chdir(tmp_path)
    site = tmp_path / "site-packages"
    site.mkdir()
    assert results_dir(str(site)) == str(tmp_path / "kcache_ops_results")
    (site / "setup.py").touch()
    assert results_dir(str(site)) == str(site / "bench" / "results")


def test_report_from_the_gather_json_alone(tmp_path):
    meta = {**machine("cpu"), "gpu": "Test GPU", "h2d_ceiling_GBs": 50.0}
    rows = [{"row_bytes": 256, "rows_per_head": 64, "mem": "pinned", "GBs": 20.0,
             "pct_ceiling": 40.0, "pct_memcpy_same_bytes": 61.4, "speedup_vs_torch": 11.56},
            {"row_bytes": 256, "rows_per_head": 64, "mem": "wc", "GBs": 20.0,
             "pct_ceiling": 40.0, "speedup_vs_torch": None},  # the PyTorch way not timed
            {"row_bytes": 1024, "rows_per_head": 64, "mem": "pinned", "GBs": 30.0,
             "pct_ceiling": 60.0},  # a row of a JSON written before the PyTorch way was timed
            {"row_bytes": 256, "rows_per_head": 1024, "mem": "pinned", "host_GiB": 8,
             "buffers": 8, "GBs": 15.0, "pct_ceiling": 30.0, "speedup_vs_torch": 4.0},
            {"row_bytes": 256, "rows_per_head": 1024, "mem": "thp", "host_GiB": 8, "buffers": 1,
             "thp_mode": "madvise", "anon_huge_GiB": 7.96, "GBs": 40.0, "pct_ceiling": 80.0,
             "speedup_vs_torch": 9.0},
            {"row_bytes": 256, "rows_per_head": 1024, "mem": "thp", "host_GiB": 8, "buffers": 1,
             "thp_mode": "unknown", "anon_huge_GiB": None, "GBs": 15.0, "pct_ceiling": 30.0,
             "speedup_vs_torch": 4.0}]  # huge-page rows: the pages gained, and where unknown
    write_json(tmp_path / report.GATHER_JSON, {"meta": meta, "rows": rows})
    report.write(tmp_path)
    text = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert "Not run yet: `python -m kcache_ops eval`" in text and "## Throughput" in text
    assert "Test GPU" in text and "H2D ceiling 50.0 GB/s" in text
    # rows of a JSON written before the footprint rows read one 512 MiB buffer
    # the ratio to a memcpy of the row's bytes: "–" in JSON written before it was timed
    assert "| 256 | 64 | pinned | 0.5 GiB | 20.0 | 40% | 61% | 11.6x |" in text
    assert "| 256 | 64 | wc | 0.5 GiB | 20.0 | 40% | – | – |" in text
    assert "| 1024 | 64 | pinned | 0.5 GiB | 30.0 | 60% | – | – |" in text
    assert "| 256 | 1024 | pinned | 8 GiB in 8 buffers | 15.0 | 30% | – | 4.0x |" in text
    assert ("| 256 | 1024 | thp | 8 GiB (madvise THP, 8.0 GiB huge) | 40.0 | 80% | – | 9.0x |"
            in text)
    assert "| 256 | 1024 | thp | 8 GiB (unknown THP, huge pages unknown) | 15.0 | 30% |" in text
    assert "cut off" not in text and "(gpu_gather.png)" in text


def test_a_gather_run_cut_off_says_so(tmp_path):
    """A gpu_gather.json its run did not finish ("complete": false) is reported as cut off, and
    without the plot, which the script draws at its end (it was missing, or an earlier run's)."""
    meta = {**machine("cpu"), "gpu": "Test GPU", "h2d_ceiling_GBs": 50.0}
    rows = [{"row_bytes": 256, "rows_per_head": 64, "mem": "pinned", "GBs": 20.0,
             "pct_ceiling": 40.0, "speedup_vs_torch": 11.56}]
    write_json(tmp_path / report.GATHER_JSON, {"meta": meta, "complete": False, "rows": rows})
    report.write(tmp_path)
    text = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert "**This run was cut off before its end**" in text and "gpu_gather.png" not in text
    assert "| 256 | 64 | pinned | 0.5 GiB | 20.0 | 40% | – | 11.6x |" in text


def test_writers_of_one_file_do_not_collide(tmp_path):
    """Two writers of one results file at once (two runs into one folder) each write whole
    files, and the last one stays: they shared one temporary file, and one's rename took the
    other's (a FileNotFoundError). No temporary file is left."""
    import threading
    path = tmp_path / "bench.json"
    errors = []

    def write(value):
        try:
            for i in range(200):
                write_json(path, {"writer": value, "i": i, "rows": list(range(200))})
        except OSError as e:
            errors.append(e)
    threads = [threading.Thread(target=write, args=(value,)) for value in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert load_json(path)["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path):
    """A write whose rename fails (here the path is a folder) raises, and leaves neither its
    temporary file nor any change where it wrote."""
    taken = tmp_path / "bench.json"
    taken.mkdir()
    with pytest.raises(OSError):
        write_json(taken, {"rows": [1, 2]})
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"] and taken.is_dir()
    assert list(taken.iterdir()) == []


def test_the_committed_report_is_the_committed_results(tmp_path):
    """bench/results/REPORT.md is what ``eval --report-only`` writes from the JSON files committed
    beside it (a change of the report's code or of the options is regenerated, not left stale);
    the bench plot too, which the report links only where it was drawn."""
    import shutil
    for name in (EVAL_JSON, BENCH_JSON, report.GATHER_JSON, BENCH_PLOT):
        if os.path.isfile(os.path.join(RESULTS_DIR, name)):
            shutil.copy(os.path.join(RESULTS_DIR, name), tmp_path)
    report.write(tmp_path)
    committed = pathlib.Path(RESULTS_DIR, "REPORT.md").read_text(encoding="utf-8")
    assert (tmp_path / "REPORT.md").read_text(encoding="utf-8") == committed


def test_reports_of_files_from_earlier_versions(tmp_path):
    """A results file of an earlier version lacks the options added since: they were off then,
    and the report reads them so (the paper's values, not today's defaults: a bench.json of
    options {topn, group_select, dense_layers} was reported with tail=int2, sinks=4, ...); a file
    lacking what a section reads is a ValueError naming it, not a KeyError."""
    import shutil
    added = {"tail": "none", "top_p": 1.0, "sinks": 0, "window": 0, "reuse": 0}  # the paper's
    bench = json.loads(pathlib.Path(RESULTS_DIR, BENCH_JSON).read_text(encoding="utf-8"))
    for r in bench["rows"]:
        if r["backend"] == "kcache":
            r["options"] = {k: v for k, v in r["options"].items() if k not in added}
    write_json(tmp_path / BENCH_JSON, bench)
    report.write(tmp_path)
    assert ("KCache options: topn=64, group_select=False, renormalize=True, dense_layers=(), "
            "tail=none, top_p=1.0, sinks=0, window=0, reuse=0.") in \
        (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    # the committed eval.json with the added options left out where they are the paper's
    data = json.loads(pathlib.Path(RESULTS_DIR, EVAL_JSON).read_text(encoding="utf-8"))
    for c in [r["config"] for r in data["results"]] + data["planned"]:
        for k in [k for k, v in added.items() if c.get(k) == v]:
            del c[k]
    folder = tmp_path / "eval"
    folder.mkdir()
    shutil.copy(tmp_path / BENCH_JSON, folder)
    write_json(folder / EVAL_JSON, data)
    report.write(folder)
    ours = (folder / "REPORT.md").read_text(encoding="utf-8").split("## Throughput")[0]
    committed = pathlib.Path(RESULTS_DIR, "REPORT.md").read_text(encoding="utf-8")
    assert ours == committed.split("## Throughput")[0]
    del data["results"][1]["short"]
    write_json(folder / EVAL_JSON, data)
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder / EVAL_JSON))} lacks 'short', "
                                         f"which its report section reads"):
        report.write(folder)
    data["results"][1]["short"] = None  # edited by hand: was an AttributeError's traceback
    write_json(folder / EVAL_JSON, data)
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder / EVAL_JSON))} holds a value "
                                         f"its report section cannot read \\('NoneType' object "
                                         f"has no attribute 'get'\\): an edited or corrupt file"):
        report.write(folder)


def committed(folder, name, **changes):
    """The committed results file ``name`` (bench.json, eval.json), read, with ``changes`` to its
    top level, and written into ``folder``; what was written is returned."""
    data = json.loads(pathlib.Path(RESULTS_DIR, name).read_text(encoding="utf-8"))
    data.update(changes)
    write_json(folder / name, data)
    return data


@pytest.mark.parametrize("options, error", [({"topn": 0}, "topn must be an integer >= 1"),
                                            ({"top_n": 4}, "unknown option")],
                         ids=["bad-value", "unknown-option"])
def test_a_results_file_with_options_no_version_reads_is_named(tmp_path, options, error):
    """A results file whose KCache options this version refuses (edited by hand, or a later
    version's) is a ValueError naming the file, not a bare options error or a TypeError."""
    data = committed(tmp_path, BENCH_JSON)
    row = next(r for r in data["rows"] if r["backend"] == "kcache")
    row["options"] = {**row["options"], **options}
    write_json(tmp_path / BENCH_JSON, data)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / BENCH_JSON))}: a "
                                         f"configuration kcache_ops does not read: .*{error}"):
        report.write(tmp_path)


@pytest.mark.parametrize("name, key", [(BENCH_JSON, "rows"), (EVAL_JSON, "results"),
                                       (EVAL_JSON, "planned")])
def test_a_results_file_with_a_null_list_is_named(tmp_path, name, key):
    """A list of a results file edited to a null is a ValueError naming the file (it was a
    TypeError's traceback from reading the options the rows hold)."""
    committed(tmp_path, name, **{key: None})
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / name))} holds a value the "
                                         f"report cannot read .*: an edited or corrupt file"):
        report.write(tmp_path)


def test_the_bench_plot_is_drawn_only_where_missing_and_asked(tmp_path):
    """The report draws the plot of a complete bench.json only where the folder lacks it (a
    plot already there, the run's own, is kept as it is) and only with draw_bench (the bench
    command draws it itself, and says where that failed)."""
    committed(tmp_path, BENCH_JSON)
    plot = tmp_path / BENCH_PLOT
    report.write(tmp_path, draw_bench=False)
    assert not plot.exists(), "drawn with draw_bench=False"
    assert "](bench_throughput.png)" not in (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    plot.write_bytes(b"the run's own plot")
    report.write(tmp_path)
    assert plot.read_bytes() == b"the run's own plot", "a plot already there was drawn again"
    assert "![throughput vs context](bench_throughput.png)" in \
        (tmp_path / "REPORT.md").read_text(encoding="utf-8")


def test_a_small_bench_run_says_how_to_run_the_gpu_one(tmp_path):
    """A report of a ``bench --small`` run (or of none) gives the command of the GPU run; one of
    a full run does not."""
    for small in (None, True, False):  # None: no bench.json
        if small is not None:
            committed(tmp_path, BENCH_JSON, small=small)
        report.write(tmp_path, draw_bench=False)
        text = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
        assert (f"    {report.GPU_COMMAND}" in text) == (small is not False), f"small={small}"
        assert ("The GPU run of this benchmark" in text) == (small is not False), f"small={small}"


def test_a_run_with_dense_alone_links_no_earlier_plots(tmp_path):
    """Saved after its dense result (or cut off there), a run's page shows no KCache plots, and
    an earlier run's are removed, not shown under this run's table."""
    data = committed(tmp_path, EVAL_JSON)
    report.write(tmp_path)
    assert (tmp_path / "eval_budget.png").is_file() and (tmp_path / "eval_accuracy.png").is_file()
    data["results"] = data["results"][:1]
    data["recommended"] = None
    write_json(tmp_path / EVAL_JSON, data)
    report.write(tmp_path)
    text = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert "eval_budget.png" not in text and "eval_accuracy.png" not in text
    assert "eval_mass.png" in text
    assert not (tmp_path / "eval_budget.png").exists()
    assert not (tmp_path / "eval_accuracy.png").exists()


def test_a_nan_perplexity_is_reported_and_never_recommended(tmp_path):
    """A configuration whose perplexity is NaN (a float16 model's overflow; null in the JSON) is
    printed as nan, misses the targets, and is not recommended over a finite one (max(0, nan)
    had made its excess 0)."""
    from kcache_ops.eval import perplexity, recommend
    from kcache_ops.eval.summary import summarize
    data = committed(tmp_path, EVAL_JSON)
    results = data["results"]
    bad = results[1]
    for context in ("short", "long"):
        rows = len(bad[context]["perplexity"]["ppl_rows"])
        bad[context]["perplexity"] = perplexity.summarize(torch.full((rows, 1), float("nan")))
    bad["summary"] = summarize(bad, results[0])
    for r in results[1:]:  # the others as the NaN one, but for a finite |Δ ppl| over the target
        if r is not bad:
            r["summary"] = {**bad["summary"], "dppl": {"short": 1.0, "long": 1.0},
                            "host_bytes_per_step": 2 * bad["summary"]["host_bytes_per_step"]}
        r["summary"]["host_rows"] = 2.0 if r is bad else 8.0  # the NaN one the fewest rows
    misses = {sum(not ok for ok in recommend.assess(r["summary"], results[0]["summary"]).values())
              for r in results[1:]}
    assert len(misses) == 1  # a tie on targets missed: the |Δ ppl| excess decides
    rec = recommend.recommend(results)
    assert rec["config"] != bad["config"]
    assert recommend.small_budget([results[0], bad, results[2]])["config"] == results[2]["config"]
    data["recommended"] = rec
    write_json(tmp_path / EVAL_JSON, data)
    report.write(tmp_path)
    text = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| kcache"))
    assert "+nan%" in row
