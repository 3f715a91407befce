"""kcache_ops: KCache (He & Wu, arXiv 2404.18057) — K in GPU memory, V in pinned host RAM, and each
decode step reads only the V rows of the top-N attention scores."""
import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (loads the library; its static initialisers register the ops)
from .ops import (alloc_host, built_with_cuda, gather_rows, host_bytes_available, lowbit_tail,
                  qk_topn, quantize_rows, sparse_attn_v)

__all__ = ["alloc_host", "built_with_cuda", "gather_rows", "host_bytes_available", "lowbit_tail",
           "qk_topn", "quantize_rows", "sparse_attn_v"]
