"""KCache manager at the protocol level: random q/k/v per layer and step, checked against exact
attention over each sequence's history computed independently in float64."""
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import kcache_ops
from kcache_ops import reference
from kcache_ops.caches import KCache, KCacheOptions, make_cache, memory
from kcache_ops.caches.dense import exact_decode_attention
from kcache_ops.model.config import LlamaConfig

from conftest import TOL
from cuda_checks import requires_cuda

LAYERS, HQ, HKV, D = 3, 4, 2, 64
LENS = [5, 17, 11]  # varlen, right-padded to T = 17
STEPS = 6


def tiny_config():
    return LlamaConfig(vocab_size=32, hidden_size=HQ * D, intermediate_size=64,
                       num_layers=LAYERS, num_heads=HQ, num_kv_heads=HKV, head_dim=D)


def exact_attention(q, keys, values):
    """q [Hq, D], keys/values [Hkv, L, D] -> [Hq, D] float64: softmax(q·Kᵀ/√D)·V per head."""
    g = q.shape[0] // keys.shape[0]
    k = keys.double().repeat_interleave(g, dim=0)  # [Hq, L, D]
    v = values.double().repeat_interleave(g, dim=0)  # [Hq, L, D]
    p = torch.softmax(torch.einsum("hd,hld->hl", q.double(), k) / math.sqrt(q.shape[-1]), -1)
    return torch.einsum("hl,hld->hd", p, v)


class Run:
    """Drives a cache through a prefill of LENS and decode steps on random inputs, keeping every
    sequence's K/V history ([Hkv, L, D] per layer and sequence, on the CPU) for the oracle."""

    def __init__(self, cache, device, dtype, seed=0):
        self.cache, self.device, self.dtype = cache, device, dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.hist_k = [[None] * len(LENS) for _ in range(LAYERS)]
        self.hist_v = [[None] * len(LENS) for _ in range(LAYERS)]

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(self.device, self.dtype)

    def prefill(self):
        """-> outputs per layer, [B, Hq, T, D] each."""
        B, T = len(LENS), max(LENS)
        lens = torch.tensor(LENS, dtype=torch.int32, device=self.device)  # [B]
        outs = []
        for layer in range(LAYERS):
            q, k, v = self.rand(B, HQ, T, D), self.rand(B, HKV, T, D), self.rand(B, HKV, T, D)
            outs.append((q, self.cache.prefill(layer, q, k, v, lens)))
            for b, n in enumerate(LENS):
                self.hist_k[layer][b], self.hist_v[layer][b] = k[b, :, :n].cpu(), v[b, :, :n].cpu()
        self.cache.finish_prefill(lens)
        return outs

    def step(self):
        """-> (q [B, Hq, D], out [B, Hq, D]) per layer."""
        B = len(LENS)
        outs = []
        for layer in range(LAYERS):
            q, k, v = self.rand(B, HQ, D), self.rand(B, HKV, D), self.rand(B, HKV, D)
            outs.append((q, self.cache.decode(layer, q, k, v)))
            for b in range(B):
                self.hist_k[layer][b] = torch.cat([self.hist_k[layer][b], k[b, :, None].cpu()], 1)
                self.hist_v[layer][b] = torch.cat([self.hist_v[layer][b], v[b, :, None].cpu()], 1)
        self.cache.finish_decode()
        return outs

    def check_steps(self, want, steps=STEPS):
        """Prefill, then check each decode step's output per sequence against ``want(q, k, v)``:
        q [1, Hq, D] and that sequence's history k/v [1, Hkv, L, D], on the CPU -> [1, Hq, D]."""
        self.prefill()
        for _ in range(steps):
            for layer, (q, out) in enumerate(self.step()):
                for b in range(len(LENS)):
                    k = self.hist_k[layer][b][None]  # [1, Hkv, L, D]
                    v = self.hist_v[layer][b][None]  # [1, Hkv, L, D]
                    torch.testing.assert_close(out[b][None].cpu(), want(q[b][None].cpu(), k, v),
                                               atol=1e-5, rtol=1e-5)

    def exact(self, layer, b, q):
        """q [Hq, D] -> exact attention [Hq, D] float64 on the CPU over sequence b's history."""
        return exact_attention(q.cpu(), self.hist_k[layer][b], self.hist_v[layer][b])


