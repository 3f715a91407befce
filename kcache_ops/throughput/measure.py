"""The throughput measurement: the largest batch of each backend that fits the device-memory
budget, the prefill and decode timings, the memory and PCIe traffic of each (model, context,
backend), and the transformers comparison of the dense rows."""
import functools
import statistics
import time

import torch

from ..caches import check_kcache, make_cache, sequence_bytes
from ..devices import graphed, median_seconds, sync
from ..model.llama import Llama
from ..ops import host_bytes_available
from .ceilings import floor_seconds, weight_bytes, weight_bytes_per_step
from .shapes import SHAPES, random_model
from .transformers_baseline import compare_with_hf, hf_model, transformers_missing

GiB = 2 ** 30


def new_cache(model, backend, options, batch, capacity):
    """A cache of ``backend`` (``options`` for kcache) for ``model``."""
    return make_cache(backend, model.config, batch, capacity, model.device, model.dtype, options)


@torch.inference_mode()
def time_prefill(model, backend, options, context, runs=3):
    """The median seconds of ``runs`` prefills of ``context`` random tokens at batch 1, each into
    a cache built before its clock starts (after a 64-token warm-up prefill)."""
    seconds = []
    for length in [min(64, context)] + [context] * runs:
        cache = new_cache(model, backend, options, 1, length + 1)
        tokens = torch.randint(0, model.config.vocab_size, (1, length),
                               device=model.device)  # [1, T]
        lens = torch.full((1,), length, dtype=torch.int32, device=model.device)  # [1]
        sync(model.device)
        start = time.perf_counter()
        model.prefill(tokens, lens, cache)
        sync(model.device)
        seconds.append(time.perf_counter() - start)
        del cache
    return statistics.median(seconds[1:])


@torch.inference_mode()
def time_decode(model, backend, options, batch, context, steps):
    """Fill a cache of ``batch`` sequences with ``context`` random K/V rows, then time ``steps``
    decode steps after two warm-up steps -> (the median seconds of a step, the cache, peak device
    bytes, how the steps were timed: "graph" or "eager").

    On CUDA, kcache_ops' own decoder's step (every layer, finish_decode and the logits) is
    captured once in a CUDA graph (:func:`~kcache_ops.devices.graphed`) and its replays are
    timed: run eagerly, a step's ~50 small kernels a layer time the Python that launches them (on
    an H200 both backends' eager steps took ~80 ms at 32K context, whatever their batch).
    Captured, the dense cache attends over its whole capacity (context + steps + 2 keys, its mask
    zeroing those past each sequence's length) instead of the longest sequence's keys. The
    transformers engine's step runs eagerly (its model code is not ours to keep capturable)."""
    c, device = model.config, model.device
    cache = new_cache(model, backend, options, batch, context + steps + 2)
    kv = torch.randn(batch, c.num_kv_heads, context, c.head_dim, device=device,
                     dtype=model.dtype)  # [B, Hkv, T, D]; the same rows serve every layer
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)  # [B]
    for layer in range(c.num_layers):
        cache.store_prompt(layer, kv, kv, lens)
    del kv
    cache.finish_prefill(lens)
    token = torch.randint(0, c.vocab_size, (batch,), device=device)  # [B]
    if device.type == "cuda":  # the peak of the step's own memory too, in the graph's pool
        torch.cuda.reset_peak_memory_stats(device)
    model.decode(token, cache)  # the first warm-up; graphed runs the second
    timed = "graph" if device.type == "cuda" and isinstance(model, Llama) else "eager"
    if timed == "graph":
        step = graphed(lambda: model.decode(token, cache), device)[0].replay
    else:
        step = functools.partial(model.decode, token, cache)
        step()
    sync(device)
    seconds = median_seconds(device, step, steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return seconds, cache, peak, timed


def _decode_within_memory(name, model, backend, options, batch, limit, context, steps, log):
    """:func:`time_decode` at ``batch``, or, where the step's transient memory (the random rows
    stored, the scores) runs the device out, at 7/8 of the batch until it fits -> (batch, what set
    it: ``limit``, or "memory" after a back-off; time_decode's result, or (None,) * 4 where not
    even one sequence ran)."""
    while batch >= 1:
        try:
            return batch, limit, time_decode(model, backend, options, batch, context, steps)
        except (torch.OutOfMemoryError, MemoryError) as e:  # the allocator's, or the caches'
            # refusal of more than the device (or, on the CPU, the host RAM) has
            error = str(e).splitlines()[0][:80]
        torch.cuda.empty_cache()  # here: the exception's frames held the failed step's cache
        smaller = batch * 7 // 8
        log(f"{name:13s} ctx {context:6d} {backend:6s}: out of memory at batch {batch} ({error}); "
            f"trying {smaller}")
        batch, limit = smaller, "memory"
    log(f"{name:13s} ctx {context:6d} {backend:6s}: one sequence does not fit the memory")
    return batch, limit, (None,) * 4


def device_budget(device, budget_gb=None, reserve_gb=6.0):
    """The device-memory budget for the cache in bytes: ``budget_gb`` where given, else what is
    free on the CUDA ``device`` less ``reserve_gb`` (:func:`measure` asks a budget on the CPU);
    ValueError where that leaves nothing, or where ``budget_gb`` is more than the device has (on
    the CPU, the host RAM available)."""
    if budget_gb is not None:
        budget = int(budget_gb * 1e9)
        has = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
               else host_bytes_available())
        if has is not None and budget > has:
            where = "the device has" if device.type == "cuda" else "the host RAM has available"
            raise ValueError(f"--budget {budget_gb:g} GB is more than the {has / 1e9:.3f} GB "
                             f"{where} ({device}); give a smaller --budget")
        return budget
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0]
    if free <= reserve_gb * 1e9:
        raise ValueError(f"{device} has {free / 1e9:.3f} GB free, not more than the "
                         f"{reserve_gb} GB reserved for activations (--reserve): no budget is "
                         f"left for the cache; give a smaller --reserve, or --budget")
    return int(free - reserve_gb * 1e9)


