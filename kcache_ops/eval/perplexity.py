"""Long-text perplexity through the decode path.

Each row is a window of essay text: ``prefill`` tokens go through the (dense, shared) prefill, then
``steps`` teacher-forced decode steps each predict the next true token, so every scored prediction
comes from a decode step — where KCache's top-N selection acts.
"""
import math

import torch


def windows(ids, rows, prefill, steps, offset=0):
    """``rows`` disjoint windows of ``prefill + steps + 1`` tokens of ``ids``, from ``offset`` on.

    Returns (prompts, first, targets): prompts, a list of ``rows`` lists of ``prefill`` ids;
    first [rows] long, the token fed at step 0; targets [rows, steps] long, the tokens each decode
    step must predict.
    """
    width = prefill + steps + 1
    if offset + rows * width > len(ids):
        raise ValueError(f"perplexity needs {rows} x {width} tokens of text from token {offset}, "
                         f"the text has {len(ids)}")
    chunks = torch.tensor([ids[offset + r * width: offset + (r + 1) * width]
                           for r in range(rows)])  # [rows, width]
    return chunks[:, :prefill].tolist(), chunks[:, prefill], chunks[:, prefill + 1:]


def summarize(logprob):
    """logprob [rows, steps] float32 of the true tokens -> {"nll", "ppl", "ppl_rows"}."""
    nll_rows = -logprob.double().mean(1)  # [rows]
    nll = float(nll_rows.mean())
    return {"nll": nll, "ppl": math.exp(nll), "ppl_rows": [math.exp(x) for x in nll_rows.tolist()]}


def delta(result, dense):
    """Relative change of perplexity against dense, in percent."""
    return 100.0 * (result["ppl"] / dense["ppl"] - 1.0)


def delta_se(result, dense):
    """The standard error of :func:`delta` from its windows, in percentage points: of the
    per-window relative changes (each window against dense's same window), or None with fewer
    than two windows. A |Δ| within about two of these is within the noise of the text chosen."""
    rows = [100.0 * (r / d - 1.0) for r, d in zip(result["ppl_rows"], dense["ppl_rows"])]
    if len(rows) < 2:
        return None
    mean = sum(rows) / len(rows)
    return math.sqrt(sum((x - mean) ** 2 for x in rows) / (len(rows) - 1) / len(rows))
