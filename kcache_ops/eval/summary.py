"""The numbers each configuration is judged on, from its result and dense's: Δ perplexity at both
context lengths, needle hits per length and per phrasing, and what it costs — host V rows and
bytes per decode step, device bytes per token and their ratio to dense.

The costs are read off the cache itself (:func:`costs`), after the long-context group ran on it.
"""
import torch

from ..caches import sequence_bytes
from . import perplexity

CONTEXTS = ("short", "long")  # the perplexity groups: 1.5K windows (+ agreement), 6K windows


def costs(cache, model_config, config):
    """What a cache costs per sequence: {"host_rows" (V rows read from host per head and step,
    measured by KCache's record over its KCache layers: N, or fewer with ``top_p``; 0 for dense
    and where every layer is dense), "host_bytes_per_step" (``host_bytes_read_per_step(rows)``
    / batch: every head's rows and the new token's; with reuse, on the same basis, the rows less
    the share of the distinct rows its pools held, ``reuse_hit_rate``: a little high, as rows
    that several heads chose are found more often than others),
    "device_bytes_per_token" (``device_bytes`` / (batch · capacity)),
    "device_bytes_per_token_bf16" (the same cache for a model of ``model_config`` in bfloat16,
    the dtype a GPU runs: a low-bit copy weighs twice as much against bfloat16 K as against
    float32 K)}. ``config``: the eval's :class:`.Config`."""
    batch = cache.seq_lens.shape[0]
    rows, host = 0.0, 0.0
    if hasattr(cache, "rows_read") and cache.v_host:  # a KCache with KCache layers
        layers = list(cache.v_host)
        rows = float(cache.rows_read()[layers].mean())
        host = cache.host_bytes_read_per_step(rows)
        if cache.reuse and rows > 0:  # the rows read less those found on the device
            written = cache.host_bytes_read_per_step(0)  # the new token's rows: they stay
            found = float(cache.reuse_hit_rate()[layers].mean())  # of the distinct rows
            host = written + (host - written) * (1 - found)
        host /= batch
    bf16 = sequence_bytes(config.backend, model_config, config.options, cache.capacity,
                          torch.bfloat16)[0]
    return {"host_rows": rows, "host_bytes_per_step": host,
            "device_bytes_per_token": cache.device_bytes() / (batch * cache.capacity),
            "device_bytes_per_token_bf16": bf16 / cache.capacity}


def needle_groups(result):
    """The needle group names of ``result``, shortest haystack first."""
    return sorted((k for k in result if k.startswith("needle-")), key=lambda k: int(k[7:]))


def summarize(result, dense):
    """A flat dict of ``result``'s numbers against ``dense`` (a result of the same run): "dppl"
    {context: %}, "ppl" {context: value}, "needle" (hits), "needle_total", "needle_by_length"
    {haystack tokens: hits}, "needle_by_phrasing" {phrasing: hits}, "host_rows",
    "host_bytes_per_step", "device_bytes_per_token", "device_ratio" (to dense),
    "device_ratio_bf16" (to dense, both in bfloat16)."""
    out = {"ppl": {c: result[c]["perplexity"]["ppl"] for c in CONTEXTS},
           "dppl": {c: perplexity.delta(result[c]["perplexity"], dense[c]["perplexity"])
                    for c in CONTEXTS},
           "needle_by_length": {}, "needle_by_phrasing": {}}
    for name in needle_groups(result):
        g = result[name]
        out["needle_by_length"][name[7:]] = sum(g["correct"])
        for phrasing, ok in zip(g["phrasing"], g["correct"]):
            out["needle_by_phrasing"][phrasing] = out["needle_by_phrasing"].get(phrasing, 0) + ok
    out["needle"] = sum(out["needle_by_length"].values())
    out["needle_total"] = sum(len(result[n]["correct"]) for n in needle_groups(result))
    out.update(result["costs"])
    out["device_ratio"] = (result["costs"]["device_bytes_per_token"]
                           / dense["costs"]["device_bytes_per_token"])
    out["device_ratio_bf16"] = (result["costs"]["device_bytes_per_token_bf16"]
                                / dense["costs"]["device_bytes_per_token_bf16"])
    return out
