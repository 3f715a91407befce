"""Rotary position embeddings (RoPE), with Llama-3 frequency scaling.

The one convention of this package is Hugging Face's "rotate half": the head dim D is split into two
halves, and frequency i rotates the pair (x[i], x[i + D/2]). Meta's original Llama code and GGUF
files (llama.cpp's converter permutes Q and K rows) rotate interleaved pairs (x[2i], x[2i+1])
instead; the GGUF loader undoes that permutation, so this single convention serves every checkpoint.
"""
import math

import torch

from .config import LlamaConfig


def inv_frequencies(config: LlamaConfig, device=None) -> torch.Tensor:
    """Angular frequency of each rotated pair, ``theta^(-2i/D)`` with Llama-3 scaling applied.

    Returns
    -------
    Tensor [D / 2] float32 on ``device``.
    """
    dim = config.head_dim
    # [D/2]: theta ** (-2i / D), computed exactly as transformers does (int64 arange, then float)
    inv_freq = 1.0 / (config.rope_theta ** (
        torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if config.rope_freq_factors is not None:
        # [D/2]: GGUF stores the Llama-3 scaling already expanded to one divisor per frequency
        return inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float32, device=device)
    if config.rope_scaling is None:
        return inv_freq
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq                                      # [D/2]
    # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    # in between, blend the two smoothly
    smooth = (old_len / wavelen - low) / (high - low)                     # [D/2]
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """Cosines and sines of every position's rotation angles.

    Parameters
    ----------
    positions : Tensor [B, T] long
    inv_freq : Tensor [D / 2] float32

    Returns
    -------
    cos, sin : Tensor [B, 1, T, D] float32 each (the two halves repeat the D/2 angles), with a
    heads axis to broadcast over q [B, H, T, D].
    """
    angles = positions[..., None].float() * inv_freq                      # [B, T, D/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]                 # [B, 1, T, D]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by the angles of ``cos``/``sin`` [B, 1, T, D] (rotate-half
    convention), in float32; returns [B, H, T, D] in the dtype of ``x``."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)        # [B, H, T, D]
    return (xf * cos + rotated * sin).type_as(x)
