"""The attention mass the top N capture, per layer: ``Σ_i exp(score_i − lse)`` averaged over
decode steps, sequences and heads, as KCache records it (``KCache.record_mass``); and its plot."""


def selections(results):
    """The results the curves of :func:`plot` and the report's mass lines come from: {(N, group
    select): result} among the KCache configurations without dense layers, hot rows or a top_p
    cut (with hot rows the recorded mass is the cold rows', with a cut the prefix's, not the top
    N's): of each selection the first without a tail, else the first. (A tail changes each
    layer's output, so the later layers' queries and their top N differ with it.)"""
    curves = {}
    for r in results:
        c = r["config"]
        if (c["backend"] == "kcache" and not c["dense_layers"] and not (c["sinks"] or c["window"])
                and c["top_p"] == 1.0):
            key = (c["topn"], c["group_select"])
            if key not in curves or (curves[key]["config"]["tail"] != "none"
                                     and c["tail"] == "none"):
                curves[key] = r
    return curves


def label(key, result):
    """'N=64', 'N=64 group', with the tail where the curve's configuration has one."""
    (topn, gs), tail = key, result["config"]["tail"]
    return f"N={topn}{' group' if gs else ''}{'' if tail == 'none' else f', tail {tail}'}"


def plot(results, path, groups=("long",)):
    """Mass per layer, one panel per group name in ``groups`` and one curve per selection
    (:func:`selections`), from the ``results`` list (each a dict with "config" and "mass"
    {group: [layers] floats}) -> PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4), squeeze=False)
    curves = selections(results)
    topns = sorted({n for n, _ in curves})
    for ax, group in zip(axes[0], groups):
        for (topn, gs), result in sorted(curves.items()):
            mass = result.get("mass", {}).get(group)
            if mass is None:
                continue
            ax.plot(range(len(mass)), mass, "--" if gs else "-",
                    color=f"C{topns.index(topn) % 10}", label=label((topn, gs), result))
        ax.set_xlabel("layer")
        ax.set_ylabel("attention mass in the top N")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"Mass captured by the top N, decode steps of '{group}'")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
