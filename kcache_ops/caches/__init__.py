"""The attention caches, below the model: the protocol the decoder calls (protocol.py), the
``dense`` cache (dense.py), KCache (kcache.py), KCache's options (options.py), the per-sequence
lengths both keep (lengths.py) and the factory (factory.py). The model (kcache_ops.model) knows
only the protocol; whoever runs it builds the cache with :func:`make_cache` and passes it in."""
from .dense import DenseCache
from .factory import BACKENDS, make_cache, sequence_bytes
from .kcache import KCache, check_kcache
from .options import MAX_GROUP_SELECT, MAX_REUSE, MAX_TOPN, TAILS, KCacheOptions
from .protocol import Cache

__all__ = ["BACKENDS", "MAX_GROUP_SELECT", "MAX_REUSE", "MAX_TOPN", "TAILS", "Cache",
           "DenseCache", "KCache", "KCacheOptions", "check_kcache", "make_cache",
           "sequence_bytes"]
