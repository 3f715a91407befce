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
                           for r in range(rows)], device="cpu")  # [rows, width]
    return chunks[:, :prefill].tolist(), chunks[:, prefill], chunks[:, prefill + 1:]


def summarize(logprob):
    """logprob [rows, steps] float32 of the true tokens -> {"nll", "ppl", "ppl_rows"}."""
    nll_rows = -logprob.double().mean(1)  # [rows]
    nll = float(nll_rows.mean())
    return {"nll": nll, "ppl": math.exp(nll), "ppl_rows": [math.exp(x) for x in nll_rows.tolist()]}


def delta(result, dense):
    """Relative change of perplexity against dense, in percent."""
    return 100.0 * (result["ppl"] / dense["ppl"] - 1.0)


# Student's t at 97.5% (a two-sided 95% interval) for 1..30 degrees of freedom
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z_975 = 1.959964  # the normal distribution's 97.5% point


def delta_se(result, dense):
    """The standard error of :func:`delta` from its windows, in percentage points: of the
    per-window relative changes (each window of ``result`` against the same window of
    ``dense``, any other result of the same run), or None with fewer than two windows or windows
    that do not pair up."""
    if len(result["ppl_rows"]) != len(dense["ppl_rows"]):
        return None
    rows = [100.0 * (r / d - 1.0) for r, d in zip(result["ppl_rows"], dense["ppl_rows"])]
    if len(rows) < 2:
        return None
    mean = sum(rows) / len(rows)
    return math.sqrt(sum((x - mean) ** 2 for x in rows) / (len(rows) - 1) / len(rows))


def t_975(windows):
    """Student's t for a two-sided 95% interval of a mean over ``windows`` paired windows: from
    the table, and past it from the expansion of t in 1 / df (Cornish-Fisher; within 1e-5 of t
    from 30 degrees of freedom on)."""
    df = windows - 1
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))
