"""bench/results/REPORT.md, generated from the JSON files of the results folder (never edited by
hand): the accuracy section (:mod:`kcache_ops.eval.report`), the throughput section
(:mod:`kcache_ops.throughput.report`), the sections of the GPU scripts in bench/, the machine
each ran on and the commands to reproduce. The ``eval`` and ``bench`` commands call
:func:`write` after saving their JSON."""
import os
import warnings

from .caches import KCacheOptions
from .eval import report as eval_report
from .results import CUT_OFF, RESULTS_DIR, load_json, ran_on, write_text
from .throughput import report as throughput_report
from .throughput.shapes import DEFAULT_CONTEXTS, DEFAULT_MODELS

GATHER_JSON = "gpu_gather.json"
GPU_COMMAND = ("make build && .venv/bin/python -m kcache_ops bench --device cuda && "
               ".venv/bin/python bench/gpu_gather.py && "
               ".venv/bin/python -m kcache_ops eval --report-only")


def gather_section(data):
    """Markdown of bench/gpu_gather.py's JSON, where it is present. The ratio to a memcpy of the
    row's own bytes and the speedup over the PyTorch way are "–" where they were not timed: JSON
    written before the memcpy was, write-combined rows for the PyTorch way (null). A run cut off
    before its end (``complete`` false) is said so, and its plot, drawn at the end only, is not
    shown."""
    meta = data["meta"]  # results.machine() and the ceiling
    complete = data.get("complete", True)  # files written before the key was: whole runs
    out = ["## Gather bandwidth (bench/gpu_gather.py)", "",
           ran_on(meta, f", pinned memcpy H2D ceiling {meta['h2d_ceiling_GBs']:.1f} GB/s."), ""]
    if not complete:
        out += CUT_OFF
    out += ["| row bytes | rows/head | memory | host memory read | GB/s | % of ceiling | "
            "% of a memcpy of its bytes | speedup vs torch |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        speedup = "–" if r.get("speedup_vs_torch") is None else f"{r['speedup_vs_torch']:.1f}x"
        same = r.get("pct_memcpy_same_bytes")
        same = "–" if same is None else f"{same:.0f}%"
        buffers = r.get("buffers", 1)  # rows written before the footprint rows: the script's
        # one 512 MiB buffer
        host = f"{r.get('host_GiB', 0.5):g} GiB" + (f" in {buffers} buffers" if buffers > 1 else "")
        if r["mem"] == "thp":  # what the machine gave the huge-page row (unknown under gVisor)
            gained = r.get("anon_huge_GiB")
            host += (f" ({r.get('thp_mode', 'unknown')} THP, "
                     + ("huge pages unknown)" if gained is None else f"{gained:.1f} GiB huge)"))
        out.append(f"| {r['row_bytes']} | {r['rows_per_head']} | {r['mem']} | {host} | "
                   f"{r['GBs']:.1f} | {r['pct_ceiling']:.0f}% | {same} | {speedup} |")
    plot = ["", "![gather bandwidth vs row size](gpu_gather.png)"] if complete else []
    return out + plot + [""]


# what the report reads of each JSON file: its top-level keys
REPORT_KEYS = {eval_report.EVAL_JSON: ("settings", "machine", "command", "results"),
               throughput_report.BENCH_JSON: ("machine", "command", "rows"),
               GATHER_JSON: ("meta", "rows")}


def load_result(results_dir, name):
    """The JSON object ``name`` of ``results_dir``, None where it is not there; ValueError where
    it is not an object with the keys the report reads (not written by this version)."""
    path = os.path.join(results_dir, name)
    data = load_json(path)
    missing = None if data is None else [k for k in REPORT_KEYS[name]
                                         if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a file this version of "
                         f"kcache_ops writes; rerun the command that wrote it")
    if data is not None:
        try:
            saved = [r.get("config") for r in data.get("results", ()) if isinstance(r, dict)]
            saved += list(data.get("planned", ()))
            saved += [r.get("options") for r in data.get("rows", ())
                      if isinstance(r, dict) and r.get("backend") == "kcache"]
        except TypeError as e:  # a list that is a null or a number: edited by hand
            raise ValueError(f"{path} holds a value the report cannot read ({e}): an edited or "
                             f"corrupt file; rerun the command that wrote it") from None
        if isinstance(data.get("recommended"), dict):
            saved.append(data["recommended"].get("config"))
        try:
            for options in saved:
                if options is not None:  # else the section finds it missing
                    _fill_options(options)
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: a configuration kcache_ops does not read: {e}") from None
    return data


def _fill_options(saved):
    """Give the KCache options ``saved`` (a dict of a results file, dense's ``{"backend":
    "dense"}`` left as it is) every option this version has: one a run of an earlier version did
    not write did not exist then, so it was off, the paper's value (:meth:`KCacheOptions
    .paper_literal`), not today's default; then check them (ValueError)."""
    if saved.get("backend", "kcache") != "kcache":
        return
    options = {k: v for k, v in saved.items() if k != "backend"}
    filled = KCacheOptions.paper_literal(**options)
    saved.update(filled.to_dict())


def write(results_dir=RESULTS_DIR, draw_bench=True):
    """(Re)write ``results_dir``/REPORT.md and the eval plots from the JSON files present, and,
    with ``draw_bench``, the bench plot of a complete bench.json where it is missing (copied
    without it, say; a plot that fails is a warning); ValueError naming a file that lacks what
    its section reads (an earlier version's)."""
    lines = ["# KCache: accuracy and throughput", "",
             "Generated by `python -m kcache_ops eval` and `python -m kcache_ops bench` from the "
             "JSON files beside this page; do not edit by hand.", ""]
    evaluation = eval_report.with_nan(load_result(results_dir, eval_report.EVAL_JSON))
    if evaluation and evaluation["results"]:
        def accuracy():  # its plots, and its lines
            eval_report.write_plots(evaluation, results_dir)
            return eval_report.eval_section(evaluation)
        lines += _section(results_dir, eval_report.EVAL_JSON, accuracy) + [""]
    else:
        lines += ["## Accuracy", "", "Not run yet: `python -m kcache_ops eval`.", ""]
    bench = load_result(results_dir, throughput_report.BENCH_JSON)
    plot_path = os.path.join(results_dir, throughput_report.BENCH_PLOT)
    if draw_bench and bench and bench.get("complete", True) and not os.path.isfile(plot_path):
        failed = throughput_report.draw(bench["rows"], plot_path)
        if failed:
            warnings.warn(f"{plot_path} could not be drawn: {failed}")
    drawn = os.path.isfile(plot_path)
    lines += (_section(results_dir, throughput_report.BENCH_JSON,
                       lambda: throughput_report.bench_section(bench, drawn)) if bench
              else ["## Throughput", "", "Not run yet.", ""])
    lines += throughput_report.memory_section()
    if not bench or bench.get("small"):
        contexts = "; ".join(f"{m} at {', '.join(map(str, DEFAULT_CONTEXTS[m]))}"
                             for m in DEFAULT_MODELS)
        lines += [f"The GPU run of this benchmark ({contexts} tokens of context) has not run "
                  f"yet; on a GPU:", "",
                  f"    {GPU_COMMAND}", ""]
    gather = load_result(results_dir, GATHER_JSON)
    lines += _section(results_dir, GATHER_JSON, lambda: gather_section(gather)) if gather else [
        "## Gather bandwidth", "", "bench/results/gpu_gather.json is not here yet "
        "(`python bench/gpu_gather.py` on a GPU).", ""]
    write_text(os.path.join(results_dir, "REPORT.md"), "\n".join(lines))


def _section(results_dir, name, build):
    """``build()``, the lines of the section of the file ``name``; a key it lacks (written by an
    earlier version), or a value of another kind (a null, a string for a number: an edited or
    corrupt file), is a ValueError naming the file."""
    path = os.path.join(results_dir, name)
    try:
        return build()
    except KeyError as e:
        raise ValueError(f"{path} lacks {e}, which its report section reads: an earlier "
                         f"version wrote it; rerun the command that wrote it") from e
    except (TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path} holds a value its report section cannot read ({e}): an edited "
                         f"or corrupt file; rerun the command that wrote it") from e
