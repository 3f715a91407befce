"""The adaptive budget of a KCache decode step (``KCacheOptions.top_p``): per head, read from
host RAM only the selected rows that carry the mass; the rest become padding, which
``sparse_attn_v`` skips (no PCIe bytes) and a tail term, if any, accounts for."""
import torch


def mass_prefix(scores, indices, lse, top_p):
    """Keep per head the shortest prefix of the selected entries (in their order) whose
    full-softmax mass ``Σ exp(score − lse)`` reaches ``top_p``; mark the rest padding.

    scores [B, Hq, N] float32, indices [B, Hq, N] int32 (-1 padding), lse [B, Hq] float32
    -> (scores [B, Hq, N] with -inf, indices [B, Hq, N] with -1 past the prefix). The first
    entry is always kept. Device ops only: no host synchronisation.
    """
    mass = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # [B, Hq, N]; 0 at padding
    before = mass.cumsum(-1) - mass  # [B, Hq, N] the mass of the entries ahead of each
    drop = before >= top_p  # [B, Hq, N]
    return scores.masked_fill(drop, float("-inf")), indices.masked_fill(drop, -1)
