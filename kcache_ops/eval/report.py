"""The accuracy section of bench/results/REPORT.md (assembled by :mod:`kcache_ops.report`) from the
``eval`` command's JSON: the settings, the table of accuracy and costs, the recommended setting,
what each option does, the plots."""
import os
from dataclasses import replace

from ..results import ran_on
from . import mass, perplexity, recommend
from .grid import PAPER_LITERAL, display_name
from .needle import PHRASINGS
from .runner import Config
from .summary import CONTEXTS

EVAL_JSON = "eval.json"
# the measures a run can find not finite (a model whose float16 overflowed: NaN perplexity and
# attention mass), which the JSON holds as null
MEASURES = ("nll", "ppl", "ppl_rows", "dppl", "mass")


def with_nan(obj, measure=False):
    """``obj``, the eval JSON as read, with each null below a key of :data:`MEASURES` as NaN: a
    number the report prints and plots ("nan"), not a None it cannot format."""
    if isinstance(obj, dict):
        return {k: with_nan(v, measure or k in MEASURES) for k, v in obj.items()}
    if isinstance(obj, list):
        return [with_nan(v, measure) for v in obj]
    return float("nan") if obj is None and measure else obj


def _name(result):
    """The display name of a result's configuration."""
    return display_name(Config.from_dict(result["config"]))


def _dppl(s):
    """'+0.12% / -0.30%': Δ ppl at the short and the long context."""
    return " / ".join(f"{s['dppl'][c]:+.2f}%" for c in CONTEXTS)


def _se(result, base, context):
    """The standard error of the change of perplexity from ``base`` to ``result`` at ``context``
    over their paired windows (see :func:`.perplexity.delta_se`), or None."""
    return perplexity.delta_se(result[context]["perplexity"], base[context]["perplexity"])


def _delta(result, base, context):
    """(the relative change of perplexity from ``base`` to ``result`` at ``context`` in %, its
    standard error over their paired windows or None)."""
    change = perplexity.delta(result[context]["perplexity"], base[context]["perplexity"])
    return change, _se(result, base, context)


def _change(result, base, context):
    """'-0.08% ±0.04': the relative change of perplexity from ``base`` to ``result`` at
    ``context`` (against dense: its Δ ppl), with its standard error."""
    change, se = _delta(result, base, context)
    return f"{change:+.2f}%" + ("" if se is None else f" ±{se:.2f}")


def _beyond_noise(result, base, context):
    """Whether the change of perplexity from ``base`` to ``result`` at ``context`` is more than
    twice its standard error over their paired windows (False where there is none)."""
    change, se = _delta(result, base, context)
    return se is not None and abs(change) > 2 * se


def _first_mismatches(rows, steps):
    """'47, never': the tokens until each agreement prompt's first mismatch."""
    return ", ".join("never" if n >= steps else str(n) for n in rows)


def _kib(n):
    """Bytes as KiB with one decimal."""
    return f"{n / 1024:.1f}"


