"""The throughput section of bench/results/REPORT.md (assembled by :mod:`kcache_ops.report`) and
its plot, from the ``bench`` command's JSON."""
import os

import torch

from ..caches import TAILS, KCacheOptions, sequence_bytes
from ..results import CUT_OFF, ran_on
from .ceilings import describe
from .shapes import SHAPES

BENCH_JSON, BENCH_PLOT = "bench.json", "bench_throughput.png"


def bench_section(data, plot_drawn=True):
    """Markdown of the throughput benchmark (the JSON of ``python -m kcache_ops bench``);
    ``plot_drawn``: whether its plot is beside it (a complete run's plot that failed to draw is
    said so, not linked). The ceilings, settings and floor columns are left out for a file of an
    earlier version, which lacks them."""
    m = data["machine"]
    code = ("transformers' model code on our caches" if m.get("engine") == "transformers"
            else "reference decoder")
    kcache = {KCacheOptions.from_dict(r["options"]).summary() for r in data["rows"]
              if r["backend"] == "kcache"}
    out = [f"## Throughput ({code}, random weights)", "",
           ran_on(m, f", transformers {m['transformers']}." if m.get("transformers") else "."),
           f"Command: `{data['command']}`", ""]
    out += settings_lines(data.get("settings"), data.get("ceilings"))
    out += [f"KCache options: {', '.join(sorted(kcache))}.", ""] if kcache else []
    out += ["The batch is the largest whose cache fits the device and host budgets, at most "
            "`--max-batch` (in brackets which of the three set it; `memory` where the decode step "
            "then ran out of device memory and the batch backed off by 1/8 until it ran); the "
            "decode runs at that batch, the prefill at batch 1 (tokens of one prompt a second). "
            "PCIe "
            "MiB/step: the whole batch's V rows read, N per head (per KV head with group select), "
            "and written; an upper bound: `top_p` < 1 cuts the N, and the CUDA kernel reads a row "
            "that several heads of a group chose once (and with `reuse`, the rows its pool holds "
            "are not read).", ""]
    cuda = str(m.get("device")).startswith("cuda")  # "cuda", or "cuda:1" where --device named one
    out += [timing_line(cuda, [r.get("decode_timed", "eager") for r in data["rows"]]), ""]
    if cuda and any("hf_decode_tok_s" in r for r in data["rows"]):
        out += ["transformers tok/s: its LlamaForCausalLM of the same shape (static cache, SDPA) "
                "at the dense row's batch, each step launched eagerly from Python, as it runs "
                "without torch.compile; so \"dense N× of it\" also counts the launch time that "
                "the graphs of the other columns remove.", ""]
    floors = any("floor_step_ms" in r for r in data["rows"])
    if floors:
        out += ["Floor ms: the least time a decode step's bytes take at this run's ceilings: the "
                "weights read once (of an input embedding that is not the LM head, the batch's "
                "rows) and what the cache reads of its device memory at the median timed step's "
                "keys (dense: K and V of every position; KCache: K, the dense layers' V, the "
                "tail's low-bit copy or V sum, the hot rows, the reuse pool's rows), over the "
                "device copy rate, plus, on CUDA, the PCIe MiB/step over the pinned "
                "host->device rate, in sequence (a layer reads its V rows after scoring its K, "
                "and the next layer waits for it; only a low-bit tail's reads of its copy run "
                "beside the host reads; on the CPU both are one RAM, over the copy rate). Not "
                "counted: activations, the step's scores and other temporaries, the new token's "
                "rows. The PCIe bytes are the upper bound above, so with `top_p` < 1, rows "
                "shared in a group or `reuse` (its pool's hits cross no PCIe) the KCache floor "
                "is above the true one. Of ceiling: the floor over the measured step (1 would "
                "be at the ceilings).", ""]
    if not data.get("complete", True):
        out += CUT_OFF
    if data.get("small"):
        out += ["**This is the CPU smoke run at tiny sizes (`--small`)**: it tests the machinery, "
                "its numbers say nothing about a GPU. The GPU run is still to be done (command "
                "below).", ""]
    floor_head = ("floor ms | of ceiling | ", "---|---|") if floors else ("", "")
    out += ["| model | context | backend | batch | budget GiB | cache dev GiB | host GiB | "
            "prefill tok/s | decode tok/s | transformers tok/s | PCIe MiB/step | "
            f"{floor_head[0]}vs dense |",
            f"|---|---|---|---|---|---|---|---|---|---|---|{floor_head[1]}---|"]
    gib = 2 ** 30
    for r in data["rows"]:
        hf = (f"{r['hf_decode_tok_s']:.1f} (dense {r['dense_vs_hf']:.2f}× of it)"
              if "hf_decode_tok_s" in r else "out of memory" if "hf_error" in r else "—")
        ratio = (f"{r['vs_dense']:.2f}×" if r.get("vs_dense") is not None
                 else "–" if "vs_dense" in r else "—")  # "–": a batch capped by --max-batch
        limit = f" ({r['batch_limit']})" if "batch_limit" in r else ""
        floor = (f"{r['floor_step_ms']:.3g} | {r['of_ceiling']:.1%} | " if "floor_step_ms" in r
                 else "— | — | " if floors else "")
        out.append(f"| {r['model']} | {r['context']} | {r['backend']} | {r['batch']}{limit} | "
                   f"{r['budget_bytes'] / gib:.3f} | {r['cache_device_bytes'] / gib:.3f} | "
                   f"{r['host_bytes'] / gib:.3f} | {r['prefill_tok_s']:.0f} | "
                   f"{r['decode_tok_s']:.1f} | {hf} | {r['pcie_bytes_per_step'] / 2**20:.2f} | "
                   f"{floor}{ratio} |")
    if any("vs_dense" in r and r["vs_dense"] is None for r in data["rows"]):
        out += ["", "vs dense \"–\": capped by `--max-batch`, not at equal memory (the dense or "
                "the KCache batch was the cap, not what the budget holds), so no ratio."]
    if data.get("complete", True) and plot_drawn:  # the plot is drawn at the run's end
        out += ["", f"![throughput vs context]({BENCH_PLOT})"]
    elif data.get("complete", True):
        out += ["", f"The plot ({BENCH_PLOT}) could not be drawn (the output of the command "
                "that wrote this report says why); the table above has its numbers."]
    return out + [""]


