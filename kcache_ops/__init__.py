"""kcache_ops: KCache (He & Wu, arXiv 2404.18057) — K in GPU memory, V in pinned host RAM, and each
decode step reads only the V rows of the top-N attention scores."""
import torch  # noqa: F401  (loads libtorch, which _C links against)

try:
    from . import _C  # noqa: F401  (loads the library; its static initialisers register the ops)
except ImportError as e:
    import os
    if "cannot import name '_C'" not in str(e):  # not missing: a library that fails to load
        raise ImportError(f"kcache_ops: the compiled library _C does not load beside torch "
                          f"{torch.__version__}: {e}. One built against another torch (an "
                          f"undefined symbol says so) is rebuilt against this one by "
                          f"`pip install --no-build-isolation .` in its source folder (or "
                          f"`make build` in a checkout)") from e
    raise ImportError(f"kcache_ops: the compiled library _C is not in "
                      f"{os.path.dirname(__file__)} (a checkout not built yet, or one imported "
                      f"instead of the installed package): run `make build` there (or `pip "
                      f"install --no-build-isolation -e .` for the torch of this Python), or "
                      f"import kcache_ops from outside the checkout") from e
from .ops import (alloc_host, built_with_cuda, gather_rows, host_bytes_available, lowbit_tail,
                  qk_topn, quantize_rows, reuse_rows, sparse_attn_v)

__all__ = ["alloc_host", "built_with_cuda", "gather_rows", "host_bytes_available", "lowbit_tail",
           "qk_topn", "quantize_rows", "reuse_rows", "sparse_attn_v"]
