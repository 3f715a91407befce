"""The one place a cache is built from a backend name: ``dense`` or ``kcache``."""
from .dense import DenseCache
from .kcache import KCache
from .options import KCacheOptions

BACKENDS = ("dense", "kcache")


def make_cache(backend, config, batch, capacity, device, dtype, options=None):
    """A cache for ``batch`` sequences of up to ``capacity`` tokens of a model of ``config``
    (a :class:`kcache_ops.model.LlamaConfig`) on ``device`` in ``dtype``.

    ``backend`` is ``"dense"`` (``options`` None) or ``"kcache"`` (``options`` a
    :class:`KCacheOptions`, default ``KCacheOptions()``). For a model: ``make_cache(backend,
    model.config, batch, capacity, model.device, model.dtype, options)``.
    """
    if backend == "dense":
        if options is not None:
            raise ValueError(f"backend 'dense' takes no options, got {options}")
        return DenseCache(config, batch, capacity, device, dtype)
    if backend == "kcache":
        return KCache(config, batch, capacity, device, dtype,
                      KCacheOptions() if options is None else options)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
