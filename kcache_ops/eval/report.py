"""The accuracy section of bench/results/REPORT.md (assembled by :mod:`kcache_ops.report`) from the
``eval`` command's JSON: the table, the plots, the verdicts."""
import os

from ..caches import KCacheOptions
from ..results import ran_on
from . import mass, perplexity
from .runner import Config, grid

EVAL_JSON = "eval.json"
DEFAULT_TOPN = KCacheOptions().topn


def _needle_hits(result):
    """(correct, total) over every needle group of ``result``."""
    groups = [v for k, v in result.items() if k.startswith("needle-")]
    return sum(sum(g["correct"]) for g in groups), sum(len(g["correct"]) for g in groups)


def plot_accuracy(data, path):
    """Δ perplexity (%), needle accuracy and greedy match rate against N, one curve per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    dense = results[0]
    curves = {}
    for r in results[1:]:
        c = Config.from_dict(r["config"]).options
        hits, total = _needle_hits(r)
        curves.setdefault(c.variant, []).append(
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
    out = ["## Accuracy (SmolLM2-135M-Instruct)", "", ran_on(m, f", model {m['model']}."),
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
    options = [c.options for c in done]
    spanned = grid(sorted({o.topn for o in options}), sorted({o.group_select for o in options}),
                   sorted({o.renormalize for o in options}),
                   sorted({o.dense_layers for o in options}))
    return [c for c in spanned if c not in done]


def verdicts(results):
    """Plain sentences: the target at the default N, and the smallest N of each variant that
    meets it."""
    dense = results[0]
    d_hits, _ = _needle_hits(dense)
    meets, lines = {}, []
    for r in results[1:]:
        c = Config.from_dict(r["config"]).options
        hits, total = _needle_hits(r)
        d = perplexity.delta(r["long"]["perplexity"], dense["long"]["perplexity"])
        ok = d <= 1.0 and hits >= d_hits
        meets.setdefault(c.variant, []).append((c.topn, ok, d, hits, total))
    for variant, rows in meets.items():
        rows.sort()
        at_default = [x for x in rows if x[0] == DEFAULT_TOPN]
        passing = [x[0] for x in rows if x[1]]
        head = f"* **{variant}**: "
        if at_default:
            n, ok, d, hits, total = at_default[0]
            head += (f"N={n} {'meets' if ok else 'MISSES'} the target (Δ ppl {d:+.2f}%, needle "
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
    masses = sorted(((Config.from_dict(r["config"]).options, r["mass"]["long"])
                     for r in results[1:] if "long" in r.get("mass", {})),
                    key=lambda x: (x[0].group_select, x[0].topn))
    for c, long in masses:
        if c.variant in ("default", "gs"):
            low = min(range(len(long)), key=long.__getitem__)
            lines.append(f"* attention mass in the top {c.topn}"
                         f"{' (group select)' if c.group_select else ''}: mean "
                         f"{sum(long) / len(long):.3f} over layers, lowest in layer {low} "
                         f"({long[low]:.3f}).")
    return lines


def write_plots(data, results_dir):
    """eval_accuracy.png and eval_mass.png in ``results_dir`` from the eval JSON ``data``."""
    plot_accuracy(data, os.path.join(results_dir, "eval_accuracy.png"))
    needles = sorted((k for k in data["results"][0] if k.startswith("needle-")),
                     key=lambda k: int(k.split("-")[1]))
    mass.plot(data["results"], os.path.join(results_dir, "eval_mass.png"),
              ("long",) + tuple(needles[-1:]))
