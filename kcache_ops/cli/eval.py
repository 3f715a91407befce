"""``python -m kcache_ops eval``: accuracy of KCache against dense on the embedded SmolLM2 (or
another model): perplexity at a short and a long context, needle retrieval in three phrasings,
greedy agreement, attention mass, and each configuration's host and device bytes; the recommended
setting chosen from them by the rule of issue 12 (:mod:`kcache_ops.eval.recommend`). Writes
eval.json, the plots and REPORT.md into bench/results (``--quick``: into
:data:`kcache_ops.results.SMOKE_DIR`, ``$TMPDIR/kcache_ops_smoke``; ``--out``: where it says); the
results are saved after each configuration.

The defaults run the curated grid (:func:`kcache_ops.eval.grid.default_grid`, 12 configurations +
dense): with ``--threads 2`` on a 2-core machine about 12 minutes of prefill and 1.5-3.5 minutes
per configuration, under an hour in all; ``--topn`` / ``--tails`` / ``--group-select`` /
``--dense-layers`` run their product instead; ``--quick`` is a smoke run, under a minute on an idle
2-core CPU (``--threads 1`` where others share the cores); ``--gpu-sizes`` more and longer texts
for a GPU.
"""
import argparse
import os
import sys

from .. import report
from ..caches import TAILS, check_kcache
from ..eval import recommend
from ..eval.grid import default_grid, product_grid, quick_grid
from ..eval.report import EVAL_JSON
from ..eval.suite import Settings, evaluate, save_json
from ..model import load_model
from ..model.load import DEFAULT_NAME
from ..results import RESULTS_DIR, SMOKE_DIR, machine, out_dir, prepare_out_dir
from .args import (add_engine_argument, add_model_arguments, command_line, dtype_of,
                   layer_list, positive_int, positive_int_list)


def tail_list(text):
    """'none,int2' -> ("none", "int2"), each one of TAILS."""
    tails = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tails if t not in TAILS]
    if bad or not tails:
        raise argparse.ArgumentTypeError(f"expected comma-separated values of "
                                         f"{', '.join(TAILS)}, got {text!r}")
    return tails


def add_arguments(parser):
    add_model_arguments(parser)
    add_engine_argument(parser)
    parser.add_argument("--topn", type=positive_int_list,
                        help="comma-separated N values; this or any of --tails, "
                             "--group-select, --dense-layers runs the product of the values "
                             "given (N default 64) instead of the curated grid")
    parser.add_argument("--tails", type=tail_list,
                        help=f"comma-separated tails of the product ({', '.join(TAILS)}; "
                             "default none)")
    parser.add_argument("--group-select", action="store_true",
                        help="the product also has each configuration with group_select")
    parser.add_argument("--dense-layers", type=layer_list,
                        help="the product also has each configuration with these dense layers, "
                             "e.g. 0,1")
    for flag, help_text in (
            ("--ppl-rows", "short-context perplexity windows (default 6)"),
            ("--agree-rows", "agreement prompts (default 2)"),
            ("--prefill", "prefill tokens of those rows (default 1536)"),
            ("--steps", "decode steps of those rows (default 256)"),
            ("--long-rows", "long-context perplexity windows (default 3)"),
            ("--long-prefill", "their prefill tokens (default 6144)"),
            ("--long-steps", "their decode steps (default 96)"),
            ("--answer-steps", "decode steps of a needle answer (default 16)")):
        parser.add_argument(flag, type=positive_int, help=help_text)
    parser.add_argument("--needle-lengths", type=positive_int_list,
                        help="haystack lengths in tokens (default 1024,2048,4096,8000)")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true",
                       help="tiny sizes and N=16 without and with the 2-bit tail: a smoke run "
                            "of the machinery")
    sizes.add_argument("--gpu-sizes", action="store_true",
                       help="more and longer texts for a GPU: 16 windows of 4096 + 512 steps "
                            "and 4 agreement prompts of the same, 8 windows of 6144 + 256 steps")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite REPORT.md and the plots from the JSON in --out")
    parser.add_argument("--out",
                        help=f"folder of the JSON, plots and REPORT.md (default {RESULTS_DIR}; "
                             f"with --quick {SMOKE_DIR})")


