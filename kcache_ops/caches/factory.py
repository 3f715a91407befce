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
    sequence up to a bound, counted apart: its hot rows (``min(sinks + window, capacity)`` per
    KCache layer) and its reuse pool (:func:`~.reuse.pool_slots`). ValueError where ``capacity``
    is not an integer >= 1 or no KCache of it could be built (:func:`~.kcache.check_kcache`)."""
    tokens = int_at_least(capacity, 1)
    if tokens is None:
        raise ValueError(f"sequence_bytes: capacity must be an integer >= 1, got {capacity!r}")
    capacity = tokens
    if backend == "kcache" and options is None:
        options = KCacheOptions()
    if backend == "kcache":
        check_kcache(config, "cpu", dtype, options, capacity)
    if backend == "kcache" and (options.hot_rows or options.reuse):
        cold = replace(options, sinks=0, window=0, reuse=0)
        device, host = sequence_bytes(backend, config, cold, capacity, dtype)

        def per_slot(extra, slots):  # device bytes of one slot of ``extra``, a cache of 1 token
            cache, plain = (make_cache(backend, config, 1, 1, "cpu", dtype, o)
                            for o in (replace(cold, **extra), cold))
            return (cache.device_bytes() - plain.device_bytes()) // slots

        if options.hot_rows:
            device += per_slot(dict(sinks=1), 1) * min(options.hot_rows, capacity)
        if options.reuse:
            one = pool_slots(options, config, 1)
            device += per_slot(dict(reuse=options.reuse), one) * pool_slots(options, config,
                                                                             capacity)
        return device, host
    one, two = (make_cache(backend, config, 1, n, "cpu", dtype, options) for n in (1, 2))
    device_token = two.device_bytes() - one.device_bytes()
    host_token = two.host_bytes() - one.host_bytes()
    return (one.device_bytes() + (capacity - 1) * device_token,
            one.host_bytes() + (capacity - 1) * host_token)
