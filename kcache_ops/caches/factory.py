"""The one place a cache is built from a backend name: ``dense`` or ``kcache``."""
from dataclasses import replace

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


def sequence_bytes(backend, config, options, capacity, dtype):
    """(device bytes, host bytes) one sequence of ``capacity`` tokens costs in a cache of
    ``backend`` for a model of ``config`` in ``dtype``: per token (K, V, a low-bit copy of V) and
    per sequence (a V sum, a reuse pool), counted on CPU caches of one and two tokens, and KCache's
    hot rows (``min(sinks + window, capacity)`` per layer) counted apart."""
    if backend == "kcache" and options is None:
        options = KCacheOptions()
    if backend == "kcache" and options.hot_rows:
        cold = replace(options, sinks=0, window=0)
        one_row = replace(cold, sinks=1)
        row = (make_cache(backend, config, 1, 1, "cpu", dtype, one_row).device_bytes() -
               make_cache(backend, config, 1, 1, "cpu", dtype, cold).device_bytes())
        device, host = sequence_bytes(backend, config, cold, capacity, dtype)
        return device + min(options.hot_rows, capacity) * row, host
    one, two = (make_cache(backend, config, 1, n, "cpu", dtype, options) for n in (1, 2))
    device_token = two.device_bytes() - one.device_bytes()
    host_token = two.host_bytes() - one.host_bytes()
    return (one.device_bytes() + (capacity - 1) * device_token,
            one.host_bytes() + (capacity - 1) * host_token)
