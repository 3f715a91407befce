"""``python -m kcache_ops eval``: accuracy of KCache against dense on the embedded SmolLM2 (or
another model): perplexity, needle retrieval, greedy agreement, attention mass, over a grid of
N x group_select x renormalize x dense_layers. Writes bench/results/eval.json, the plots and
REPORT.md; the results are saved after each configuration.

The defaults run the full grid (40 configurations + dense) in about half an hour on two CPU cores;
``--quick`` is a seconds-long smoke run; ``--gpu-sizes`` longer texts for a GPU.
"""
import os
import shlex
import sys

import torch

from .. import report
from ..eval.report import EVAL_JSON
from ..eval.runner import grid
from ..eval.suite import Settings, evaluate, save_json
from ..model import load_model
from ..model.load import DEFAULT_NAME
from ..results import RESULTS_DIR, machine
from .args import add_engine_argument, add_model_arguments, dtype_of, int_list


def add_arguments(parser):
    add_model_arguments(parser)
    add_engine_argument(parser)
    parser.add_argument("--topn", type=int_list, default=(16, 32, 64, 128, 256),
                        help="comma-separated N values (default 16,32,64,128,256)")
    parser.add_argument("--dense-layers", type=int_list, default=(0, 1),
                        help="the dense_layers variant besides none (default 0,1)")
    parser.add_argument("--defaults-only", action="store_true",
                        help="only N varies; group_select, renormalize, dense_layers stay at "
                             "their defaults")
    parser.add_argument("--ppl-rows", type=int, help="perplexity windows (default 6)")
    parser.add_argument("--agree-rows", type=int, help="agreement prompts (default 2)")
    parser.add_argument("--prefill", type=int, help="prefill tokens of those rows (default 1536)")
    parser.add_argument("--steps", type=int, help="decode steps of those rows (default 256)")
    parser.add_argument("--needle-lengths", type=int_list,
                        help="haystack lengths in tokens (default 1024,2048,4096,8000)")
    parser.add_argument("--answer-steps", type=int, help="decode steps of a needle answer (16)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and N in {16, 64}: a smoke run of the machinery")
    parser.add_argument("--gpu-sizes", action="store_true",
                        help="larger texts for a GPU: 16 windows of 4096 + 512 steps, "
                             "haystacks up to 8000 tokens")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (1 is faster on a CPU that others share)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite REPORT.md and the plots from the JSON in --out")
    parser.add_argument("--out", default=RESULTS_DIR,
                        help="folder of the JSON, plots and REPORT.md (default bench/results of "
                             "the source tree)")


def settings(args):
    """Settings from the presets and the explicit size options (explicit ones win)."""
    s = Settings()
    if args.quick:
        s = Settings(ppl_rows=2, agree_rows=1, prefill=96, steps=16, needle_lengths=(200,),
                     needle_depths=(0.2, 0.8), answer_steps=12)
    elif args.gpu_sizes:
        s = Settings(ppl_rows=16, agree_rows=8, prefill=4096, steps=512)
    for name in ("ppl_rows", "agree_rows", "prefill", "steps", "needle_lengths", "answer_steps"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    return s


def run(args):
    if args.report_only:
        report.write(args.out)
        print(f"# wrote {os.path.join(args.out, 'REPORT.md')}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    s = settings(args)
    topns = (16, 64) if args.quick and args.topn == (16, 32, 64, 128, 256) else args.topn
    if args.defaults_only:
        configs = grid(topns, group_select=(False,), renormalize=(True,))
    else:
        configs = grid(topns, dense_layers=((), args.dense_layers) if args.dense_layers
                       else ((),))
    if args.engine == "transformers":
        from ..integrations.transformers_engine import load_transformers_model
        model, tokenizer = load_transformers_model(args.model, args.device, dtype_of(args))
    else:
        model, tokenizer = load_model(args.model, args.device, dtype_of(args))
    engine = " via transformers" if args.engine == "transformers" else ""
    info = {**machine(model.device), "model": (args.model or DEFAULT_NAME) + engine}
    command = "python -m kcache_ops eval " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["eval"]
                                                       else sys.argv[1:])
    path = os.path.join(args.out, EVAL_JSON)

    def save(results):
        save_json(path, s, info, results, command)
        report.write(args.out)

    print(f"# {len(configs)} KCache configurations + dense on {info['device']}; "
          f"results in {path}", flush=True)
    evaluate(model, tokenizer, s, configs, save)
    print(f"# wrote {path} and {os.path.join(args.out, 'REPORT.md')}")
