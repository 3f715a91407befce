"""The attention mass the top N capture, per layer: ``Σ_i exp(score_i − lse)`` averaged over
decode steps, sequences and heads, as KCache records it (``KCache.record_mass``); and its plot."""


def plot(results, path, groups=("long",)):
    """Mass per layer, one panel per group name in ``groups`` and one curve per KCache
    configuration without dense layers, from the ``results`` list (each a dict with "config" and
    "mass" {group: [layers] floats}) -> PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4), squeeze=False)
    topns = sorted({r["config"]["topn"] for r in results if r["config"]["backend"] == "kcache"})
    for ax, group in zip(axes[0], groups):
        for r in results:
            c = r["config"]
            if c["backend"] != "kcache" or c["dense_layers"] or not c["renormalize"]:
                continue  # renormalize does not change which keys are picked; dense layers exact
            mass = r.get("mass", {}).get(group)
            if mass is None:
                continue
            ax.plot(range(len(mass)), mass, "--" if c["group_select"] else "-",
                    color=f"C{topns.index(c['topn']) % 10}",
                    label=f"N={c['topn']}{' group' if c['group_select'] else ''}")
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