def timing_line(cuda, timed):
    """How the decode steps were timed (``cuda``: on a GPU), from the rows' decode_timed ("eager"
    in files written before it was recorded, when every step was launched eagerly; "eager" on
    CUDA since then for the transformers engine alone)."""
    if not cuda:
        return ("Decode steps: run eagerly and timed on the host clock (the CPU's ops are "
                "synchronous).")
    if all(t == "graph" for t in timed):
        return ("Decode steps: each captured once in a CUDA graph and its replays timed with CUDA "
                "events (the device's time, not the time Python takes to launch the kernels).")
    return ("**Decode steps: launched eagerly from Python** and timed with CUDA events: where the "
            "host is slower than the device's kernels, this times the host that "
            "launches some 50 small kernels a layer (on the H200, 2026-12-04, both backends took "
            "about 80 ms a step at 32K context whatever their batch), so \"vs dense\" is then "
            "mostly the ratio of the batches.")


def settings_lines(settings, ceilings):
    """The lines of a run's resolved settings and measured ceilings (None: not recorded, a file
    of an earlier version)."""
    out = []
    if settings:
        budget = (f"{settings['budget_gb']:g} GB" if settings["budget_gb"] is not None
                  else f"the free device memory after the weights less {settings['reserve_gb']:g} "
                       f"GB (--reserve)")
        host = settings["host_budget_bytes"]
        out += [f"Settings: {settings['dtype']}, {settings['steps']} timed decode steps, batch at "
                f"most {settings['max_batch']}, cache budget {budget}, host RAM budget "
                + (f"{host / 2**30:.2f} GiB" if host is not None else "unchecked (unknown)")
                + "; contexts " + "; ".join(f"{m} {', '.join(map(str, c))}"
                                          for m, c in settings["contexts"].items()) + "."]
    if ceilings:
        out += [f"Ceilings measured in this run: {describe(ceilings)}."]
    return out + [""] if out else []


def memory_section(capacity=32768, dtype=torch.bfloat16):
    """Markdown: device bytes per token of each cache for the benchmark's model shapes, and the
    capacity gain over dense at one device budget (what the batch fitting gives KCache)."""
    gib = 2 ** 30
    out = ["## Device memory per token", "",
           "Device bytes per token (all layers, bfloat16) from the caches' own accounting: K, "
           "device V, the tail's low-bit copy (the V sum of `mean` is per sequence, spread here "
           f"over {capacity} tokens); N does not change it. In brackets, for dense the GiB of "
           f"one {capacity}-token sequence, for KCache the capacity gain: how many times more "
           "sequences fit one device budget than with dense attention.", "",
           "| model | dense | " + " | ".join(f"KCache tail={t}" for t in TAILS) + " |",
           "|---|---|" + "---|" * len(TAILS)]
    for name in ("llama3-8b", "smollm2-135m"):
        dense = sequence_bytes("dense", SHAPES[name], None, capacity, dtype)[0]
        cells = []
        for tail in TAILS:
            options = KCacheOptions.paper_literal(tail=tail)
            kc = sequence_bytes("kcache", SHAPES[name], options, capacity, dtype)[0]
            cells.append(f"{kc / capacity:.0f} B ({dense / kc:.2f}×)")
        out.append(f"| {name} | {dense / capacity:.0f} B ({dense / gib:.2f} GiB) | "
                   + " | ".join(cells) + " |")
    return out + [""]


def draw(rows, path):
    """:func:`plot` of ``rows`` at ``path``, the file there before removed first -> None, or what
    failed (a part written removed too): the rows' results stand without their plot."""
    if os.path.exists(path):
        os.remove(path)
    try:
        plot(rows, path)
    except Exception as e:  # noqa: BLE001 - whatever matplotlib raises
        if os.path.exists(path):
            os.remove(path)
        return f"{type(e).__name__}: {e}"
    return None


def plot(rows, path):
    """Decode tokens/s against context, one curve per (model, backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["model"], r["backend"]) for r in rows}):
        pts = sorted((r["context"], r["decode_tok_s"]) for r in rows
                     if (r["model"], r["backend"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{key[0]} {key[1]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s (whole batch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Decode throughput at one device-memory budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
