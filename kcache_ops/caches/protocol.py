"""The protocol every attention cache follows: what the decoder (kcache_ops.model) calls, layer by
layer. The model knows caches only through it; the implementations live beside it (dense.py,
kcache.py) and are built by :func:`kcache_ops.caches.make_cache`.

Shapes: ``B`` sequences, ``Hq`` query heads, ``Hkv`` KV heads, ``T`` prompt tokens (right-padded),
``D`` head dim, ``S`` the capacity in tokens per sequence.
"""
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Cache(Protocol):
    """An attention cache of a fixed batch and capacity.

    Attributes
    ----------
    seq_lens : Tensor [B] int32 on the model's device
        Tokens cached per sequence.

    A prompt goes in either through :meth:`prefill` (attend and store) for every layer, or through
    :meth:`store_prompt` (store only: K/V computed elsewhere, e.g. forked from one prefill) for
    every layer; then :meth:`finish_prefill` once (refused unless every layer stored the prompt;
    a layer stored again starts a new prompt, so a prefill given up part-way is simply redone).
    Each decode step calls :meth:`decode` for every layer, then :meth:`finish_decode` once (refused
    unless every layer decoded; a decode refused for its inputs stores nothing). Decoding before
    any prefill is decoding after an empty prompt. Overflowing the capacity raises ValueError.
    """

    seq_lens: torch.Tensor

    def prefill(self, layer, q, k, v, lens):
        """Causal attention over the prompt, and store its K/V.

        q [B, Hq, T, D], k and v [B, Hkv, T, D] (RoPE applied, right-padded), lens [B] int32
        -> out [B, Hq, T, D]; rows ``t >= lens[b]`` are don't-care.
        """

    def store_prompt(self, layer, k, v, lens):
        """Store a prompt's k and v [B, Hkv, T, D] (RoPE applied, right-padded; lens [B] int32,
        the valid rows, as :meth:`finish_prefill` will get) for ``layer`` without attending: the
        store half of :meth:`prefill`."""

    def finish_prefill(self, lens):
        """After the last layer's prompt: ``seq_lens = lens`` (lens [B] int32, each <= T)."""

    def decode(self, layer, q, k, v):
        """Store the new token at position ``seq_lens[b]`` and attend over ``seq_lens[b] + 1``
        tokens: q [B, Hq, D], k and v [B, Hkv, D] -> out [B, Hq, D]. The cache keeps no autograd
        history, so ``out`` carries no gradient (a prefill's attention, over the k and v given,
        does)."""

    def finish_decode(self):
        """After the last layer's decode: every sequence holds one more token."""

    def device_bytes(self):
        """Bytes of the K/V buffers held in device memory."""

    def host_bytes(self):
        """Bytes of the K/V buffers held in host RAM."""

    def host_bytes_read_per_step(self):
        """Bytes a decode step moves between host RAM and the device (rows read and written)."""

    def device_bytes_read_per_step(self, tokens):
        """Bytes of its device memory a decode step reads while every sequence holds ``tokens``
        keys (the stored data attended: K, device V and what stands for V on the device; not
        the step's own scores or other temporaries: written and read back within the step, on
        CUDA from L2 where they fit, they need not reach device memory, so a floor from this
        count stays a floor)."""