def make(device, dtype=torch.float32, capacity=32, **options):
    """A KCache whose options are the paper's but those given (whatever the defaults)."""
    return KCache(tiny_config(), len(LENS), capacity, device, dtype,
                  replace(KCacheOptions.paper_literal(), **options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("group_select", [False, True])
@pytest.mark.parametrize("renormalize, tail", [(True, "none"), (False, "none"), (True, "mean"),
                                               (True, "int2"), (True, "int4")])
def test_topn_at_least_length_is_exact(device, dtype, group_select, renormalize, tail):
    """N >= L captures all the mass: every layer, prefill row and decode step equals exact
    attention (renormalize=False too, since the dropped mass is zero; a tail adds nothing)."""
    run = Run(make(device, dtype, topn=64, group_select=group_select, renormalize=renormalize,
                   tail=tail), device, dtype)
    tol = TOL[dtype]
    for layer, (q, out) in enumerate(run.prefill()):
        for b, n in enumerate(LENS):
            t = n - 1  # the last prompt row sees the whole prompt
            want = run.exact(layer, b, q[b, :, t])
            torch.testing.assert_close(out[b, :, t].double().cpu(), want, atol=tol, rtol=tol)
    for _ in range(STEPS):
        for layer, (q, out) in enumerate(run.step()):
            for b in range(len(LENS)):
                want = run.exact(layer, b, q[b])
                torch.testing.assert_close(out[b].double().cpu(), want, atol=tol, rtol=tol)
    assert run.cache.seq_lens.tolist() == [n + STEPS for n in LENS]


def reference_step(q, k, v, topn, group_select, tail, top_p=1.0):
    """The reference ops of one KCache decode step over one sequence's whole history.

    q [1, Hq, D], k/v [1, Hkv, L, D] float32 -> out [1, Hq, D] float32.
    """
    lens = torch.tensor([k.shape[2]], dtype=torch.int32)  # [1]
    scores, indices, lse = reference.qk_topn(q, k, lens, topn, group_select=group_select)
    if top_p < 1:
        scores, indices = prefix_by_loop(scores, indices, lse, top_p)
    if tail == "none":
        return reference.sparse_attn_v(scores, indices, v, lse)
    if tail == "mean":
        return reference.sparse_attn_v(scores, indices, v, lse, renormalize=False,
                                       v_sum=v.sum(2), seq_lens=lens)
    bits = {"int2": 2, "int4": 4}[tail]
    codes, meta = reference.quantize_rows(v, bits)
    top = reference.sparse_attn_v(scores, indices, v, lse, renormalize=False)  # [1, Hq, D]
    every, _ = reference.qk_scores(q, k, lens)  # [1, Hq, L]
    return top + reference.lowbit_tail(every, lens, lse, indices, codes, meta, bits)


@pytest.mark.parametrize("group_select", [False, True])
@pytest.mark.parametrize("tail", ["none", "mean", "int2", "int4"])
def test_small_topn_matches_reference_ops(device, group_select, tail):
    """N < L: each decode step equals the reference qk_topn + sparse_attn_v (+ the tail) over
    the history, whose low-bit copy or V sum the cache kept through prefill and appends."""
    topn = 4
    run = Run(make(device, topn=topn, group_select=group_select, tail=tail), device,
              torch.float32)
    run.check_steps(lambda q, k, v: reference_step(q, k, v, topn, group_select, tail))


def prefix_by_loop(scores, indices, lse, top_p):
    """reference.mass_prefix written as a loop over heads and entries, for the test."""
    scores, indices = scores.clone(), indices.clone()
    B, Hq, N = scores.shape
    for b in range(B):
        for h in range(Hq):
            total = 0.0
            for i in range(N):
                if total >= top_p:
                    scores[b, h, i], indices[b, h, i] = float("-inf"), -1
                elif indices[b, h, i] >= 0:
                    total += math.exp(scores[b, h, i] - lse[b, h])
    return scores, indices


def test_mass_prefix_keeps_the_shortest_prefix_reaching_top_p():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 64, generator=gen), torch.randn(2, 2, 50, 64, generator=gen) * 3
    lens = torch.tensor([50, 0], dtype=torch.int32)  # [B]; the second sequence is empty
    scores, indices, lse = reference.qk_topn(q, k, lens, 16)
    for top_p in (0.3, 0.8, 1.0):
        got = reference.mass_prefix(scores, indices, lse, top_p)
        want = prefix_by_loop(scores, indices, lse, top_p)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    kept = (reference.mass_prefix(scores, indices, lse, 0.3)[1] >= 0).sum(-1)  # [B, Hq]
    assert (kept[0] >= 1).all() and (kept[0] < 16).any() and (kept[1] == 0).all()


@pytest.mark.parametrize("tail", ["none", "int2"])
def test_top_p_reads_fewer_rows_and_matches_reference_ops(device, tail):
    """top_p < 1: the rows past each head's mass prefix are not read (rows_read < N); the step
    equals the reference ops on the prefix (the tail takes the rest)."""
    run = Run(make(device, topn=8, tail=tail, top_p=0.5), device, torch.float32)
    run.cache.record_mass = True
    run.check_steps(lambda q, k, v: reference_step(q, k, v, 8, False, tail, top_p=0.5), steps=2)
    rows = run.cache.rows_read()  # [layers]
    assert ((rows >= 1) & (rows < 8)).all(), rows


def test_tails_bring_a_small_topn_close_to_exact(device):
    """At N = 2 of ~20 keys the low-bit tails cut the error against exact attention several
    fold (the rows not read come from the copy with their exact weights); the mean tail less."""
    errors = {}
    for tail in ("none", "mean", "int2", "int4"):
        run = Run(make(device, topn=2, tail=tail), device, torch.float32)
        run.prefill()
        err = 0.0
        for _ in range(STEPS):
            for layer, (q, out) in enumerate(run.step()):
                for b in range(len(LENS)):
                    err = max(err, (out[b].double().cpu() - run.exact(layer, b, q[b])).abs().max()
                              .item())
        errors[tail] = err
    assert errors["int4"] < errors["int2"] < errors["none"] / 2, errors
    assert errors["int4"] < errors["none"] / 8, errors


@pytest.mark.parametrize("tail", ["int2", "int4"])
def test_float16_v_at_the_edge_of_its_range_stays_finite(device, tail):
    """float16 V rows holding -65500 and 65000 (finite): the low-bit copy's bfloat16 min and
    scale reach past float16's range, but a decode step's output, like exact attention (an
    average of the rows), stays finite, its edge columns within two float16 steps of it."""
    gen = torch.Generator().manual_seed(0)
    B, T = len(LENS), max(LENS)
    cache = make(device, torch.float16, topn=2, tail=tail)
    lens = torch.full((B,), T, dtype=torch.int32, device=device)  # [B]
    steps = []
    for layer in range(LAYERS):
        q = torch.randn(B, HQ, T + 1, D, generator=gen).half()  # [B, Hq, T + 1, D]
        k = torch.randn(B, HKV, T + 1, D, generator=gen).half()  # [B, Hkv, T + 1, D]
        v = torch.randn(B, HKV, T + 1, D, generator=gen)  # [B, Hkv, T + 1, D]
        v[..., 0], v[..., 1] = -65500.0, 65000.0
        q, k, v = (x.to(device) for x in (q, k, v.half()))
        cache.prefill(layer, q[:, :, :T], k[:, :, :T], v[:, :, :T], lens)
        steps.append((q[:, :, T], k, v))
    cache.finish_prefill(lens)
    for layer, (q, k, v) in enumerate(steps):
        out = cache.decode(layer, q, k[:, :, T], v[:, :, T])  # [B, Hq, D]
        assert out.isfinite().all()
        for b in range(B):  # the edge columns (the copy of such a row steps by ~2^12)
            want = exact_attention(q[b].cpu(), k[b].cpu(), v[b].cpu())  # [Hq, D]
            torch.testing.assert_close(out[b, :, :2].double().cpu(), want[:, :2], atol=64, rtol=0)


def test_dense_layers_are_exact_and_hold_device_v(device):
    """With N = 2, only the dense layer stays exact; it alone holds V on the device."""
    run = Run(make(device, topn=2, dense_layers=[1]), device, torch.float32)
    run.prefill()
    assert set(run.cache.v_device) == {1} and set(run.cache.v_host) == {0, 2}
    errors = [0.0] * LAYERS
    for _ in range(STEPS):
        for layer, (q, out) in enumerate(run.step()):
            for b in range(len(LENS)):
                err = (out[b].double().cpu() - run.exact(layer, b, q[b])).abs().max().item()
                errors[layer] = max(errors[layer], err)
    assert errors[1] < 1e-5
    assert errors[0] > 1e-2 and errors[2] > 1e-2  # top-2 of ~20 keys is not exact


def test_memory_accounting_is_exact(device):
    B, S = len(LENS), 40
    row = B * HKV * S * D * 2  # bytes of one [B, Hkv, S, D] bfloat16 buffer
    cache = make(device, torch.bfloat16, capacity=S, dense_layers=(0,))
    assert cache.device_bytes() == LAYERS * row + row  # K of every layer, V of layer 0
    assert cache.host_bytes() == (LAYERS - 1) * row
    assert make(device, capacity=S).device_bytes() == LAYERS * B * HKV * S * D * 4
    run = Run(cache, device, torch.bfloat16)
    run.prefill()
    run.step()
    assert cache.device_bytes() == LAYERS * row + row
    assert cache.host_bytes() == (LAYERS - 1) * row
    for tail, extra in [("mean", 2 * B * HKV * D * 4),  # V sums before and after a step, float32
                        ("int2", B * HKV * S * (D // 4 + 4)),  # codes, bf16 scale and min
                        ("int4", B * HKV * S * (D // 2 + 4))]:
        with_tail = make(device, torch.bfloat16, capacity=S, dense_layers=(0,), tail=tail)
        assert with_tail.device_bytes() == LAYERS * row + row + (LAYERS - 1) * extra


def test_capacity_overflow(device):
    with pytest.raises(ValueError, match="capacity overflow: a prompt of 17 tokens"):
        Run(make(device, capacity=16), device, torch.float32).prefill()
    run = Run(make(device, capacity=max(LENS) + 2), device, torch.float32)
    run.prefill()
    run.step()
    run.step()
    with pytest.raises(ValueError, match="capacity overflow: a sequence of 19 tokens"):
        run.step()


@pytest.mark.parametrize("options, error, message", [
    ({"topn": 0}, ValueError, "topn must be an integer >= 1, got 0"),
    ({"topn": 2.5}, ValueError, "topn must be an integer >= 1, got 2.5"),
    ({"dense_layers": (1, 3)}, ValueError, r"dense_layers \[3\] out of range .* 3 layers"),
    ({"dense_layers": (-1,)}, ValueError, r"dense_layers \[-1\] out of range"),
    ({"top_n": 8}, TypeError, "unknown option.* top_n; the options are topn"),
    ({"tail": "int8"}, ValueError, "tail must be one of none, mean, int2, int4, got 'int8'"),
    ({"tail": "mean", "renormalize": False}, ValueError, "renormalize=False drops the mass"),
    ({"capacity": 0}, ValueError, "capacity must be integers >= 1, got 2 and 0"),
    ({"capacity": 8.0}, ValueError, "capacity must be integers >= 1, got 2 and 8.0"),
    ({"capacity": "8"}, ValueError, "capacity must be integers >= 1, got 2 and '8'"),
])
def test_bad_options(options, error, message):
    args = {"capacity": 32, **options}
    capacity = args.pop("capacity")
    with pytest.raises(error, match=message):
        KCache(tiny_config(), 2, capacity, "cpu", torch.float32, KCacheOptions.from_dict(args))


@pytest.mark.parametrize("backend", ["dense", "kcache"])
def test_sizes_of_any_integer_type(backend):
    """batch and capacity may be NumPy integers or 0-d integer tensors (sizes computed with either);
    the cache keeps them as ints. A bool of any kind is refused, as in every integer argument."""
    import numpy as np
    options = KCacheOptions() if backend == "kcache" else None
    for batch, capacity in ((np.int64(2), np.int32(16)), (torch.tensor(2), torch.tensor(16))):
        cache = make_cache(backend, tiny_config(), batch, capacity, "cpu", torch.float32, options)
        assert type(cache.capacity) is int and cache.capacity == 16
        assert cache.k[0].shape[0] == 2 and cache.seq_lens.shape == (2,)
    for bad in (np.bool_(True), torch.tensor(True)):
        with pytest.raises(ValueError, match="batch and capacity must be integers >= 1"):
            make_cache(backend, tiny_config(), 2, bad, "cpu", torch.float32, options)


@pytest.mark.parametrize("backend", ["dense", "kcache"])
def test_dtype_that_is_no_torch_dtype(backend):
    """A dtype given as a string, or one no model runs in, is a ValueError naming it (the dense
    cache gave an AttributeError from its memory check); the dense cache takes float64."""
    options = KCacheOptions() if backend == "kcache" else None
    owner = {"dense": "DenseCache", "kcache": "KCache"}[backend]
    for bad in ("float32", torch.int32, None):
        with pytest.raises(ValueError, match=f"{owner}: dtype must be .*, got"):
            make_cache(backend, tiny_config(), 2, 8, "cpu", bad, options)
    if backend == "dense":
        assert make_cache(backend, tiny_config(), 2, 8, "cpu", torch.float64).k[0].dtype == \
            torch.float64


def test_lens_out_of_range_are_rejected():
    cache = make("cpu")
    k = torch.randn(len(LENS), HKV, max(LENS), D)  # [B, Hkv, T = 17, D]
    for layer in range(LAYERS):
        cache.store_prompt(layer, k, k, torch.tensor(LENS, dtype=torch.int32))
    with pytest.raises(ValueError, match="lens reach 18 tokens but the prompt had 17"):
        cache.finish_prefill(torch.tensor([18, 1, 1], dtype=torch.int32))
    for low in (-2, -1):  # -1: the dense cache would write its token at the last slot
        with pytest.raises(ValueError, match=f"lens must be >= 0, got {low}"):
            cache.finish_prefill(torch.tensor([5, low, 1], dtype=torch.int32))


def test_heads_the_ops_cannot_take_fail_when_built():
    c = LlamaConfig(vocab_size=32, hidden_size=128, intermediate_size=64, num_layers=1,
                    num_heads=4, num_kv_heads=2, head_dim=32)
    with pytest.raises(ValueError, match="KCache: head_dim must be 64 or 128, got 32"):
        KCache(c, 1, 8, "cpu", torch.float32)
    # a stand-in config (a LlamaConfig refuses these heads itself)
    grouped = SimpleNamespace(num_layers=1, num_heads=5, num_kv_heads=2, head_dim=64)
    with pytest.raises(ValueError, match=r"num_heads \(5\) must be a multiple of num_kv_heads "
                                         r"\(2\)"):
        KCache(grouped, 1, 8, "cpu", torch.float32)


def test_more_host_memory_than_available_fails_when_built(device):
    """A cache whose host tensors need more than MemAvailable is refused before any of it is
    allocated (on the CPU device K and every layer's V; on CUDA the KCache layers' V). Twice
    what is available now: other processes' memory moves MemAvailable before the cache reads it
    (just over it once went through when another process freed memory in between)."""
    available = kcache_ops.host_bytes_available()
    if available is None:
        pytest.skip("this machine does not report MemAvailable")
    tensors = 2 * LAYERS if device == "cpu" else LAYERS
    capacity = 2 * available // (tensors * len(LENS) * HKV * D * 2) + 1  # bfloat16 rows
    with pytest.raises(MemoryError, match=rf"KCache: {tensors} cache tensors of shape "
                                          rf"\[3, 2, {capacity}, 64\] torch.bfloat16 in host RAM "
                                          r"need \d+ bytes, more than the \d+ bytes"):
        make(device, torch.bfloat16, capacity)


def test_the_tensors_beside_k_and_v_count_against_host_memory(monkeypatch):
    """KCache's low-bit copy, hot rows and reuse pool count with K and V: a CPU cache whose K and
    V fill half of MemAvailable, with an int4 copy, every position hot and a pool of G·N = 2·S
    rows per KV head (2.7 times the bytes of K and V in all), is refused naming those bytes.
    MemAvailable reads 256 MiB: a check that let the cache through would allocate ~350 MiB, not
    most of a shared machine's RAM (helper 162's mutant was killed by the OOM killer)."""
    available = 256 << 20
    monkeypatch.setattr(memory, "host_bytes_available", lambda: available)
    row = D * 2  # bytes of a bfloat16 row
    capacity = available // (4 * LAYERS * len(LENS) * HKV * row)  # K and V: half of it
    options = KCacheOptions(topn=capacity, tail="int4", sinks=0, window=capacity,
                            reuse=2 * capacity)
    per_position = D // 2 + 4 + row + 2 * (row + 8)  # int4 codes and meta, hot row, two slots
    beside = LAYERS * len(LENS) * HKV * capacity * per_position
    needed = 2 * LAYERS * len(LENS) * HKV * capacity * row + beside
    with pytest.raises(MemoryError, match=rf"KCache: {2 * LAYERS} cache tensors of shape "
                                          rf"\[3, 2, {capacity}, 64\] torch.bfloat16 and {beside} "
                                          rf"bytes beside them in host RAM need {needed} bytes"):
        KCache(tiny_config(), len(LENS), capacity, "cpu", torch.bfloat16, options)


@requires_cuda
def test_the_tensors_beside_k_count_against_the_gpu():
    """On CUDA they count with the device's K and V: the dense layers' K and V and the KCache
    layer's K fill 90% of the GPU, and the KCache layer's int4 copy with every position hot (1.28
    times one K) brings it past the whole (its V, 18% of the GPU, is in host RAM)."""
    total = torch.cuda.get_device_properties(0).total_memory
    row = D * 2  # bytes of a bfloat16 row
    tensors = 2 * LAYERS - 1  # on the device
    capacity = total * 9 // 10 // (tensors * len(LENS) * HKV * row)
    options = KCacheOptions(tail="int4", sinks=0, window=capacity, dense_layers=range(1, LAYERS))
    beside = len(LENS) * HKV * capacity * (D // 2 + 4 + row)
    with pytest.raises(MemoryError, match=rf"KCache: {tensors} cache tensors .* and {beside} "
                                          rf"bytes beside them on cuda:0 need \d+ bytes, more "
                                          rf"than the {total} bytes the device has"):
        KCache(tiny_config(), len(LENS), capacity, "cuda:0", torch.bfloat16, options)


def test_dense_cache_beyond_memory_fails_when_built():
    """The dense cache is refused as KCache is, with the bytes it asks for, before it allocates:
    K and V of every layer on the CPU (it had no check: torch.zeros failed in its allocator, or
    could not even size the storage)."""
    available = kcache_ops.host_bytes_available()
    if available is None:
        pytest.skip("this machine does not report MemAvailable")
    for capacity in (2 * available // (2 * LAYERS * len(LENS) * HKV * D * 4) + 1, 2 ** 62):
        with pytest.raises(MemoryError, match=rf"DenseCache: {2 * LAYERS} cache tensors of shape "
                                              rf"\[3, 2, {capacity}, 64\] torch.float32 in host "
                                              r"RAM need \d+ bytes, more than the \d+ bytes"):
            make_cache("dense", tiny_config(), len(LENS), capacity, "cpu", torch.float32)


@pytest.mark.parametrize("backend", ["dense", "kcache"])
@pytest.mark.parametrize("batch,capacity", [(2 ** 62, 8), (3, 2 ** 58)])
def test_sizes_beyond_any_memory_fail_in_the_memory_check(backend, batch, capacity):
    """A batch or capacity past any memory is refused by the memory check, with the bytes asked
    for, before any tensor is made: the sequence lengths ([B] tensors) failed in torch's
    allocator, and the low-bit tail's parts (built on the meta device to count their bytes)
    could not size their storage."""
    if kcache_ops.host_bytes_available() is None:
        pytest.skip("this machine does not report MemAvailable")
    owner = {"dense": "DenseCache", "kcache": "KCache"}[backend]
    with pytest.raises(MemoryError, match=rf"{owner}: \d+ cache tensors "
                                          rf"of shape \[{batch}, 2, {capacity}, 64\] "
                                          r"torch.float32 in host RAM need \d+ bytes"):
        make_cache(backend, tiny_config(), batch, capacity, "cpu", torch.float32,
                   KCacheOptions(tail="int2") if backend == "kcache" else None)


@requires_cuda
@pytest.mark.parametrize("backend", ["dense", "kcache"])
def test_cache_beyond_the_gpu_fails_when_built(backend):
    """Device tensors that need more than the whole GPU are refused with the bytes asked for
    (K and V of every layer: KCache's layers all dense, so that no host V is refused first),
    before any is allocated."""
    total = torch.cuda.get_device_properties(0).total_memory
    capacity = total // (2 * LAYERS * len(LENS) * HKV * D * 2) + 1  # bfloat16 rows
    options = KCacheOptions(dense_layers=range(LAYERS)) if backend == "kcache" else None
    with pytest.raises(MemoryError, match=rf"{2 * LAYERS} cache tensors .* on cuda:0 need \d+ "
                                          rf"bytes, more than the {total} bytes the device has"):
        make_cache(backend, tiny_config(), len(LENS), capacity, "cuda:0", torch.bfloat16, options)


@pytest.mark.parametrize("tail", ["int2", "none"])
def test_topn_beyond_the_capacity_and_an_empty_prompt(tail):
    """N larger than the capacity selects at most the capacity's rows (no step allocates for N),
    and an empty prompt (T = 0) is stored, in any layout (one with a strided last dim was refused
    by the low-bit copy's quantize_rows): the first decode step attends to its own token."""
    cache = KCache(tiny_config(), 2, 8, "cpu", torch.float32,
                   KCacheOptions(topn=10**9, tail=tail))
    k = torch.randn(2, HKV, 0, 2 * D)[..., ::2]  # [B, Hkv, 0, D], its last dim strided
    lens = torch.zeros(2, dtype=torch.int32)
    for layer in range(LAYERS):
        cache.store_prompt(layer, k, k, lens)
    cache.finish_prefill(lens)
    scores, indices, _ = cache.select(torch.randn(2, HQ, D), cache.k[0], lens + 1)
    assert scores.shape == indices.shape == (2, HQ, 8)
    v1 = torch.randn(2, HKV, D)  # [B, Hkv, D]
    out = cache.decode(0, torch.randn(2, HQ, D), torch.randn(2, HKV, D), v1)  # [B, Hq, D]
    torch.testing.assert_close(out, v1.repeat_interleave(HQ // HKV, 1))


@pytest.mark.parametrize("backend", ["kcache", "dense"])
def test_a_prompt_given_up_is_replaced_by_the_next(backend):
    """A prefill stopped part-way, or refused at its finish, is replaced by the next prefill
    (a layer stored again starts a new prompt); decode is refused while a prompt is half
    stored, finish_prefill for a prompt some layer has not stored, and a second finish_prefill
    without a prompt."""
    cache = make_cache(backend, tiny_config(), 2, 32, "cpu", torch.float32)
    k = torch.randn(2, HKV, 6, D)  # [B, Hkv, T, D]
    cache.store_prompt(0, k, k, torch.tensor([6, 4], dtype=torch.int32))  # then given up
    with pytest.raises(ValueError, match=r"decode while a prompt is being stored \(layers \[0\] "
                                         r"of"):
        cache.decode(0, torch.randn(2, HQ, D), k[:, :, 0], k[:, :, 0])
    lens = torch.tensor([5, 3], dtype=torch.int32)
    for layer in range(LAYERS - 1):
        cache.store_prompt(layer, k, k, lens)
    with pytest.raises(ValueError, match=rf"storing the prompt of layers \[0, 1\] of {LAYERS}: "
                                         "every layer must store the prompt first"):
        cache.finish_prefill(lens)
    cache.store_prompt(LAYERS - 1, k, k, lens)
    with pytest.raises(ValueError, match="lens reach 7 tokens but the prompt had 6"):
        cache.finish_prefill(torch.tensor([7, 3], dtype=torch.int32))
    for layer in range(LAYERS):  # the same prompt again, after the refusal
        cache.store_prompt(layer, k, k, lens)
    cache.finish_prefill(lens)
    assert cache.seq_lens.tolist() == [5, 3]
    with pytest.raises(ValueError, match=r"layers \[\] of"):
        cache.finish_prefill(lens)


def prefilled_twins(backend, options=None):
    """Two caches of ``backend`` (2 sequences, float32, on the CPU) holding the same prompt of 6
    and 2 tokens."""
    caches = [make_cache(backend, tiny_config(), 2, 32, "cpu", torch.float32, options)
              for _ in range(2)]
    k = torch.randn(2, HKV, 6, D)  # [B, Hkv, T, D]
    lens = torch.tensor([6, 2], dtype=torch.int32)
    for c in caches:
        for layer in range(LAYERS):
            c.store_prompt(layer, k, k, lens)
        c.finish_prefill(lens)
    return caches


@pytest.mark.parametrize("backend", ["kcache", "dense"])
def test_a_refused_decode_step_changes_nothing(backend):
    """A step whose inputs are refused (dtype, device) stores nothing (the mean tail's sum
    included) and does not count for finish_decode; the step then runs as if nothing had
    happened."""
    options = KCacheOptions(tail="mean", sinks=0, window=0) if backend == "kcache" else None
    cache, twin = prefilled_twins(backend, options)
    q, kv = torch.randn(2, HQ, D), torch.randn(2, HKV, D)  # [B, Hq, D], [B, Hkv, D]
    for bad in ({"q": q.double()}, {"k": kv.half()}, {"v": kv.to("meta")}):
        args = {"q": q, "k": kv, "v": kv, **bad}
        name = next(iter(bad))
        with pytest.raises(ValueError, match=rf"{name} must be torch.float32 on cpu \(the "
                                             rf"cache's\), got"):
            cache.decode(0, args["q"], args["k"], args["v"])
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            ValueError, match=r"k must be torch.float32 .* got torch.bfloat16 on cpu \(torch."
                              r"autocast is on and cast it: run the model and build the cache in"):
        cache.decode(0, q, kv.bfloat16(), kv)
    for bad in ({"q": None}, {"k": kv.numpy()}, {"v": kv.tolist()}):  # not tensors
        args = {"q": q, "k": kv, "v": kv, **bad}
        name = next(iter(bad))
        with pytest.raises(TypeError, match=rf"{name} must be a tensor, got"):
            cache.decode(0, args["q"], args["k"], args["v"])
    with pytest.raises(ValueError, match=r"layers \[\] of"):
        cache.finish_decode()
    outs = [cache.decode(layer, q, kv, kv) for layer in range(LAYERS)]
    cache.finish_decode()
    for layer in range(LAYERS):
        torch.testing.assert_close(outs[layer], twin.decode(layer, q, kv, kv), atol=0, rtol=0)
    twin.finish_decode()
    assert cache.seq_lens.tolist() == twin.seq_lens.tolist() == [7, 3]
    step = torch.randn(2, HQ, D), torch.randn(2, HKV, D)
    torch.testing.assert_close(cache.decode(0, step[0], step[1], step[1]),
                               twin.decode(0, step[0], step[1], step[1]), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["kcache", "dense"])
def test_a_step_takes_q_of_any_strides(backend):
    """q [B, Hq, D] with D not contiguous (a transposed view) gives the step of a contiguous q
    (to rounding: the dense matmul sums in another order), in both backends (qk_topn reads D
    contiguous: KCache copies such a q, which it refused after storing the token's rows)."""
    cache, twin = prefilled_twins(backend)
    q, kv = torch.randn(2, HQ, D), torch.randn(2, HKV, D)  # [B, Hq, D], [B, Hkv, D]
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, D], D stride Hq
    assert strided.stride(-1) != 1
    for layer in range(LAYERS):
        torch.testing.assert_close(cache.decode(layer, strided, kv, kv),
                                   twin.decode(layer, q, kv, kv), atol=1e-6, rtol=1e-5)


def test_kcache_takes_v_of_any_strides():
    """V [B, Hkv, T, D] and a step's v [B, Hkv, D] with D not contiguous (transposed views) are
    stored as contiguous ones are: the low-bit tail quantises a contiguous copy (quantize_rows
    reads D contiguous; the store was refused, after the layer had counted as stored)."""
    cache, twin = prefilled_twins("kcache")
    lens = torch.tensor([6, 2], dtype=torch.int32)
    k = torch.randn(2, HKV, 6, D)  # [B, Hkv, T, D]
    v = torch.randn(2, HKV, D, 6).transpose(2, 3)  # [B, Hkv, T, D], D stride T
    store_and_finish(cache, k, v, lens)
    store_and_finish(twin, k, v.contiguous(), lens)
    q, kv = torch.randn(2, HQ, D), torch.randn(2, HKV, D)  # [B, Hq, D], [B, Hkv, D]
    strided = kv.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hkv, D], D stride Hkv
    for layer in range(LAYERS):
        torch.testing.assert_close(cache.decode(layer, q, kv, strided),
                                   twin.decode(layer, q, kv, kv), atol=0, rtol=0)


def store_and_finish(cache, k, v, lens):
    """A prompt's k and v [B, Hkv, T, D] stored for every layer, and finish_prefill(lens)."""
    for layer in range(LAYERS):
        cache.store_prompt(layer, k, v, lens)
    cache.finish_prefill(lens)


def decode_steps(cache, steps, seed, fill=None):
    """``steps`` decode steps of every layer on seeded random q, k, v (k and v all ``fill``
    where given) -> the outputs, [steps, LAYERS, B, Hq, D]."""
    gen = torch.Generator().manual_seed(seed)
    batch = cache.seq_lens.shape[0]

    def rows(heads, given=None):  # [B, heads, D]
        return torch.randn(batch, heads, D, generator=gen) if given is None else \
            torch.full((batch, heads, D), given)
    outs = []
    for _ in range(steps):
        outs.append(torch.stack([cache.decode(layer, rows(HQ), rows(HKV, fill), rows(HKV, fill))
                                 for layer in range(LAYERS)]))  # [LAYERS, B, Hq, D]
        cache.finish_decode()
    return torch.stack(outs)


# Each layer kind that attends over every cached row with a mask (the dense cache, KCache's dense
# layers) or sums V over the prompt (the mean tail), and KCache's default.
MASKED_ROWS = {"dense": ("dense", None),
               "kcache": ("kcache", KCacheOptions()),
               "mean tail": ("kcache", KCacheOptions(tail="mean", sinks=0, window=0)),
               "dense layer": ("kcache", KCacheOptions(dense_layers=(1,)))}


@pytest.mark.parametrize("earlier", ["longer prompt", "steps", "unfinished prompt"])
@pytest.mark.parametrize("variant", MASKED_ROWS)
def test_rows_past_the_lengths_never_reach_the_output(variant, earlier):
    """A prompt's padding rows holding inf (K) and NaN (V), and rows of inf left past the new
    prompt by what the cache held before (a longer prompt; a prompt's decode steps; a prompt
    stored but never finished), change no decode step's output (bit for bit, against a fresh
    cache given the padding as zeros). Dense attention gives a masked row weight 0, and 0 times
    inf or NaN is NaN: the cache stores zeros there (both were NaN for the dense cache and
    layers, and the mean tail's sum of the padding was NaN). The new prompt's steps attend over
    9 rows: the second sequence's rows 3..8 are masked."""
    backend, options = MASKED_ROWS[variant]
    lens = torch.tensor([6, 2], dtype=torch.int32)  # [B]
    k, v = torch.randn(2, HKV, 6, D), torch.randn(2, HKV, 6, D)  # [B, Hkv, T, D]
    padding = (torch.arange(6) >= lens[:, None])[:, None, :, None]  # [B, 1, T, 1]
    fresh, used = (make_cache(backend, tiny_config(), 2, 32, "cpu", torch.float32, options)
                   for _ in range(2))
    store_and_finish(fresh, k.masked_fill(padding, 0), v.masked_fill(padding, 0), lens)
    inf = float("inf")
    longer = torch.full((2, HKV, 12, D), inf)  # [B, Hkv, 12, D]
    if earlier == "longer prompt":
        store_and_finish(used, longer, longer, torch.tensor([12, 9], dtype=torch.int32))
    else:
        short = torch.full((2, HKV, 4, D), inf)  # [B, Hkv, 4, D]
        store_and_finish(used, short, short, torch.tensor([4, 3], dtype=torch.int32))
        if earlier == "steps":
            decode_steps(used, 6, seed=1, fill=inf)  # rows up to 9
        else:
            for layer in range(LAYERS):  # and no finish_prefill
                used.store_prompt(layer, longer, longer, torch.tensor([12, 9], dtype=torch.int32))
    store_and_finish(used, k.masked_fill(padding, inf), v.masked_fill(padding, float("nan")),
                     lens)
    torch.testing.assert_close(decode_steps(used, 3, seed=2), decode_steps(fresh, 3, seed=2),
                               atol=0, rtol=0)


def test_after_a_captured_step_every_prompt_clears_to_the_capacity(monkeypatch):
    """A CUDA graph's replays write rows the host never counts, for every prompt after the
    capture: once a decode step has been captured (simulated: capturing() true for one step),
    each later prompt clears every row past it, up to the capacity (the second prompt after
    the capture had cleared only to the first one's length)."""
    from kcache_ops.caches import lengths as lengths_module
    cache = make_cache("dense", tiny_config(), 2, 32, "cpu", torch.float32)
    lens = torch.tensor([6, 2], dtype=torch.int32)  # [B]
    k = torch.randn(2, HKV, 6, D)  # [B, Hkv, T, D]
    store_and_finish(cache, k, k, lens)
    with monkeypatch.context() as m:
        m.setattr(lengths_module, "capturing", lambda t: True)
        decode_steps(cache, 1, seed=1)
    for _ in range(2):  # two prompts after the capture
        for buffer in cache.k + cache.v:  # [B, Hkv, S, D]: what replays would have written
            buffer[:, :, 10:].fill_(float("inf"))
        store_and_finish(cache, k, k, lens)
        assert all(buffer[:, :, 6:].eq(0).all() for buffer in cache.k + cache.v)


@pytest.mark.parametrize("backend, options", [("dense", None),
                                              ("kcache", KCacheOptions(dense_layers=(0, 1)))])
def test_after_a_captured_step_eager_steps_attend_over_every_key(backend, options, monkeypatch):
    """Replays of a captured decode step advance the lengths on the device alone, so the host's
    longest lags them: an eager step after them (simulated: a step whose count the host then
    forgets) attends over every key the device's lengths cover, not the host's longest + 1 (the
    dense attention read that many keys and dropped the replays' rows)."""
    from kcache_ops.caches import lengths as lengths_module
    graphed, eager = prefilled_twins(backend, options)
    with monkeypatch.context() as m:
        m.setattr(lengths_module, "capturing", lambda t: True)
        decode_steps(graphed, 1, seed=1)  # the capture
    decode_steps(eager, 1, seed=1)
    for seed in (2, 3):  # two replays: the host does not count them
        decode_steps(graphed, 1, seed=seed)
        graphed.lengths.longest -= 1
        decode_steps(eager, 1, seed=seed)
    assert torch.equal(graphed.seq_lens, eager.seq_lens)
    torch.testing.assert_close(decode_steps(graphed, 1, seed=4), decode_steps(eager, 1, seed=4),
                               atol=1e-5, rtol=1e-5)


def test_a_store_that_fails_inside_leaves_its_layer_unstored(monkeypatch):
    """A layer's store that fails inside the cache (the tail's, made to fail) does not count as
    stored: the prompt cannot be finished without storing that layer again (it was finished
    with V never written), and decode is refused until it is, the prompt before being partly
    overwritten."""
    cache, _ = prefilled_twins("kcache")
    lens = torch.tensor([5, 3], dtype=torch.int32)
    k = torch.randn(2, HKV, 5, D)  # [B, Hkv, T, D]

    def fail(v, lens):
        raise RuntimeError("the tail's store failed")

    monkeypatch.setattr(cache.tails[0], "store_prompt", fail)
    with pytest.raises(RuntimeError, match="the tail's store failed"):
        cache.store_prompt(0, k, k, lens)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"decode while a prompt is being stored \(layers \[\] "):
        cache.decode(0, torch.randn(2, HQ, D), k[:, :, 0], k[:, :, 0])
    for layer in range(1, LAYERS):
        cache.store_prompt(layer, k, k, lens)
    with pytest.raises(ValueError, match=rf"layers \[1, 2\] of {LAYERS}: every layer must"):
        cache.finish_prefill(lens)
    cache.store_prompt(0, k, k, lens)
    cache.finish_prefill(lens)
    assert cache.seq_lens.tolist() == [5, 3]


@pytest.mark.parametrize("backend", ["kcache", "dense"])
def test_prompt_arguments_that_are_not_tensors(backend):
    """A prompt's q, k, v or lens given as None, a NumPy array or a list is refused by name (a
    TypeError, not an AttributeError from inside the cache)."""
    cache = make_cache(backend, tiny_config(), 2, 32, "cpu", torch.float32)
    k = torch.randn(2, HKV, 6, D)  # [B, Hkv, T, D]
    q = torch.randn(2, HQ, 6, D)  # [B, Hq, T, D]
    lens = torch.tensor([6, 4], dtype=torch.int32)
    for name, bad in (("lens", [6, 4]), ("lens", lens.numpy()), ("k", None), ("v", k.numpy())):
        args = {"k": k, "v": k, "lens": lens, name: bad}
        with pytest.raises(TypeError, match=rf"{name} must be a tensor, got"):
            cache.store_prompt(0, args["k"], args["v"], args["lens"])
    with pytest.raises(TypeError, match="q must be a tensor, got None"):
        cache.prefill(0, None, k, k, lens)
    for layer in range(LAYERS):
        cache.store_prompt(layer, k, k, lens)
    with pytest.raises(TypeError, match="lens must be a tensor, got an object of type list"):
        cache.finish_prefill([6, 4])
    cache.finish_prefill(lens)


def tensors_held(obj, seen=None):
    """Every tensor reachable from obj through the attributes, lists, tuples and dicts of
    kcache_ops' own objects (a cache and its tails, hot rows, pools, lengths)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif type(obj).__module__.startswith("kcache_ops") and hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return []
    return [t for child in children for t in tensors_held(child, seen)]


@pytest.mark.parametrize("kind,tail,dense_layers,reuse", [
    ("kcache", "none", (), 0), ("kcache", "mean", (), 0), ("kcache", "int2", (), 0),
    ("kcache", "int2", (1,), 16), ("dense", "none", (), 0)])
def test_inputs_that_require_grad(kind, tail, dense_layers, reuse):
    """A model run outside no_grad (a transformers model's weights require grad) hands the cache
    q, k, v that require grad: prefill and decode run (the mean tail's out= add raised), as
    without grad, none of the cache's own tensors (K, host V, the tail's copies, the hot rows,
    the pool, dense layers' V) is part of an autograd graph, and a decode step's output carries
    no gradient (it had one through q alone on dense layers)."""
    hot = {"sinks": 0, "window": 0} if tail == "mean" else {}
    options = (KCacheOptions(tail=tail, topn=4, dense_layers=dense_layers, reuse=reuse, **hot)
               if kind == "kcache" else None)
    cache, twin = (make_cache(kind, tiny_config(), 2, 32, "cpu", torch.float32, options)
                   for _ in range(2))
    k, v = torch.randn(2, HKV, 9, D), torch.randn(2, HKV, 9, D)  # [B, Hkv, T, D]
    q = torch.randn(2, HQ, 9, D)  # [B, Hq, T, D]
    lens = torch.tensor([9, 5], dtype=torch.int32)
    step = torch.randn(2, HQ, D), torch.randn(2, HKV, D), torch.randn(2, HKV, D)
    outs = []
    for c, grad in ((cache, True), (twin, False)):
        for layer in range(LAYERS):
            c.prefill(layer, *(t.clone().requires_grad_(grad) for t in (q, k, v)), lens)
        c.finish_prefill(lens)
        outs.append([c.decode(layer, *(t.clone().requires_grad_(grad) for t in step))
                     for layer in range(LAYERS)])
        c.finish_decode()
    for out, expected in zip(*outs):
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        assert not out.requires_grad  # no gradient, rather than one through q alone
    held = tensors_held(cache)
    assert len(held) >= 2 * LAYERS
    assert not [t.shape for t in held if t.requires_grad or t.grad_fn is not None]


@pytest.mark.parametrize("tail", ["none", "mean", "int2"])
def test_a_step_run_again_counts_its_token_once(tail):
    """A layer's decode step run a second time in one step (after a failure inside an op, or on
    purpose) stores its token once: the mean tail's sum, the low-bit copy and the hot rows end as
    if only the second run had happened, to the bit."""
    hot = {"sinks": 0, "window": 0} if tail == "mean" else {}  # the mean tail takes no hot rows
    options = KCacheOptions(tail=tail, topn=4, **hot)
    cache, twin = (make_cache("kcache", tiny_config(), 2, 32, "cpu", torch.float32, options)
                   for _ in range(2))
    k, v = torch.randn(2, HKV, 9, D), torch.randn(2, HKV, 9, D)  # [B, Hkv, T, D]
    lens = torch.tensor([9, 5], dtype=torch.int32)
    for c in (cache, twin):
        for layer in range(LAYERS):
            c.store_prompt(layer, k, v, lens)
        c.finish_prefill(lens)
    q, kv, first = torch.randn(2, HQ, D), torch.randn(2, HKV, D), torch.randn(2, HKV, D)
    for layer in range(LAYERS):
        cache.decode(layer, q, kv, first)  # the run given up
        torch.testing.assert_close(cache.decode(layer, q, kv, kv), twin.decode(layer, q, kv, kv),
                                   atol=0, rtol=0)
    cache.finish_decode()
    twin.finish_decode()
    for _ in range(2):  # the steps after it: the token counted once
        q, kv = torch.randn(2, HQ, D), torch.randn(2, HKV, D)
        for layer in range(LAYERS):
            torch.testing.assert_close(cache.decode(layer, q, kv, kv),
                                       twin.decode(layer, q, kv, kv), atol=0, rtol=0)
        cache.finish_decode()
        twin.finish_decode()


@pytest.mark.parametrize("options", [KCacheOptions(), KCacheOptions(tail="none"),
                                     KCacheOptions.paper_literal()],
                         ids=["default", "none", "paper"])
def test_decode_without_a_prompt_is_exact(options):
    """Decode on a cache that has had no prefill is decode after an empty prompt: its first token
    attends to itself (the hot rows' slots start empty, the first position in the first slot)."""
    cache = KCache(tiny_config(), 2, 8, "cpu", torch.float32, options)
    run = Run(cache, "cpu", torch.float32)
    keys, values = [], []  # each [B, Hkv, D] per step
    for _ in range(3):
        q, k, v = run.rand(2, HQ, D), run.rand(2, HKV, D), run.rand(2, HKV, D)
        out = cache.decode(0, q, k, v)  # [B, Hq, D]
        for layer in range(1, LAYERS):
            cache.decode(layer, q, k, v)
        cache.finish_decode()
        keys.append(k)
        values.append(v)
        for b in range(2):
            want = exact_attention(q[b], torch.stack(keys, 2)[b], torch.stack(values, 2)[b])
            torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["kcache", "dense"])
def test_prompt_batch_must_match_the_cache(backend):
    """A prompt of batch 1 for a cache of 3 sequences is refused (torch would broadcast it into
    every sequence), and so are lens of another shape or dtype, or on the meta device."""
    cache = make_cache(backend, tiny_config(), 3, 32, "cpu", torch.float32)
    k = torch.randn(1, HKV, 5, D)  # [1, Hkv, T, D]
    with pytest.raises(ValueError, match=rf"k must have shape \[3, {HKV}, 5, {D}\], got "
                                         rf"\[1, {HKV}, 5, {D}\]"):
        cache.store_prompt(0, k, k, torch.tensor([5], dtype=torch.int32))
    for layer in range(LAYERS):
        cache.store_prompt(layer, k.expand(3, -1, -1, -1), k.expand(3, -1, -1, -1),
                           torch.full((3,), 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lens must have shape \[3\].*got \[1\]"):
        cache.finish_prefill(torch.tensor([5], dtype=torch.int32))
    with pytest.raises(ValueError, match="lens must be an integer tensor, got torch.float32"):
        cache.finish_prefill(torch.tensor([5.0, 2.5, 3.0]))
    with pytest.raises(ValueError, match="lens must be an integer tensor, got torch.bool"):
        cache.finish_prefill(torch.ones(3, dtype=torch.bool))  # a mask, not lengths
    with pytest.raises(ValueError, match="lens must hold values, got a tensor on the meta device"):
        cache.finish_prefill(torch.full((3,), 5, dtype=torch.int32, device="meta"))


@pytest.mark.parametrize("backend", ["kcache", "dense"])
def test_finish_prefill_takes_the_lens_the_prompt_was_stored_with(backend):
    """The tails and hot rows keep what the prompt's lens said was valid: other lens at
    finish_prefill, or layers stored with different lens, are refused (found at its one host
    sync), not a silently wrong cache, and so are layers stored with prompts of other lengths;
    the buffer the caller passed may change after the store."""
    cache = make_cache(backend, tiny_config(), 2, 32, "cpu", torch.float32)
    k = torch.randn(2, HKV, 5, D)  # [B, Hkv, T, D]
    stored = torch.tensor([5, 3], dtype=torch.int32)
    buffer = stored.clone()
    for layer in range(LAYERS):
        cache.store_prompt(layer, k, k, buffer)
    buffer.copy_(torch.tensor([5, 2]))  # the cache kept a copy
    with pytest.raises(ValueError, match=r"lens \[5, 2\] differ from the lens the prompt was "
                                         r"stored with, \[5, 3\]"):
        cache.finish_prefill(torch.tensor([5, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lens must have shape \[2\] .*got \[3\]"):
        cache.store_prompt(0, k, k, torch.tensor([5, 3, 1], dtype=torch.int32))
    cache.finish_prefill(stored.clone())
    assert cache.seq_lens.tolist() == [5, 3]
    other = make_cache(backend, tiny_config(), 2, 32, "cpu", torch.float32)
    for layer in range(LAYERS):  # the layers disagree: whatever finish_prefill gets is refused
        other.store_prompt(layer, k, k, stored if layer == 0 else torch.tensor([5, 2]).int())
    for given in ([5, 2], [5, 3]):  # the later layer's lens, and the first's
        with pytest.raises(ValueError, match="every layer must be stored with the same lens"):
            other.finish_prefill(torch.tensor(given, dtype=torch.int32))
    longer = torch.randn(2, HKV, 8, D)  # a longer prompt at layer 1: its rows 5..7 in layer 0
    other.store_prompt(0, k, k, stored)  # would be unstored, and lens [8, 3] accepted
    with pytest.raises(ValueError, match="layer 1's prompt has 8 tokens, but layers \\[0\\] "
                                         "stored 5: every layer must store the same prompt"):
        other.store_prompt(1, longer, longer, torch.tensor([8, 3]).int())


@pytest.mark.parametrize("backend", ["kcache", "dense"])
def test_layer_inputs_must_match_the_cache(backend):
    """Every prefill and decode step checks its layer index and the exact shapes of q, k and v
    (batch, heads, head dim, one T), before it writes anything: a size 1 would broadcast into
    every sequence or head, another KV-head count would group the heads otherwise. finish_decode
    waits for every layer's decode step."""
    B, T = 2, 5
    cache = make_cache(backend, tiny_config(), B, 32, "cpu", torch.float32)
    q, k = torch.randn(B, HQ, T, D), torch.randn(B, HKV, T, D)  # [B, Hq, T, D], [B, Hkv, T, D]
    lens = torch.full((B,), T, dtype=torch.int32)
    bad_prompts = [(q, k[:, :1], k[:, :1]), (q[:, :, :4], k, k), (q[:, :HKV], k, k),
                   (q, k, k[..., :D // 2])]
    for bad in bad_prompts:
        with pytest.raises(ValueError, match="must have shape"):
            cache.prefill(0, *bad, lens)
    for layer in (-1, LAYERS, 1.0, True):
        with pytest.raises(IndexError, match=rf"layer must be an int in \[0, {LAYERS}\), got"):
            cache.prefill(layer, q, k, k, lens)
    for layer in range(LAYERS):
        cache.prefill(layer, q, k, k, lens)
    cache.finish_prefill(lens)
    before = [t.clone() for t in cache.k]
    q1, k1 = torch.randn(B, HQ, D), torch.randn(B, HKV, D)  # [B, Hq, D], [B, Hkv, D]
    for bad in [(q1, k1[:1], k1), (q1, k1, k1[0]), (q1[:, :1], k1, k1), (q1, k1[:, None], k1)]:
        with pytest.raises(ValueError, match="must have shape"):
            cache.decode(0, *bad)
    with pytest.raises(IndexError, match=r"got -1"):
        cache.decode(-1, q1, k1, k1)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k)), "nothing written"
    with pytest.raises(ValueError, match=r"finish_decode after the decode step of layers \[\] "
                                         rf"of {LAYERS}: every layer must decode the step first"):
        cache.finish_decode()  # no layer stored the step's token
    cache.decode(0, q1, k1, k1)
    with pytest.raises(ValueError, match=r"layers \[0\] of"):
        cache.finish_decode()
    for layer in range(1, LAYERS):
        cache.decode(layer, q1, k1, k1)
    cache.finish_decode()
    assert cache.seq_lens.tolist() == [T + 1] * B


def test_attention_mass(device):
    """Off by default (NaN: nothing recorded); 1 at N >= L; at N = 2 with top_p 0.3, the mean
    over sequences, heads and steps of the mass and the rows each step's top N (as the
    reference selects it) hold; dense layers report 1 and 0 rows."""
    full = Run(make(device, topn=64), device, torch.float32)
    full.prefill()
    full.step()
    assert torch.isnan(full.cache.attention_mass()).all()
    full.cache.record_mass = True
    for _ in range(3):
        full.step()
    torch.testing.assert_close(full.cache.attention_mass(), torch.ones(LAYERS))
    sparse = Run(make(device, topn=2, dense_layers=[2], top_p=0.3), device, torch.float32)
    sparse.cache.record_mass = True
    sparse.prefill()
    want_mass, want_rows = torch.zeros(LAYERS), torch.zeros(LAYERS)
    for _ in range(2):
        for layer, (q, _) in enumerate(sparse.step()):
            for b in range(len(LENS)):  # the step's top N by the reference, its history
                k = sparse.hist_k[layer][b][None]  # [1, Hkv, L, D]
                lens = torch.tensor([k.shape[2]], dtype=torch.int32)
                s, idx, lse = reference.qk_topn(q[b][None].cpu(), k, lens, 2, top_p=0.3)
                want_mass[layer] += torch.exp(s - lse[..., None]).sum() / (2 * len(LENS) * HQ)
                want_rows[layer] += (idx >= 0).sum() / (2 * len(LENS) * HQ)
    mass, rows = sparse.cache.attention_mass(), sparse.cache.rows_read()  # [layers] each
    assert ((mass[:2] > 0) & (mass[:2] < 1)).all() and mass[2] == 1 and rows[2] == 0
    torch.testing.assert_close(mass[:2], want_mass[:2])  # the mean over sequences, heads, steps
    torch.testing.assert_close(rows[:2], want_rows[:2])
    assert (rows[:2] < 2).all()  # top_p cut some
    assert sparse.cache.reuse_hit_rate().isnan().all()  # no reuse: NaN, as documented


def test_a_step_left_unfinished_is_not_recorded(device):
    """A recorded step that a new prompt abandons (some layers decoded, no finish_decode) adds
    nothing to the statistics: the next prompt's unrecorded step leaves them NaN."""
    run = Run(make(device, topn=2), device, torch.float32)
    run.prefill()
    run.cache.record_mass = True
    q, k = run.rand(len(LENS), HQ, D), run.rand(len(LENS), HKV, D)  # [B, Hq, D], [B, Hkv, D]
    run.cache.decode(0, q, k, k)  # layer 0 of a step, never finished
    run.cache.record_mass = False
    run.prefill()
    run.step()
    assert run.cache.attention_mass().isnan().all() and run.cache.rows_read().isnan().all()


def test_dense_attention_over_every_key_equals_the_first_lens(dtype):
    """A dense layer's step attends over the cache's every key while a CUDA graph is captured
    (its width cannot follow the lengths): the keys past lens[b], stale rows of an earlier
    prompt here, get weight 0, and the output is the one over the first lens[b] keys."""
    B, S = len(LENS), 40
    q = torch.randn(B, HQ, D).to(dtype)  # [B, Hq, D]
    keys, values = (torch.randn(B, HKV, S, D).to(dtype) for _ in range(2))  # [B, Hkv, S, D]
    lens = torch.tensor(LENS, dtype=torch.int32)  # [B]
    width = max(LENS)
    full = exact_decode_attention(q, keys, values, lens)  # [B, Hq, D]
    torch.testing.assert_close(full, exact_decode_attention(q, keys[:, :, :width],
                                                            values[:, :, :width], lens),
                               atol=TOL[dtype], rtol=TOL[dtype])
    for b, n in enumerate(LENS):
        want = exact_attention(q[b], keys[b, :, :n], values[b, :, :n])  # [Hq, D] float64
        torch.testing.assert_close(full[b].double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_hand_off_releases_device_v():
    """After prefill the cache holds no device V: the caller's V returns to the allocator once its
    copy is done, and host V (pinned) holds exactly what was handed off."""
    B, T = len(LENS), max(LENS)
    lens = torch.tensor(LENS, dtype=torch.int32, device="cuda")  # [B]

    def prefill(cache):
        """A prefill of random inputs -> each layer's V, on the CPU."""
        handed = []
        for layer in range(LAYERS):
            v_cpu = torch.randn(B, HKV, T, D)  # [B, Hkv, T, D]
            q = torch.randn(B, HQ, T, D, device="cuda")  # [B, Hq, T, D]
            k = torch.randn(B, HKV, T, D, device="cuda")  # [B, Hkv, T, D]
            cache.prefill(layer, q, k, v_cpu.cuda(), lens)
            handed.append(v_cpu)
        cache.finish_prefill(lens)
        return handed

    prefill(make("cuda", topn=64))  # what a first prefill allocates for good (cuBLAS's workspace)
    cache = make("cuda", topn=64)
    assert all(v.is_pinned() for v in cache.v_host.values())
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    handed = prefill(cache)
    torch.cuda.synchronize()
    probe = torch.empty(1, device="cuda")  # one more allocation, after V's blocks were freed
    assert torch.cuda.memory_allocated() == base + 512  # the probe's block, rounded to 512 bytes
    for layer, v_cpu in enumerate(handed):
        assert torch.equal(cache.v_host[layer][:, :, :T], v_cpu)


def test_store_prompt_then_decode_equals_prefill(device):
    """The store half of prefill (used to fork one prefill into many caches) leaves the same
    state: both caches decode identically."""
    prefilled, stored = make(device, topn=4), make(device, topn=4)
    run = Run(prefilled, device, torch.float32)
    run.prefill()
    lens = torch.tensor(LENS, dtype=torch.int32, device=device)  # [B]
    for layer in range(LAYERS):
        k = torch.stack([torch.nn.functional.pad(h, (0, 0, 0, max(LENS) - h.shape[1]))
                         for h in run.hist_k[layer]]).to(device)  # [B, Hkv, T, D]
        v = torch.stack([torch.nn.functional.pad(h, (0, 0, 0, max(LENS) - h.shape[1]))
                         for h in run.hist_v[layer]]).to(device)  # [B, Hkv, T, D]
        stored.store_prompt(layer, k, v, lens)
    stored.finish_prefill(lens)
    for layer, (q, out) in enumerate(run.step()):
        k, v = run.hist_k[layer], run.hist_v[layer]
        new_k = torch.stack([h[:, -1] for h in k]).to(device)  # [B, Hkv, D]
        new_v = torch.stack([h[:, -1] for h in v]).to(device)  # [B, Hkv, D]
        torch.testing.assert_close(stored.decode(layer, q, new_k, new_v), out, atol=0, rtol=0)


def test_step_tensors_keep_their_addresses(device):
    """What every layer of a decode step shares — attend_lens, positions, the hot slots — is
    computed once per step, in place: the same tensors, each step's values (a CUDA graph of
    whole steps reads them at the addresses it captured)."""
    run = Run(KCache(tiny_config(), len(LENS), 32, device, torch.float32, KCacheOptions(
        sinks=2, window=3)), device, torch.float32)
    lengths, cache = run.cache.lengths, run.cache
    slots = cache.hot_slots
    tensors = (lengths.seq_lens, lengths.attend_lens, lengths.positions, slots.slot, slots.held,
               slots.gather, slots.empty)
    addresses = [t.data_ptr() for t in tensors]
    run.prefill()
    for step in range(STEPS):
        want = torch.tensor(LENS) + step
        assert lengths.positions.tolist() == want.tolist()
        assert lengths.attend_lens.tolist() == (want + 1).tolist()
        assert slots.slot.tolist() == [p if p < 2 else 2 + (p - 2) % 3 for p in want.tolist()]
        run.step()
    assert [t.data_ptr() for t in tensors] == addresses


def test_no_host_memory_report_checks_no_host_memory(monkeypatch):
    """Where the machine does not report MemAvailable (no /proc/meminfo, as on macOS) the host
    tensors are not checked: the cache is built (comparing with None was a TypeError)."""
    monkeypatch.setattr(memory, "host_bytes_available", lambda: None)
    memory.check_memory("KCache", (len(LENS), HKV, 8, D), torch.float32, 2 * LAYERS, "cpu", 0,
                        beside=1)
    assert KCache(tiny_config(), len(LENS), 8, "cpu", torch.float32).capacity == 8


def test_the_device_check_on_any_machine(monkeypatch):
    """On a CUDA device (its memory faked, so that this runs without one) host RAM holds the
    host tensors alone and the device its tensors and the bytes beside them, measured against
    the device named (cuda:1, not the first GPU): each may be filled to the byte, and one byte
    more is refused naming what it counts."""
    shape = (len(LENS), HKV, torch.randint(8, 65, ()).item(), D)
    per_tensor = 2 * math.prod(shape)  # bfloat16
    host, dev, beside = torch.randint(1, 5, (2,)).tolist() + [torch.randint(1, 1000, ()).item()]
    monkeypatch.setattr(memory, "host_bytes_available", lambda: host * per_tensor)
    totals = {0: 2 ** 60, 1: dev * per_tensor + beside}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(
        total_memory=totals[d if isinstance(d, int) else d.index]))
    memory.check_memory("KCache", shape, torch.bfloat16, host, "cuda:1", dev, beside)
    what = rf"KCache: {dev} cache tensors of shape \[{', '.join(map(str, shape))}\] torch.bfloat16"
    with pytest.raises(MemoryError, match=rf"^{what} and {beside + 1} bytes beside them on cuda:1 "
                                          rf"need {totals[1] + 1} bytes, more than the "
                                          rf"{totals[1]} bytes the device has"):
        memory.check_memory("KCache", shape, torch.bfloat16, host, "cuda:1", dev, beside + 1)
    what = what.replace(f"{dev} cache", f"{host + 1} cache")
    with pytest.raises(MemoryError, match=rf"^{what} in host RAM need {(host + 1) * per_tensor} "
                                          rf"bytes, more than the {host * per_tensor} bytes"):
        memory.check_memory("KCache", shape, torch.bfloat16, host + 1, "cuda:1", dev, beside)
