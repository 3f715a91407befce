"""bench/results/REPORT.md, generated from the JSON the ``eval`` and ``bench`` commands write
(never edited by hand): tables, plots, the machine each ran on and the commands to reproduce."""
import json
import os

from . import mass, perplexity
from .runner import Config, grid

RESULTS = os.path.join("bench", "results")
EVAL_JSON, BENCH_JSON, GATHER_JSON = "eval.json", "bench.json", "gpu_gather.json"


def _load(results_dir, name):
    path = os.path.join(results_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _ran_on(m, tail):
    """The machine line of a section: CPU, threads, device (GPU name), torch, then ``tail``."""
    return (f"Ran on {m['cpu']} (torch threads: {m['cores']}), device {m['device']}"
            f"{', ' + m['gpu'] if 'gpu' in m else ''}, torch {m['torch']}{tail}")


def _needle_hits(result):
    """(correct, total) over every needle group of ``result``."""
    groups = [v for k, v in result.items() if k.startswith("needle-")]
    return sum(sum(g["correct"]) for g in groups), sum(len(g["correct"]) for g in groups)


def _variant(c):
    """The options other than N, as a label: "default" or e.g. "gs, rn=0"."""
    parts = (["gs"] if c.group_select else []) + ([] if c.renormalize else ["rn=0"]) + (
        [f"dl={','.join(map(str, c.dense_layers))}"] if c.dense_layers else [])
    return ", ".join(parts) or "default"


def plot_accuracy(data, path):
    """Δ perplexity (%), needle accuracy and greedy match rate against N, one curve per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    dense = results[0]
    curves = {}
    for r in results[1:]:
        c = Config.from_dict(r["config"])
        hits, total = _needle_hits(r)
        curves.setdefault(_variant(c), []).append(
            (c.topn, perplexity.delta(r["long"]["perplexity"], dense["long"]["perplexity"]),
             100 * hits / max(total, 1), 100 * r["long"]["agreement"]["match_rate"]))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    titles = ["Δ perplexity vs dense (%)", "needle accuracy (%)", "greedy match rate (%)"]
    hits, total = _needle_hits(dense)
    refs = [1.0, 100 * hits / max(total, 1), None]
    for i, ax in enumerate(axes):
        for label, pts in curves.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[i + 1] for p in pts], "o-", label=label)
        if refs[i] is not None:
            ax.axhline(refs[i], color="k", ls="--", lw=1,
                       label="target (+1%)" if i == 0 else "dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (top-N V rows per head)")
        ax.set_title(titles[i])
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=1.0)
    for ax in axes[1:]:
        ax.set_ylim(-5, 105)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_section(data):
    """Markdown of the accuracy evaluation (the JSON of ``python -m kcache_ops eval``)."""
    s, m, results = data["settings"], data["machine"], data["results"]
    dense = results[0]
    d_hits, d_total = _needle_hits(dense)
    out = ["## Accuracy (SmolLM2-135M-Instruct)", "", _ran_on(m, f", model {m['model']}."),
           f"Command: `{data['command']}`", "",
           f"* perplexity: {s['ppl_rows']} windows of essay text, {s['prefill']} tokens of "
           f"prefill, then {s['steps']} teacher-forced decode steps each (every scored "
           "prediction comes from a decode step);",
           f"* agreement: {s['agree_rows']} prompts of {s['prefill']} tokens, {s['steps']} "
           "tokens generated greedily by dense; the others are teacher-forced along them "
           "(first mismatch = tokens until the first divergence of free greedy generation);",
           f"* needle: a random 5-digit pass key at depths {s['needle_depths']} of "
           f"{s['needle_lengths']} tokens of essay text, chat template, greedy answer of up to "
           f"{s['answer_steps'] + 1} tokens, exact match;",
           "* every text is prefilled once (dense, full attention — as KCache's prefill) and its "
           "K/V forked into each configuration.", "",
           f"Dense: perplexity {dense['long']['perplexity']['ppl']:.4f}, needle "
           f"{d_hits}/{d_total}.", "",
           "| configuration | ppl | Δ ppl | needle | match rate | tokens to 1st divergence | s |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        c = Config.from_dict(r["config"])
        hits, total = _needle_hits(r)
        ppl = r["long"]["perplexity"]
        a = r["long"].get("agreement")
        out.append(f"| {c.name} | {ppl['ppl']:.4f} | "
                   f"{perplexity.delta(ppl, dense['long']['perplexity']):+.2f}% | {hits}/{total} | "
                   + (f"{100 * a['match_rate']:.1f}% | {a['first_divergence']:.1f} | " if a
                      else "— | — | ") + f"{r['seconds']:.0f} |")
    missing = not_run(results)
    if missing:
        out += ["", f"**Cut for time: {len(missing)} of {len(missing) + len(results) - 1} KCache "
                "configurations did not run** (the run saves after each configuration, the most "
                "telling first): " + ", ".join(c.name for c in missing) + "."]
    out += ["", "![accuracy vs N](eval_accuracy.png)", "",
            "![attention mass per layer](eval_mass.png)", "", "### Where it breaks", ""]
    out += verdicts(results)
    return out


def not_run(results):
    """The configurations of the grid spanned by the values seen in ``results`` that have no
    result (a run cut short)."""
    done = [Config.from_dict(r["config"]) for r in results[1:]]
    spanned = grid(sorted({c.topn for c in done}), sorted({c.group_select for c in done}),
                   sorted({c.renormalize for c in done}), sorted({c.dense_layers for c in done}))
    return [c for c in spanned if c not in done]


def verdicts(results):
    """Plain sentences: the N=64 target, and the smallest N of each variant that meets it."""
    dense = results[0]
    d_hits, _ = _needle_hits(dense)
    meets, lines = {}, []
    for r in results[1:]:
        c = Config.from_dict(r["config"])
        hits, total = _needle_hits(r)
        d = perplexity.delta(r["long"]["perplexity"], dense["long"]["perplexity"])
        ok = d <= 1.0 and hits >= d_hits
        meets.setdefault(_variant(c), []).append((c.topn, ok, d, hits, total))
    for variant, rows in meets.items():
        rows.sort()
        at64 = [x for x in rows if x[0] == 64]
        passing = [x[0] for x in rows if x[1]]
        head = f"* **{variant}**: "
        if at64:
            n, ok, d, hits, total = at64[0]
            head += (f"N=64 {'meets' if ok else 'MISSES'} the target (Δ ppl {d:+.2f}%, needle "
                     f"{hits}/{total} vs dense {d_hits}/{total}). ")
        failing = [x for x in rows if not x[1]]
        if failing:
            head += "Breaks at N ∈ {" + ", ".join(
                f"{n} (Δ ppl {d:+.2f}%, needle {h}/{t})" for n, _, d, h, t in failing) + "}."
        else:
            head += f"Meets the target at every N measured ({', '.join(str(x[0]) for x in rows)})."
        if passing and failing:
            head += f" Smallest N that meets it: {min(passing)}."
        lines.append(head)
    masses = sorted(((Config.from_dict(r["config"]), r["mass"]["long"]) for r in results[1:]
                     if "long" in r.get("mass", {})),
                    key=lambda x: (x[0].group_select, x[0].topn))
    for c, long in masses:
        if _variant(c) in ("default", "gs"):
            low = min(range(len(long)), key=long.__getitem__)
            lines.append(f"* attention mass in the top {c.topn}"
                         f"{' (group select)' if c.group_select else ''}: mean "
                         f"{sum(long) / len(long):.3f} over layers, lowest in layer {low} "
                         f"({long[low]:.3f}).")
    return lines


def bench_section(data):
    """Markdown of the throughput benchmark (the JSON of ``python -m kcache_ops bench``)."""
    m = data["machine"]
    out = ["## Throughput (reference decoder, random weights)", "",
           _ran_on(m, f", transformers {m['transformers']}." if m.get("transformers") else "."),
           f"Command: `{data['command']}`", ""]
    if data.get("small"):
        out += ["**This is the CPU smoke run at tiny sizes (`--small`)**: it tests the machinery, "
                "its numbers say nothing about a GPU. The GPU run is still to be done (command "
                "below).", ""]
    out += ["| model | context | backend | batch | budget GiB | cache dev GiB | host GiB | "
            "prefill tok/s | decode tok/s | transformers tok/s | PCIe MiB/step | vs dense |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    gib = 2 ** 30
    for r in data["rows"]:
        hf = (f"{r['hf_decode_tok_s']:.1f} (dense {r['dense_vs_hf']:.2f}× of it)"
              if "hf_decode_tok_s" in r else "—")
        ratio = f"{r['vs_dense']:.2f}×" if "vs_dense" in r else "—"
        out.append(f"| {r['model']} | {r['context']} | {r['backend']} | {r['batch']} | "
                   f"{r['budget_bytes'] / gib:.3f} | {r['cache_device_bytes'] / gib:.3f} | "
                   f"{r['host_bytes'] / gib:.3f} | {r['prefill_tok_s']:.0f} | "
                   f"{r['decode_tok_s']:.1f} | {hf} | {r['pcie_bytes_per_step'] / 2**20:.2f} | "
                   f"{ratio} |")
    out += ["", "![throughput vs context](bench_throughput.png)", ""]
    return out


def gather_section(data):
    """Markdown of bench/gpu_gather.py's JSON, where it is present."""
    out = ["## Gather bandwidth (bench/gpu_gather.py)", "",
           f"GPU {data['meta']['gpu']}, torch {data['meta']['torch']}, pinned memcpy H2D ceiling "
           f"{data['meta']['h2d_ceiling_GBs']:.1f} GB/s.", "",
           "| row bytes | rows/head | memory | GB/s | % of ceiling |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['row_bytes']} | {r['rows_per_head']} | {r['mem']} | {r['GBs']:.1f} | "
                   f"{r['pct_ceiling']:.0f}% |")
    return out + ["", "![gather bandwidth vs row size](gpu_gather.png)", ""]


GPU_COMMAND = ("make build && .venv/bin/python -m kcache_ops bench --device cuda && "
               ".venv/bin/python bench/gpu_gather.py && "
               ".venv/bin/python -m kcache_ops eval --report-only")


def write(results_dir=RESULTS):
    """(Re)write ``results_dir``/REPORT.md and the eval plots from the JSON files present."""
    lines = ["# KCache: accuracy and throughput", "",
             "Generated by `python -m kcache_ops eval` and `python -m kcache_ops bench` from the "
             "JSON files beside this page; do not edit by hand.", ""]
    evaluation = _load(results_dir, EVAL_JSON)
    if evaluation and evaluation["results"]:
        plot_accuracy(evaluation, os.path.join(results_dir, "eval_accuracy.png"))
        needles = sorted((k for k in evaluation["results"][0] if k.startswith("needle-")),
                         key=lambda k: int(k.split("-")[1]))
        mass.plot(evaluation["results"], os.path.join(results_dir, "eval_mass.png"),
                  ("long",) + tuple(needles[-1:]))
        lines += eval_section(evaluation) + [""]
    else:
        lines += ["## Accuracy", "", "Not run yet: `python -m kcache_ops eval`.", ""]
    bench = _load(results_dir, BENCH_JSON)
    lines += bench_section(bench) if bench else ["## Throughput", "", "Not run yet.", ""]
    if not bench or bench.get("small"):
        lines += ["The GPU run (Llama-3-8B and SmolLM2 shapes, contexts 8K / 32K / 64K, one "
                  "H100), not yet run: no GPU was available to the session that wrote this:", "",
                  f"    {GPU_COMMAND}", ""]
    gather = _load(results_dir, GATHER_JSON)
    lines += gather_section(gather) if gather else [
        "## Gather bandwidth", "", "bench/results/gpu_gather.json is not here yet "
        "(`python bench/gpu_gather.py` on a GPU).", ""]
    with open(os.path.join(results_dir, "REPORT.md"), "w") as f:
        f.write("\n".join(lines))
