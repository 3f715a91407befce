"""``python -m kcache_ops bench``: decode throughput of the reference decoder with the ``dense``
backend against KCache at one device-memory budget (see :mod:`kcache_ops.throughput`). One line
per configuration, then bench/results/bench.json, bench_throughput.png and REPORT.md; a run cut
off (an error, Ctrl-C, SIGTERM) after its first configuration leaves REPORT.md of the rows it
measured, said to be cut off, and no plot. The run first measures its ceilings (the device-memory
copy rate, and on CUDA the pinned host->device rate), and each row says how near its decode step
comes to the floor they set.
``--engine transformers`` runs the same caches under transformers' LlamaForCausalLM of each shape.

``--device cpu --small`` runs tiny shapes and short contexts: a smoke test of the machinery.
"""
import contextlib
import functools
import os
import signal

from .. import report
from ..devices import default_device
from ..results import RESULTS_DIR, SMOKE_DIR, machine, prepare_out_dir, write_json
from ..throughput.ceilings import describe, measure_ceilings
from ..throughput.measure import device_budget, host_budget, measure
from ..throughput.report import BENCH_JSON, BENCH_PLOT, draw
from ..throughput.shapes import DEFAULT_CONTEXTS, DEFAULT_MODELS, SHAPES
from ..throughput.transformers_baseline import transformers_missing
from .args import (add_device_arguments, add_engine_argument, add_kcache_arguments,
                   bounded_float, command_line, dtype_of, kcache_options, positive_int,
                   positive_int_list)


SMALL_CONTEXTS = DEFAULT_CONTEXTS["tiny"]
MAX_GB = 1e9


def add_arguments(parser):
    add_device_arguments(parser, dtype_default="bfloat16")
    parser.add_argument("--models",
                        help=f"comma-separated, of {', '.join(SHAPES)} (default "
                             f"{','.join(DEFAULT_MODELS)}; tiny with --small)")
    parser.add_argument("--contexts", type=positive_int_list,
                        help="prompt lengths in tokens, for every model (default each model's "
                             "own: " + "; ".join(f"{m} {','.join(map(str, DEFAULT_CONTEXTS[m]))}"
                                                 for m in DEFAULT_MODELS)
                             + f"; {','.join(map(str, SMALL_CONTEXTS))} with --small)")
    # at most an exabyte: 1e300 GB was an OverflowError in bytes
    parser.add_argument("--budget", type=bounded_float(0.0, MAX_GB, low_open=True),
                        help="GB of device memory for the cache (default: what is free after the "
                             "weights, less --reserve)")
    parser.add_argument("--reserve", type=bounded_float(0.0, MAX_GB), default=6.0,
                        help="GB kept free for activations when --budget is not given (default 6)")
    parser.add_argument("--max-batch", type=positive_int, default=256,
                        help="the largest batch tried, however much the budget holds "
                             "(default 256)")
    parser.add_argument("--steps", type=positive_int,
                        help="timed decode steps (default 32; 8 with --small)")
    add_kcache_arguments(parser)
    add_engine_argument(parser)
    parser.add_argument("--no-hf", dest="hf", action="store_false",
                        help="skip the Hugging Face transformers comparison")
    parser.add_argument("--small", action="store_true",
                        help="tiny shapes, short contexts, a 4 MB budget and 8 steps (each "
                             "unless given): tests the machinery on a CPU")
    parser.add_argument("--out",
                        help=f"folder of bench.json, its plot and REPORT.md (default "
                             f"{RESULTS_DIR}; with --small {SMOKE_DIR})")


def run(args):
    options = kcache_options(args)  # a bad flag, before the folder is made and anything measured
    device = args.device or default_device()
    models = ([m.strip() for m in args.models.split(",")] if args.models is not None
              else ["tiny"] if args.small else DEFAULT_MODELS)
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        raise ValueError(f"--models: unknown {', '.join(m or repr(m) for m in unknown)}; "
                         f"known: {', '.join(SHAPES)}")
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:  # as --contexts: a shape twice would run twice
        raise ValueError(f"--models: expected each shape once, got {', '.join(twice)} twice")
    contexts = {m: args.contexts or (SMALL_CONTEXTS if args.small else DEFAULT_CONTEXTS[m])
                for m in models}
    budget, steps = args.budget, args.steps or (8 if args.small else 32)
    if args.small:
        budget = budget or 0.004
    if budget is None and device.type != "cuda":
        raise SystemExit("error: give --budget (GB) on the CPU, or --small")
    if budget is not None:  # more than the device (the host RAM) has: before anything runs
        device_budget(device, budget, args.reserve)
    args.out = prepare_out_dir(args.out, args.small)
    info = {**machine(device), "engine": args.engine}
    if transformers_missing() is None:  # the version its rows (or the engine's) ran with
        import transformers
        info["transformers"] = transformers.__version__
    command = command_line(args, "bench")
    path = os.path.join(args.out, BENCH_JSON)
    settings = {"dtype": str(dtype_of(args)).removeprefix("torch."), "steps": steps,
                "max_batch": args.max_batch, "reserve_gb": args.reserve, "budget_gb": budget,
                "host_budget_bytes": host_budget(), "contexts": contexts}

    saved = []  # whether this run has written bench.json (the report then follows it)
    ceilings = {}

    def save(rows, complete=False):
        write_json(path, {"machine": info, "command": command, "settings": settings,
                          "ceilings": ceilings, "small": args.small, "complete": complete,
                          "rows": rows})
        saved.append(complete)

    plot_path, finished = os.path.join(args.out, BENCH_PLOT), False
    try:
        with _sigterm_as_interrupt():
            ceilings.update(measure_ceilings(device))
            print(f"# ceilings: {describe(ceilings)}", flush=True)
            rows = measure(models, contexts, device, dtype_of(args), options,
                           steps, budget, args.reserve, args.max_batch, args.hf, args.engine,
                           log=functools.partial(print, flush=True), on_rows=save,
                           ceilings=ceilings, host_bytes=settings["host_budget_bytes"])
            save(rows, complete=True)
            failed = draw(rows, plot_path)
            if failed:  # the rows are saved: the run's result stands without its plot
                print(f"# the plot could not be drawn: {failed}", flush=True)
            finished = True
    finally:
        if saved and not finished:  # cut off (an error, Ctrl-C, SIGTERM) after a row was saved:
            _cut_off_report(args.out, plot_path)  # REPORT.md of the partial bench.json
    report.write(args.out, draw_bench=False)  # drawn above, or failed
    drawn = f"{BENCH_PLOT}, " if os.path.exists(plot_path) else ""
    print(f"# wrote {path}, {drawn}REPORT.md")


def _cut_off_report(out, plot_path):
    """After a run cut off: remove the previous run's plot (the plot is drawn at a run's end) and
    rewrite REPORT.md from the incomplete bench.json, so that neither tells of an older run. A
    failure here is a line, not an error hiding the one that cut the run off."""
    try:
        if os.path.exists(plot_path):
            os.remove(plot_path)
        report.write(out)
        print(f"# the run was cut off: wrote REPORT.md of its {BENCH_JSON} so far, no plot",
              flush=True)
    except Exception as e:  # the run's own error is on its way up: not hidden by this
        print(f"# the run was cut off, and REPORT.md could not be rewritten: {e}", flush=True)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a time limit, ``kill``) raised as KeyboardInterrupt while inside, so that a run
    stopped that way still rewrites its report; where signals cannot be set (not the main
    thread), as it was."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
