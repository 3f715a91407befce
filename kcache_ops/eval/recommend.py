"""The recommended setting, chosen from the results by the explicit rule of issue 12's targets.

Targets (:data:`TARGETS`): at most 64 host V rows per head and step, device bytes per token at
most 0.6x dense (K plus any copy or summary of V; in the eval's dtype and in bfloat16, the dtype
a GPU runs), |Δ perplexity| at most 0.3% at both context
lengths, and needle hits at least dense's at every haystack length. Among the configurations that
meet all of them, the one that reads the fewest host bytes per step is recommended; where none
does, the closest is named (fewest targets missed, then the smallest perplexity excess, then the
fewest host bytes) with the targets it misses. Separately, the small-budget verdict: the best
configuration at most 8 host rows within the device memory target, whether its |Δ perplexity| is
at most 0.5% at both lengths, and the best one over the memory target where that does better.
"""
import math

from .grid import display_name
from .runner import Config
from .summary import CONTEXTS

MAX_HOST_ROWS = 64
MAX_DEVICE_RATIO = 0.6
MAX_DPPL = 0.3  # % at each context length
SMALL_ROWS = 8
SMALL_MAX_DPPL = 0.5  # % at each context length, at most SMALL_ROWS host rows

# target name -> what it asks, in words (eval.json and REPORT.md)
TARGETS = {
    "host_rows": f"≤ {MAX_HOST_ROWS} host V rows per head per step",
    "device_ratio": f"device bytes per token ≤ {MAX_DEVICE_RATIO}x dense (in the eval's dtype "
                    "and in bfloat16)",
    "dppl_short": f"|Δ ppl| ≤ {MAX_DPPL}% at the short context",
    "dppl_long": f"|Δ ppl| ≤ {MAX_DPPL}% at the long context",
    "needle": "needle hits ≥ dense's at every length",
}
RULE = ("meets every target (" + "; ".join(TARGETS.values()) + "), then the fewest host bytes "
        "per step; where none meets all: fewest targets missed, then the smallest |Δ ppl| excess, "
        "then the fewest host bytes")


def fits_memory(summary):
    """Whether a configuration's device bytes per token are at most :data:`MAX_DEVICE_RATIO` of
    dense's, in the eval's dtype and in bfloat16."""
    return max(summary["device_ratio"], summary["device_ratio_bf16"]) <= MAX_DEVICE_RATIO


def assess(summary, dense_summary):
    """{target name: met} for one configuration's summary (:func:`.summary.summarize`)."""
    return {"host_rows": summary["host_rows"] <= MAX_HOST_ROWS,
            "device_ratio": fits_memory(summary),
            "dppl_short": abs(summary["dppl"]["short"]) <= MAX_DPPL,
            "dppl_long": abs(summary["dppl"]["long"]) <= MAX_DPPL,
            "needle": all(summary["needle_by_length"][n] >= hits
                          for n, hits in dense_summary["needle_by_length"].items())}


def _numbers(summary):
    """The numbers a recommendation states."""
    keys = ("host_rows", "host_bytes_per_step", "device_bytes_per_token", "device_ratio",
            "device_ratio_bf16", "dppl",
            "needle", "needle_total", "needle_by_length", "needle_by_phrasing")
    return {k: summary[k] for k in keys}


def _excess(summary, limit):
    """How far the worse |Δ ppl| of the two contexts lies above ``limit`` (0 when within; inf
    where one is not finite, a NaN perplexity say, which max() would pass over)."""
    worse = [abs(summary["dppl"][c]) for c in CONTEXTS]
    if not all(math.isfinite(d) for d in worse):
        return math.inf
    return max(0.0, max(worse) - limit)


def recommend(results):
    """The recommendation from the results of one run (dense first) -> dict {"rule", "config"
    (JSON), "name", "meets_all", "targets" {name: met}, "misses" [target descriptions],
    "numbers", "dense" (dense's numbers), "small_budget"}; None before any KCache result."""
    if len(results) < 2:
        return None
    dense = results[0]["summary"]
    rated = [(r, assess(r["summary"], dense)) for r in results[1:]]
    best, met = min(rated, key=lambda x: (sum(not v for v in x[1].values()),
                                          _excess(x[0]["summary"], MAX_DPPL),
                                          x[0]["summary"]["host_bytes_per_step"]))
    return {"rule": RULE, "config": best["config"],
            "name": display_name(Config.from_dict(best["config"])),
            "meets_all": all(met.values()), "targets": met,
            "misses": [TARGETS[k] for k, ok in met.items() if not ok],
            "numbers": _numbers(best["summary"]), "dense": _numbers(dense),
            "small_budget": small_budget(results)}


def small_budget(results):
    """The verdict of the ≤ 8 host rows target: among the configurations at most
    :data:`SMALL_ROWS` rows that meet the memory target (:func:`fits_memory`; all of them where
    none does), the one with the smallest worse-context |Δ ppl| -> {"name", "config", "within"
    (|Δ ppl| at most :data:`SMALL_MAX_DPPL` at both contexts), "met" (within, and fitting the
    memory target), "dppl", "fits_memory", "device_ratio_bf16" (to dense, both in bfloat16),
    "target", "over_memory" (the best configuration over the memory target where it is closer
    to dense, in the same form without "met" and "over_memory"; else None)}, or None where no
    such configuration ran."""
    small = [r for r in results[1:] if r["summary"]["host_rows"] <= SMALL_ROWS]
    if not small:
        return None

    def best(rs):
        return min(rs, key=lambda r: (_excess(r["summary"], 0.0),
                                      r["summary"]["host_bytes_per_step"]))

    def verdict(r):
        return {"name": display_name(Config.from_dict(r["config"])), "config": r["config"],
                "within": _excess(r["summary"], SMALL_MAX_DPPL) == 0.0,
                "dppl": r["summary"]["dppl"],
                "fits_memory": fits_memory(r["summary"]),
                "device_ratio_bf16": r["summary"]["device_ratio_bf16"]}

    fits = [r for r in small if fits_memory(r["summary"])]
    over = [r for r in small if r not in fits]
    chosen = best(fits or small)
    closer = best(over) if over else None
    if closer is not None and _excess(closer["summary"], 0.0) >= _excess(chosen["summary"], 0.0):
        closer = None  # over the memory target and no closer to dense: not worth naming
    chosen = verdict(chosen)
    return {**chosen, "met": chosen["within"] and chosen["fits_memory"],
            "over_memory": verdict(closer) if closer else None,
            "target": f"|Δ ppl| ≤ {SMALL_MAX_DPPL}% at both contexts with ≤ {SMALL_ROWS} host "
                      f"rows, within the memory target"}
