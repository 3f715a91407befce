"""kcache_ops: KCache (He & Wu, arXiv 2404.18057) — K in GPU memory, V in pinned host RAM, and each
decode step reads only the V rows of the top-N attention scores."""
import torch  # noqa: F401  (loads libtorch, which _C links against)

try:
    from . import _C  # noqa: F401  (loads the library; its static initialisers register the ops)
except ImportError as e:
    if "cannot import name '_C'" not in str(e):  # not missing: a library that fails to load
        raise
    import os
    raise ImportError(f"kcache_ops: the compiled library _C is not in "
                      f"{os.path.dirname(__file__)} (a checkout not built yet, or one imported "
                      f"instead of the installed package): run `make build` there, or import "
                      f"kcache_ops from outside the checkout") from e
from .ops import (alloc_host, built_with_cuda, gather_rows, host_bytes_available, lowbit_tail,
                  qk_topn, quantize_rows, reuse_rows, sparse_attn_v)

__all__ = ["alloc_host", "built_with_cuda", "gather_rows", "host_bytes_available", "lowbit_tail",
           "qk_topn", "quantize_rows", "reuse_rows", "sparse_attn_v"]