def host_budget():
    """The host RAM the caches of a run may fill, in bytes: 80 % of what is available; None where
    that is not known (then unchecked)."""
    available = host_bytes_available()
    return None if available is None else int(0.8 * available)


def fit_batch(model, backend, options, capacity, budget, host_budget, max_batch):
    """The largest batch (<= ``max_batch``) whose cache of ``capacity`` tokens per sequence fits
    ``budget`` device bytes and ``host_budget`` host bytes (None: unchecked); 0 if none fits
    -> (batch, what set it: "device", "host" or "cap")."""
    device, host = sequence_bytes(backend, model.config, options, capacity, model.dtype)
    limits = {"device": max(0, budget // device), "cap": max_batch}
    if host and host_budget is not None:
        limits["host"] = max(0, host_budget // host)
    limit = min(limits, key=limits.get)  # on a tie the first: the device budget
    return limits[limit], limit


def build_model(config, device, dtype, engine, max_len):
    """A random-weight model of ``config`` on ``device`` in ``dtype``: kcache_ops' own decoder
    (``engine`` "kcache_ops"), or transformers' LlamaForCausalLM of the same shape run on our caches
    (``engine`` "transformers", positions up to ``max_len``)."""
    if engine == "kcache_ops":
        return random_model(config, device, dtype)
    from ..integrations.transformers_engine import TransformersDecoder  # transformers is optional
    return TransformersDecoder(hf_model(config, device, dtype, max_len))


def measure(models, contexts, device, dtype, options, steps, budget_gb=None, reserve_gb=6.0,
            max_batch=256, hf=True, engine="kcache_ops", log=print, on_rows=lambda rows: None,
            ceilings=None, host_bytes=None):
    """Every (model shape name, context) with ``dense`` and KCache (``options``), the model code of
    ``engine`` (see :func:`build_model`); ``contexts`` a list for every model, or a dict of lists by
    model name -> list of row dicts (model, context, backend, batch, batch_limit (what set the
    batch: the "device" or "host" budget, the "cap" max_batch, or the device "memory" where the
    step's transient memory ran out at the fitted batch), options, budget_bytes, cache_device_bytes,
    host_bytes, peak_device_bytes, prefill_tok_s, decode_step_ms, decode_tok_s, decode_timed (how:
    :func:`time_decode`), pcie_bytes_per_step;
    vs_dense for KCache: its decode tok/s over dense's, None where ``max_batch`` capped either
    batch, as the two then do not fill one device memory; hf_decode_tok_s and dense_vs_hf for dense
    where transformers ran; given the ``ceilings`` measured (:func:`~.ceilings.measure_ceilings`),
    also device_bytes_per_step (the weights read once and the cache's
    :meth:`device_bytes_read_per_step` at the median timed step's keys), floor_step_ms
    (:func:`~.ceilings.floor_seconds` of those bytes and pcie_bytes_per_step) and of_ceiling (that
    floor over the measured step)). ``host_bytes``: the host RAM the caches may fill (None:
    :func:`host_budget`). A context whose ``context + steps + 2`` positions exceed a model's
    max_position_embeddings is skipped for that model with a line saying why, before any is measured
    (ValueError where none is left); a configuration whose prefill of one sequence runs out of
    memory is left out with a line saying so. ``log`` gets one line per configuration,
    ``on_rows`` the rows so far after each one (the bench command saves them, so that a run cut
    off keeps what it measured)."""
    if not isinstance(contexts, dict):
        contexts = {name: contexts for name in models}
    model_contexts = {name: usable_contexts(name, contexts[name], steps, log) for name in models}
    if not any(model_contexts.values()):
        raise ValueError("no (model, context) to measure: each context + steps + 2 exceeds "
                         "the model's max_position_embeddings (the lines above say which)")
    for name in models:  # what a shape or a context cannot take, before any is measured (the
        # longest context's: a step's rows, N = min(topn, capacity), grow with the capacity)
        if model_contexts[name]:
            check_kcache(SHAPES[name], device, dtype, options,
                         max(model_contexts[name]) + steps + 2)
    if budget_gb is None and device.type != "cuda":  # before the loop, where device_budget's
        # errors skip a model
        raise ValueError("give a budget (GB) on the CPU")
    missing = transformers_missing() if engine == "transformers" or hf else None
    if missing and engine == "transformers":
        raise ValueError(f"--engine transformers: {missing}")
    if missing:  # a comparison, not the measurement: the run goes on without it
        log(f"# the transformers comparison is skipped: {missing}")
        hf = False
    rows = []
    host_limit = host_budget() if host_bytes is None else host_bytes
    for name in models:
        config, usable = SHAPES[name], model_contexts[name]
        if not usable:
            continue
        available = host_bytes_available() if device.type == "cpu" else None
        weights = weight_bytes(config, dtype)
        if available is not None and weights > available:  # the allocator's refusal would be a
            # RuntimeError, after the page cache was pushed out
            log(f"# {name}: skipped: its weights need {weights / 1e9:.3f} GB, more than the "
                f"{available / 1e9:.3f} GB the host RAM has available")
            continue
        try:
            model = build_model(config, device, dtype, engine, max(usable) + steps + 2)
        except torch.OutOfMemoryError as e:  # these weights do not fit; the next model's may
            log(f"# {name}: skipped: its weights do not fit the device: "
                f"{str(e).splitlines()[0][:120]}")
            continue
        try:  # what the weights leave free
            budget = device_budget(device, budget_gb, reserve_gb)
            log(f"# {name}: budget {budget / 1e9:.3f} GB ({budget / GiB:.3f} GiB) for the cache")
        except ValueError as e:  # these weights leave no room; the next model's may
            log(f"# {name}: skipped: {e}")
            budget = 0
        dense_rows = []
        for context in usable:
            dense_row = None
            for backend, backend_options in (("dense", None), ("kcache", options)):
                batch, limit = fit_batch(model, backend, backend_options, context + steps + 2,
                                         budget, host_limit, max_batch)
                if batch < 1:
                    log(f"{name:13s} ctx {context:6d} {backend:6s}: one sequence does not fit "
                        f"the budget")
                    continue
                try:
                    prefill_s, error = time_prefill(model, backend, backend_options, context), None
                except (torch.OutOfMemoryError, MemoryError) as e:  # one sequence's prefill:
                    # what the budget does not count (the layer's activations, dense's K and V)
                    error = str(e).splitlines()[0][:80]
                if error is not None:  # here: the exception's frames held the prefill's tensors
                    torch.cuda.empty_cache()
                    log(f"{name:13s} ctx {context:6d} {backend:6s}: the prefill of one sequence "
                        f"runs out of memory ({error}); left out")
                    continue
                batch, limit, (step_s, cache, peak, timed) = _decode_within_memory(
                    name, model, backend, backend_options, batch, limit, context, steps, log)
                if cache is None:
                    continue
                row = {"model": name, "context": context, "backend": backend, "batch": batch,
                       "batch_limit": limit,
                       "options": backend_options.to_dict() if backend_options else {},
                       "budget_bytes": budget, "cache_device_bytes": cache.device_bytes(),
                       "host_bytes": cache.host_bytes(), "peak_device_bytes": peak,
                       "prefill_tok_s": context / prefill_s, "decode_step_ms": 1e3 * step_s,
                       "decode_tok_s": batch / step_s, "decode_timed": timed,
                       "pcie_bytes_per_step": cache.host_bytes_read_per_step()}
                if ceilings is not None:  # the timed steps attend context + 3 ... context +
                    # steps + 2 keys (after the two warm-up steps): the median step's
                    keys = context + 3 + (steps - 1) // 2
                    row["device_bytes_per_step"] = (weight_bytes_per_step(config, batch, dtype)
                                                    + cache.device_bytes_read_per_step(keys))
                    floor = floor_seconds(row["device_bytes_per_step"],
                                          row["pcie_bytes_per_step"], ceilings)
                    row["floor_step_ms"], row["of_ceiling"] = 1e3 * floor, floor / step_s
                del cache
                if backend == "dense":
                    dense_row = row
                    dense_rows.append(row)
                elif dense_row is not None:  # at equal memory only: not where a batch was capped
                    capped = "cap" in (limit, dense_row["batch_limit"])
                    row["vs_dense"] = (None if capped
                                       else row["decode_tok_s"] / dense_row["decode_tok_s"])
                rows.append(row)
                log(row_line(row))
                on_rows(rows)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if hf and dense_rows:
            compare_with_hf(config, device, dtype, dense_rows, steps, log)
            on_rows(rows)
    if not rows:  # an empty run is no result: it passed, and wrote an empty table
        raise ValueError("no configuration ran: none fit the budget and the memory (the lines "
                         "above say why)")
    return rows


def usable_contexts(name, contexts, steps, log):
    """The ``contexts`` (tokens) whose cache of ``context + steps + 2`` positions the model shape
    ``name`` can address (at most its max_position_embeddings); ``log`` gets a line for each
    other one, which is skipped."""
    positions = SHAPES[name].max_position_embeddings
    usable = []
    for context in contexts:
        if context + steps + 2 > positions:
            log(f"# {name} ctx {context}: skipped: context + steps + 2 = "
                f"{context + steps + 2} positions, more than its max_position_embeddings "
                f"{positions}")
        else:
            usable.append(context)
    return usable


def vs_dense_text(row):
    """The printed "vs dense" of a KCache row: the ratio, or why there is none."""
    if row.get("vs_dense") is None:
        return "– (capped by --max-batch, not at equal memory)"
    return f"{row['vs_dense']:.2f}x"


def row_line(row):
    """One printed line per configuration (its host V read a step is what crosses PCIe on a
    GPU; on the CPU it is read from the same RAM)."""
    return (f"{row['model']:13s} ctx {row['context']:6d} {row['backend']:6s} batch "
            f"{row['batch']:4d}  prefill {row['prefill_tok_s']:9.0f} tok/s  decode "
            f"{row['decode_tok_s']:9.1f} tok/s ({row['decode_step_ms']:.1f} ms/step)  cache dev "
            f"{row['cache_device_bytes'] / GiB:.3f} GiB  host {row['host_bytes'] / GiB:.3f} GiB  "
            f"host V read {row['pcie_bytes_per_step'] / 2**20:.2f} MiB/step"
            + (f"  floor {row['floor_step_ms']:.3g} ms ({row['of_ceiling']:.1%} of the ceiling)"
               if "floor_step_ms" in row else "")
            + (f"  vs dense {vs_dense_text(row)}" if "vs_dense" in row else ""))
