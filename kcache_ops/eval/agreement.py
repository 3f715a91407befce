"""Greedy agreement with dense.

Dense generates ``steps`` tokens greedily after each prompt. Every other configuration is then
teacher-forced along dense's tokens: its top-1 at each step is compared with dense's. Up to the
first mismatch, free greedy generation with that configuration would have produced exactly dense's
tokens, so the index of the first mismatch *is* the number of tokens generated before the first
divergence; the match rate is top-1 agreement along dense's continuation.
"""
import torch


def summarize(argmax, reference):
    """argmax, reference [rows, steps] long -> {"first_divergence" (mean tokens until the first
    mismatch, ``steps`` when none), "first_divergence_rows", "match_rate" (fraction equal)}."""
    same = argmax == reference  # [rows, steps] bool
    steps = same.shape[1]
    mismatch = ~same
    first = torch.where(mismatch.any(1), mismatch.float().argmax(1),
                        torch.full(same.shape[:1], steps, device=same.device))  # [rows]
    return {"first_divergence": float(first.float().mean()),
            "first_divergence_rows": first.tolist(),
            "match_rate": float(same.float().mean())}