def _count(n, word):
    """'1 window', '3 windows': ``n`` and ``word``, with an s unless ``n`` is 1."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def plot_budget(data, path):
    """Δ perplexity at both contexts (symlog y) against host bytes read per decode step and
    sequence (log x), one marker pair per KCache configuration, labelled -> PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    labels_at = {}  # host KiB -> labels placed there so far (configurations of the same N)
    for i, r in enumerate(data["results"][1:]):
        s, color = r["summary"], f"C{i % 10}"
        x = s["host_bytes_per_step"] / 1024
        ax.plot([x, x], [s["dppl"][c] for c in CONTEXTS], "-", color=color, lw=0.6)
        for context, marker in zip(CONTEXTS, "o^"):
            ax.plot([x], [s["dppl"][context]], marker, color=color, ms=7)
        shift = labels_at.get(x, 0)
        labels_at[x] = shift + 1
        ax.annotate(_name(r).removeprefix("kcache "), (x, s["dppl"]["long"]), fontsize=7,
                    xytext=(5, 3 - 9 * shift), textcoords="offset points", color=color)
    for y in (-recommend.MAX_DPPL, recommend.MAX_DPPL):
        ax.axhline(y, color="k", ls="--", lw=0.8)
    ax.plot([], [], "ko", label=f"{data['settings']['prefill']}-token context")
    ax.plot([], [], "k^", label=f"{data['settings']['long_prefill']}-token context")
    ax.plot([], [], "k--", lw=0.8, label=f"target ±{recommend.MAX_DPPL}%")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.3)
    ax.set_xlabel("host bytes read per decode step and sequence (KiB)")
    ax.set_ylabel("Δ perplexity vs dense (%)")
    ax.set_title("Accuracy against the PCIe budget")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(data, path):
    """Δ perplexity at both contexts and needle accuracy against N, one curve per variant (the
    options other than N) -> PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for r in data["results"][1:]:
        s = r["summary"]
        curves.setdefault(Config.from_dict(r["config"]).options.variant, []).append(
            (s["host_rows"], s["dppl"]["short"], s["dppl"]["long"],
             100 * s["needle"] / max(s["needle_total"], 1)))
    dense = data["results"][0]["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    titles = [f"Δ perplexity, {data['settings']['prefill']}-token context (%)",
              f"Δ perplexity, {data['settings']['long_prefill']}-token context (%)",
              "needle accuracy (%)"]
    refs = [(-recommend.MAX_DPPL, recommend.MAX_DPPL), (-recommend.MAX_DPPL, recommend.MAX_DPPL),
            (100 * dense["needle"] / max(dense["needle_total"], 1),)]
    for i, ax in enumerate(axes):
        for label, pts in curves.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[i + 1] for p in pts], "o-", label=label)
        for j, y in enumerate(refs[i]):
            ax.axhline(y, color="k", ls="--", lw=1, label=None if j else (
                f"target (±{recommend.MAX_DPPL}%)" if i < 2 else "dense"))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("host V rows read per head and step (N; fewer with top_p)")
        ax.set_title(titles[i], fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set_yscale("symlog", linthresh=0.3)
    axes[2].set_ylim(-5, 105)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_section(data):
    """Markdown of the accuracy evaluation (the JSON of ``python -m kcache_ops eval``)."""
    s, m, results = data["settings"], data["machine"], data["results"]
    out = [f"## Accuracy ({m.get('model_name', m['model'])})", ""]
    if "summary" not in results[0]:
        return out + ["eval.json is from an earlier version of the evaluation (no tails, one "
                      "context length); `python -m kcache_ops eval` reruns it.", ""]
    dense = results[0]["summary"]
    phrasings = list(dense["needle_by_phrasing"])
    lengths = list(dense["needle_by_length"])
    out += [ran_on(m, f", model {m['model']}."), f"Command: `{data['command']}`", "",
            f"* perplexity, short context: {_count(s['ppl_rows'], 'window')} of essay text, "
            f"{s['prefill']} tokens of prefill, then {s['steps']} teacher-forced decode steps each "
            "(every scored prediction comes from a decode step);",
            f"* perplexity, long context: {_count(s['long_rows'], 'window')} of "
            f"{s['long_prefill']} tokens of prefill, then {s['long_steps']} teacher-forced decode "
            "steps each;",
            f"* agreement: {_count(s['agree_rows'], 'prompt')} of {s['prefill']} tokens of essay "
            f"text and the essay's next token, then {s['steps']} tokens generated greedily by "
            "dense; the others are teacher-forced along them (match rate: the share of steps "
            "whose greedy token is dense's; first mismatch: per prompt, the tokens until free "
            "greedy generation first departs from dense's, or never);",
            "* Δ ppl ±: the standard error of the per-window relative changes (each window "
            "against dense's same window), the noise of the text the windows happen to hold "
            "(two configurations are compared on their own paired windows, below);",
            f"* needle: a random 5-digit key in {len(s['needle_phrasings'])} phrasings "
            f"({', '.join(s['needle_phrasings'])}) at depths {s['needle_depths']} of "
            f"{s['needle_lengths']} tokens of essay text, chat template, greedy answer of up to "
            f"{s['answer_steps'] + 1} tokens, exact match of its first number;",
            "* costs, per sequence, of the cache of the long-context windows: V rows read from "
            "host per head and decode step (N), the bytes `host_bytes_read_per_step` counts "
            "(those rows and the new token's V written), and the cache's device bytes (K, V of "
            "dense layers, the low-bit copy or V sum of a tail, the V of hot rows, the reuse "
            "pool) per token of "
            "capacity, both in the model's dtype (float32 on the CPU: twice bfloat16's bytes a "
            "row, and a 2- or 4-bit copy weighs half "
            "as much against dense as it would against bfloat16), and the ratio to dense of the "
            "same caches in bfloat16 (the memory target must hold in both);",
            "* every text is prefilled once (dense, full attention — as KCache's prefill) and "
            "its K/V forked into each configuration; texts do not overlap (the needle haystacks of "
            "different lengths share their start).", "",
            f"Dense: perplexity {dense['ppl']['short']:.4f} (short), {dense['ppl']['long']:.4f} "
            f"(long), needle {dense['needle']}/{dense['needle_total']}.", "",
            "| configuration | host rows /head/step | host KiB /step/seq | device KiB /token "
            "(× dense) | Δ ppl short | Δ ppl long | needle hits at " + "/".join(lengths)
            + f" tokens (of {dense['needle_total'] // max(1, len(lengths))} each) | match "
            "rate (first mismatch) | s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        x = r["summary"]
        a = r["short"].get("agreement")
        agree = (f"{100 * a['match_rate']:.1f}% "
                 f"({_first_mismatches(a['first_divergence_rows'], s['steps'])})" if a else "—")
        out.append(f"| {_name(r)} | {x['host_rows']:.1f} | {_kib(x['host_bytes_per_step'])} | "
                   f"{_kib(x['device_bytes_per_token'])} ({x['device_ratio']:.2f}; bf16 "
                   f"{x['device_ratio_bf16']:.2f}) | "
                   + (" | ".join(_change(r, results[0], c) for c in CONTEXTS) if r is not
                      results[0] else "— | —")
                   + " | " + "/".join(str(x["needle_by_length"][n]) for n in lengths)
                   + f" = {x['needle']}/{x['needle_total']} | {agree} | {r['seconds']:.0f} |")
    out += ["", "Needle hits per phrasing (" + ", ".join(
        f"{p}: “{PHRASINGS[p][1]}”" for p in phrasings) + "):", "",
        "| configuration | " + " | ".join(phrasings) + " |", "|---" * (len(phrasings) + 1) + "|"]
    for r in results:
        x = r["summary"]["needle_by_phrasing"]
        out.append(f"| {_name(r)} | " + " | ".join(str(x[p]) for p in phrasings) + " |")
    missing = not_run(data)
    if missing:
        out += ["", f"**Cut short: {len(missing)} of {len(data['planned'])} KCache "
                "configurations did not run** (the run saves after each configuration, the most "
                "telling first): " + ", ".join(display_name(c) for c in missing) + "."]
    if len(results) > 1:  # the plots of KCache's results (write_plots draws them then only)
        out += ["", "![Δ perplexity against host bytes per step](eval_budget.png)", "",
                "![accuracy vs N](eval_accuracy.png)"]
    out += ["", "![attention mass per layer](eval_mass.png)", ""]
    out += recommendation(data.get("recommended"), results) + options_summary(results)
    return out


def not_run(data):
    """The planned configurations of ``data`` that have no result (a run cut short)."""
    done = [Config.from_dict(r["config"]) for r in data["results"]]
    return [c for c in map(Config.from_dict, data["planned"]) if c not in done]


def recommendation(rec, results=()):
    """The recommended setting in words, with its numbers, the rule, whether its Δ ppl is within
    the target beyond the noise of the windows (``results``: the run's, dense first) and the ≤ 8
    rows verdict."""
    out = ["### Recommended setting", ""]
    if rec is None:
        return out + ["No KCache configuration has run yet.", ""]
    n, d = rec["numbers"], rec["dense"]
    numbers = (f"{n['host_rows']:.1f} host rows per head and step, "
               f"{_kib(n['host_bytes_per_step'])} KiB per step and sequence, "
               f"{n['device_ratio']:.2f}x dense device bytes per token"
               f" ({n['device_ratio_bf16']:.2f}x in bfloat16),"
               f" Δ ppl {_dppl(n)} (short / long context), needle {n['needle']}/"
               f"{n['needle_total']} (dense {d['needle']}/{d['needle_total']}; per length "
               + ", ".join(f"{k}: {v} vs {d['needle_by_length'][k]}"
                           for k, v in n["needle_by_length"].items()) + ")")
    if rec["meets_all"]:
        out.append(f"**{rec['name']}** meets every target: {numbers}.")
    else:
        out.append(f"**No configuration meets every target.** The closest, **{rec['name']}**, "
                   f"misses: {'; '.join(rec['misses'])}. Its numbers: {numbers}.")
    chosen = next((r for r in results[1:] if r["config"] == rec["config"]), None)
    if chosen is not None:
        ses = {c: _se(chosen, results[0], c) for c in CONTEXTS}
        if all(v is not None for v in ses.values()):
            t = {c: perplexity.t_975(len(chosen[c]["perplexity"]["ppl_rows"]))
                 for c in CONTEXTS}
            bound = {c: abs(n["dppl"][c]) + t[c] * ses[c] for c in CONTEXTS}
            beyond = all(b <= recommend.MAX_DPPL for b in bound.values())
            out.append(f"Its Δ ppl has a standard error over the windows of "
                       + " / ".join(f"±{ses[c]:.2f}" for c in CONTEXTS)
                       + " points (short / long): the far end of its 95% interval (Student's "
                       "t over the windows) is "
                       + " / ".join(f"{bound[c]:.2f}%" for c in CONTEXTS) + ", so the "
                       f"{recommend.MAX_DPPL}% target is "
                       + ("met beyond that noise." if beyond else
                          "not established beyond the noise of these windows (more windows, "
                          "e.g. the GPU sizes, would tell; being the best of the grid on these "
                          "same windows also flatters it)."))
    out += ["", f"Rule: {rec['rule']}.", ""]
    small = rec.get("small_budget")
    if small:
        memory = "" if small["fits_memory"] else " (none at so few rows fits the memory target)"
        out.append(f"At ≤ {recommend.SMALL_ROWS} host rows ({small['target']}): the best is "
                   f"{small['name']}{memory}, Δ ppl {_dppl(small)} — "
                   f"{'meets' if small['met'] else 'MISSES'} it.")
        over = small.get("over_memory")
        if over:
            within = f" (within {recommend.SMALL_MAX_DPPL}%)" if over["within"] else ""
            out.append(f"Over the memory target, {over['name']} ({over['device_ratio_bf16']:.2f}x "
                       f"dense device bytes in bfloat16) comes closer: Δ ppl {_dppl(over)}"
                       f"{within}.")
    else:
        out.append(f"No configuration at ≤ {recommend.SMALL_ROWS} host rows ran.")
    return out + [""]


# each option the evaluation judges, and how to take it away from a configuration
WITHOUT = {"tail": lambda o: replace(o, tail="none"),
           "hot rows": lambda o: replace(o, sinks=0, window=0),
           "top_p": lambda o: replace(o, top_p=1.0)}


def options_summary(results):
    """Per option (tail, hot rows, top_p), in how many of its configurations it brings Δ ppl
    closer to dense at each context, and in how many of those by more than twice the change's
    standard error, against the same configuration without it (where that did
    not run, a tail is compared with the paper-literal N=64 in the configuration's own line
    only: that differs in more than the tail, so it is not counted); then one line per
    configuration but the paper-literal one with those comparisons; then the attention mass the
    top N capture."""
    by_config = {Config.from_dict(r["config"]): r for r in results[1:]}
    paper = by_config.get(Config("kcache", PAPER_LITERAL))
    # helps: option label -> per config, (contexts where closer to dense, those beyond the noise)
    lines, helps = [], {}
    for config, r in by_config.items():
        o = config.options
        if o == PAPER_LITERAL:
            continue
        x = r["summary"]
        line = (f"* {display_name(config)}: Δ ppl {_dppl(x)}, needle {x['needle']}/"
                f"{x['needle_total']}, {x['host_rows']:.1f} host rows, {x['device_ratio']:.2f}x "
                "dense device bytes")
        for option, take_away in WITHOUT.items():
            base = take_away(o)
            if base == o:
                continue
            plain = by_config.get(Config("kcache", base))
            exact = plain is not None
            if plain is None and option == "tail":
                plain = paper
            if plain is None or plain is r:
                continue
            p = plain["summary"]
            better = [c for c in CONTEXTS if abs(x["dppl"][c]) < abs(p["dppl"][c])]
            label = f"tail={o.tail}" if option == "tail" else option
            if exact:
                clear = [c for c in better if _beyond_noise(r, plain, c)]
                helps.setdefault(label, []).append((better, clear))
            where = " and ".join(f"the {c} context" for c in better) or "neither context"
            line += (f"; its {option} against {_name(plain)}"
                     + ("" if exact else " (the same without its tail did not run; this one "
                                         "differs in more, and is not counted above)")
                     + f" (Δ ppl {_dppl(p)}, needle {p['needle']}/{p['needle_total']}, "
                     f"{p['host_rows']:.1f} host rows): closer to dense at {where}; perplexity "
                     + " / ".join(_change(r, plain, c) for c in CONTEXTS) + " from it")
        lines.append(line + ".")
    out = ["### What each option does", "",
           "Each comparison gives the change of perplexity from the configuration without the "
           "option to the one with it, over their own paired windows, with its standard error "
           "(±): a change within about twice it is within the noise of the windows.", ""]
    for label, counted in sorted(helps.items()):
        out.append(f"* **{label}**, against the same configuration without it: closer to dense "
                   f"in " + ", ".join(
                       f"{sum(c in b for b, _ in counted)} of {len(counted)} at the {c} context "
                       f"({sum(c in k for _, k in counted)} beyond twice the standard error)"
                       for c in CONTEXTS) + ".")
    curves = mass.selections(results[1:])  # the curves of the mass plot
    for key, r in sorted(curves.items()):
        long = r.get("mass", {}).get("long")
        if long is None:
            continue
        low = min(range(len(long)), key=long.__getitem__)
        lines.append(f"* attention mass in the top N, {mass.label(key, r)}, long context (from "
                     f"{_name(r)}): mean {sum(long) / len(long):.3f} over layers, lowest in "
                     f"layer {low} ({long[low]:.3f}).")
    return out + lines


def write_plots(data, results_dir):
    """eval_budget.png, eval_accuracy.png and eval_mass.png in ``results_dir`` from the eval JSON
    ``data`` (nothing for the JSON of an earlier version; the first two only with a KCache
    result, an earlier run's removed until then)."""
    if "summary" not in data["results"][0]:
        return
    kcache_plots = {"eval_budget.png": plot_budget, "eval_accuracy.png": plot_accuracy}
    for name, plot in kcache_plots.items():
        path = os.path.join(results_dir, name)
        if len(data["results"]) > 1:
            plot(data, path)
        elif os.path.exists(path):  # an earlier run's, which this one's page would show
            os.remove(path)
    needles = [k for k in data["results"][0]["summary"]["needle_by_length"]]
    mass.plot(data["results"], os.path.join(results_dir, "eval_mass.png"),
              CONTEXTS + tuple(f"needle-{n}" for n in needles[-1:]))
