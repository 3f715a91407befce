"""The one place a cache is built from a backend name: ``dense`` or ``kcache``."""
from dataclasses import replace

from ..integers import int_at_least
from .dense import DenseCache
from .kcache import KCache, check_kcache
from .options import KCacheOptions
from .reuse import pool_slots

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


def sequence_bytes(backend, config, options, capacity, dtype):
    """(device bytes, host bytes) one sequence of ``capacity`` tokens costs in a cache of
    ``backend`` for a model of ``config`` in ``dtype``: per token (K, V, a low-bit copy of V) and
    per sequence (a V sum), counted on CPU caches of one and two tokens, and KCache's rows kept per
    sequence up to a bound, counted apart: its hot rows (:meth:`~.options.KCacheOptions.hot_split`
    per KCache layer) and its reuse pool (:func:`~.reuse.pool_slots`). ValueError where
    ``capacity`` is not an integer >= 1 or no KCache of it could be built
    (:func:`~.kcache.check_kcache`)."""
    tokens = int_at_least(capacity, 1)
    if tokens is None:
        raise ValueError(f"sequence_bytes: capacity must be an integer >= 1, got {capacity!r}")
    capacity = tokens
    kcache = backend == "kcache"
    if kcache:
        options = KCacheOptions() if options is None else options
        check_kcache(config, "cpu", dtype, options, capacity)
    # the per-token and per-sequence bytes, on caches without the rows kept up to a bound
    cold = replace(options, sinks=0, window=0, reuse=0) if kcache else options

    def cache(length=1, **extra):  # a CPU cache of one sequence, ``extra`` options on ``cold``
        return make_cache(backend, config, 1, length, "cpu", dtype,
                          replace(cold, **extra) if extra else cold)

    one, two = cache(), cache(2)
    device = one.device_bytes() + (capacity - 1) * (two.device_bytes() - one.device_bytes())
    host = one.host_bytes() + (capacity - 1) * (two.host_bytes() - one.host_bytes())
    if kcache and options.hot_rows:  # one hot slot, times the slots of this capacity
        hot = cache(sinks=1).device_bytes() - one.device_bytes()
        device += hot * sum(options.hot_split(capacity))
    if kcache and options.reuse:  # a pool's bytes per slot, times the slots of this capacity
        pool = cache(reuse=options.reuse).device_bytes() - one.device_bytes()
        device += pool // pool_slots(options, config, 1) * pool_slots(options, config, capacity)
    return device, host