def settings(args):
    """Settings from the presets and the explicit size options (explicit ones win)."""
    s = Settings()
    if args.quick:
        s = Settings(ppl_rows=2, agree_rows=1, prefill=96, steps=16, long_rows=1,
                     long_prefill=320, long_steps=8, needle_lengths=(200,),
                     needle_depths=(0.2, 0.8))  # the answers' 17 tokens: a preamble's room
    elif args.gpu_sizes:  # 151,388 of the essays' 154,028 tokens (SmolLM2's tokenizer)
        s = Settings(ppl_rows=16, agree_rows=4, prefill=4096, steps=512, long_rows=8,
                     long_steps=256)
    for name in ("ppl_rows", "agree_rows", "prefill", "steps", "long_rows", "long_prefill",
                 "long_steps", "needle_lengths", "answer_steps"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    return s


def configs(args):
    """The KCache configurations: the product of the values given, else the quick or the
    curated default grid."""
    if args.topn or args.tails or args.group_select or args.dense_layers:
        return product_grid(args.topn or (64,), args.tails or ("none",),
                            (False, True) if args.group_select else (False,),
                            ((), args.dense_layers) if args.dense_layers else ((),))
    return quick_grid() if args.quick else default_grid()


# the options that --report-only (which measures nothing) reads; any other is a measurement's
REPORT_OPTIONS = ("report_only", "out", "quick")


def measurement_flags(args):
    """The flags among ``args`` that only a measurement reads, given other than their defaults
    (every option of :func:`add_arguments` but :data:`REPORT_OPTIONS`)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    return [f"--{name.replace('_', '-')}" for name, default in defaults.items()
            if name not in REPORT_OPTIONS and getattr(args, name, default) != default]


def run(args):
    if args.report_only:  # before the folder is made: an error leaves nothing behind
        given = measurement_flags(args)
        if given:
            raise ValueError(f"--report-only rewrites the report from the JSON in --out and "
                             f"measures nothing; {', '.join(given)} would have no effect: drop "
                             f"them, or drop --report-only to measure")
        folder = out_dir(args.out, args.quick)
        if not os.path.isdir(folder):  # a mistyped --out: no report of nothing, no new folder
            raise ValueError(f"{'--out' if args.out else 'the results folder'} {folder} does not "
                             f"exist: --report-only rewrites the report in the folder an eval "
                             f"or bench run wrote")
    args.out = prepare_out_dir(args.out, args.quick)
    if args.report_only:
        report.write(args.out)
        print(f"# wrote {os.path.join(args.out, 'REPORT.md')}")
        if not any(name.endswith(".json") for name in os.listdir(args.out)):  # a typo in --out?
            print(f"# {args.out} holds no results (no .json file): the report says that nothing "
                  f"has run; --out names the folder an eval or bench run wrote", file=sys.stderr)
        return
    s, planned = settings(args), configs(args)
    if args.engine == "transformers":
        try:
            from ..integrations.transformers_engine import load_transformers_model
        except ImportError as e:  # transformers missing, or of a version not tested
            raise ValueError(f"--engine transformers: {e}") from e
        model, tokenizer = load_transformers_model(args.model, args.device, dtype_of(args))
    else:
        model, tokenizer = load_model(args.model, args.device, dtype_of(args))
    for config in planned:  # what this model cannot take, before the first hour of dense
        check_kcache(model.config, model.device, model.dtype, config.options)
    engine = " via transformers" if args.engine == "transformers" else ""
    name = os.path.basename(os.path.normpath(args.model)) if args.model else DEFAULT_NAME
    info = {**machine(model.device), "model": (args.model or DEFAULT_NAME) + engine,
            "model_name": name + engine}  # the file or folder name, for the report's heading
    command = command_line(args, "eval")
    path = os.path.join(args.out, EVAL_JSON)

    def save(results):
        save_json(path, s, info, results, command, planned, recommend.recommend(results))
        report.write(args.out)

    print(f"# {len(planned)} KCache configurations + dense on {info['device']}; "
          f"results in {path}", flush=True)
    results = evaluate(model, tokenizer, s, planned, save)
    rec = recommend.recommend(results)
    if rec:
        verdict = ("meets every target" if rec["meets_all"]
                   else "no configuration meets every target; this one is the closest, missing: "
                   + "; ".join(rec["misses"]))
        print(f"# recommended: {rec['name']} ({verdict})")
    print(f"# wrote {path} and {os.path.join(args.out, 'REPORT.md')}")
