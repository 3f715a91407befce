"""KCache decode steps captured in CUDA graphs: the ops alone (qk_topn + sparse_attn_v) replayed
with new inputs copied into their static buffers, and a default KCache layer step (two streams)
replayed against its eager output. The ops launch on the current stream, allocate through the
caching allocator and never synchronise with the host while capturing."""
import pytest
import torch

import kcache_ops
from kcache_ops import reference
from kcache_ops.caches import KCache, KCacheOptions
from kcache_ops.caches import tail as tail_module
from kcache_ops.model.config import LlamaConfig
from cuda_checks import capture_graph, requires_cuda

pytestmark = requires_cuda


# conftest's poisoned outputs (NaN) for the ops alone: the fills of their outputs are kernels on
# the capturing stream, captured and replayed before each op (as in test_lowbit_tail's graph
# test). Not for the caches' steps below: torch's deterministic mode, which makes the fills, also
# swaps algorithms of the torch ops they run (index_put_ by sort, with host-read range checks in
# some torch versions), which under capture would fail or change what is captured, not the ops.
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("group_select", [False, True])
@pytest.mark.parametrize("renormalize", [True, False])
def test_decode_step_graph_replay(group_select, renormalize):
    B, Hq, Hkv, S, D, n = 4, 32, 8, 4096, 128, 64
    dtype = torch.bfloat16
    q = torch.empty(B, Hq, D, device="cuda", dtype=dtype)       # static inputs
    k = torch.empty(B, Hkv, S, D, device="cuda", dtype=dtype)
    lens = torch.empty(B, device="cuda", dtype=torch.int32)
    v = kcache_ops.alloc_host((B, Hkv, S, D), dtype)             # host RAM, read in place
    q.normal_()
    k.normal_()
    v.normal_()
    lens.copy_(torch.tensor([S, 3000, 17, 0]))

    def step():
        scores, idx, lse = kcache_ops.qk_topn(q, k, lens, n, None, group_select)
        return kcache_ops.sparse_attn_v(scores, idx, v, lse, renormalize), idx

    graph, (out, idx) = capture_graph(step)

    for trial in range(3):
        q.copy_(torch.randn(B, Hq, D, device="cuda", dtype=dtype))
        k.copy_(torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype))
        v.copy_(torch.randn(B, Hkv, S, D, dtype=dtype))
        lens.copy_(torch.randint(0, S + 1, (B,), dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        want_scores, want_idx, want_lse = reference.qk_topn(q, k, lens, n, None, group_select)
        want = reference.sparse_attn_v(want_scores.cpu(), want_idx.cpu(), v, want_lse.cpu(),
                                       renormalize)
        # same selections up to near-ties; the outputs agree to bf16 rounding
        agree = (idx == want_idx).float().mean().item()
        assert agree > 0.99, f"trial {trial}: only {agree:.3f} of the indices agree"
        torch.testing.assert_close(out.cpu().float(), want.float(), atol=2e-2, rtol=2e-2)


def test_default_layer_step_graph_replay(monkeypatch):
    """KCache.decode with the default options (hot rows, the int2 tail, whose sparse_attn_v runs
    on the cache's side stream beside lowbit_tail) captured in a CUDA graph: the fork and the join
    are captured as graph branches, and replays with new inputs copied into the static ones give
    what the same step gives eagerly on a twin cache."""
    B, Hq, Hkv, S, D = 3, 8, 2, 3000, 64
    config = LlamaConfig(vocab_size=16, hidden_size=Hq * D, intermediate_size=32, num_layers=1,
                         num_heads=Hq, num_kv_heads=Hkv, head_dim=D)
    lens = torch.tensor([2900, 1500, 300], dtype=torch.int32, device="cuda")  # [B]
    T = int(lens.max())
    prompt_k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    prompt_v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    caches = []
    for _ in range(2):  # the graph's, and the eager twin
        cache = KCache(config, B, S, "cuda", torch.bfloat16, KCacheOptions())
        cache.store_prompt(0, prompt_k, prompt_v, lens)
        cache.finish_prefill(lens)
        caches.append(cache)
    graphed, eager = caches

    streams = []  # where the tail's sparse_attn_v ran
    real = tail_module.sparse_attn_v

    def spy(*args, **kwargs):
        streams.append(torch.cuda.current_stream())
        return real(*args, **kwargs)

    monkeypatch.setattr(tail_module, "sparse_attn_v", spy)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)   # static inputs
    k = torch.randn(B, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, D, device="cuda", dtype=torch.bfloat16)
    graph, out = capture_graph(lambda: graphed.decode(0, q, k, v))  # no finish_decode: one step
    assert streams and all(s == graphed._side.stream for s in streams)
    for _ in range(3):
        q.normal_()
        k.normal_()
        v.normal_()
        graph.replay()
        want = eager.decode(0, q, k, v)  # the same position, the same new token
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, atol=0, rtol=0)


# KCacheOptions beside the defaults whose step a graph captures: each tail, group_select, no
# top_p cut, the pool of reused rows, the paper's setting (all with layer 1 dense)
GRAPH_OPTIONS = {"": {}, "reuse": dict(reuse=512), "no_tail": dict(tail="none"),
                 "mean": dict(tail="mean", sinks=0, window=0), "int4": dict(tail="int4"),
                 "group": dict(group_select=True, reuse=512), "top_p_1": dict(top_p=1.0),
                 "paper": dict(tail="none", top_p=1.0, sinks=0, window=0)}


@pytest.mark.parametrize("options", GRAPH_OPTIONS.values(), ids=GRAPH_OPTIONS)
@pytest.mark.parametrize("lens, S", [([2500, 700], 2600), ([40, 24], 128)],
                         ids=["long", "short"])
def test_default_decode_steps_graph_replay(lens, S, options):
    """Whole decode steps captured once — a default layer's decode, a dense layer's and
    finish_decode — and replayed step after step: the lengths, the positions and the hot slots
    are updated in place, so each replay appends at the next position and equals the eager
    twin's step; the dense layer, captured, attends over every key (its width cannot follow the
    lengths); the recorded attention mass counts every replay. (The capacity check stays on the
    host: replays past the capacity are the caller's to prevent.) The short prompts make the
    dense layer's check sharp: a width frozen at the capture would leave out up to 4 of some 40
    keys, far outside the tolerance. With ``reuse``, the step count that orders the pool's slots
    is a device tensor too, and the rows found in the pool are counted as the twin counts them.
    The same for each tail, group_select, no top_p cut and the paper's setting (GRAPH_OPTIONS)."""
    B, Hq, Hkv, D = 2, 8, 2, 128
    config = LlamaConfig(vocab_size=16, hidden_size=Hq * D, intermediate_size=32, num_layers=2,
                         num_heads=Hq, num_kv_heads=Hkv, head_dim=D)
    lens = torch.tensor(lens, dtype=torch.int32, device="cuda")  # [B]
    T = int(lens.max())
    prompt_k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    prompt_v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    graphed, eager = (KCache(config, B, S, "cuda", torch.bfloat16,
                             KCacheOptions(dense_layers=(1,), **options)) for _ in range(2))
    for cache in (graphed, eager):
        for layer in range(2):
            cache.store_prompt(layer, prompt_k, prompt_v, lens)
        cache.finish_prefill(lens)
        cache.record_mass = True
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)   # static inputs
    k = torch.randn(B, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, D, device="cuda", dtype=torch.bfloat16)

    def step(cache):
        outs = torch.stack([cache.decode(layer, q, k, v) for layer in range(2)])  # [2, B, Hq, D]
        cache.finish_decode()
        return outs

    step(eager)  # the step capture_graph's warm-up runs on `graphed`
    graph, out = capture_graph(lambda: step(graphed))
    for _ in range(4):
        q.normal_()
        k.normal_()
        v.normal_()
        graph.replay()
        want = step(eager)
        torch.cuda.synchronize()
        torch.testing.assert_close(out[0], want[0], atol=0, rtol=0)  # the KCache layer
        # the dense layer over every key against the first longest + 1: SDPA may sum differently
        torch.testing.assert_close(out[1], want[1], atol=2e-2, rtol=2e-2)
    assert torch.equal(graphed.seq_lens, eager.seq_lens)
    assert torch.equal(graphed.seq_lens.cpu(), lens.cpu() + 5)  # the warm-up and 4 replays
    torch.testing.assert_close(graphed.attention_mass(), eager.attention_mass(), atol=0, rtol=0)
    torch.testing.assert_close(graphed.reuse_hit_rate(), eager.reuse_hit_rate(), atol=0, rtol=0,
                               equal_nan=True)


@requires_cuda
@pytest.mark.parametrize("backend", ["dense", "kcache"])
def test_model_decode_steps_graph_replay(backend):
    """What the throughput bench times (capture_graph is its kcache_ops.devices.graphed): a
    model's whole decode step, every layer, finish_decode and the float32 logits, captured once
    and replayed with new tokens each time, gives its eager twin's logits and lengths (an eager
    step of ~50 small kernels a layer times the host that launches them). The captured dense
    cache attends over its whole capacity, masked, so its sums may round differently."""
    from kcache_ops.caches import make_cache
    from kcache_ops.throughput.shapes import SHAPES, random_model
    config = SHAPES["tiny"]
    model = random_model(config, torch.device("cuda"), torch.bfloat16)
    lens = torch.tensor([100, 57, 81], dtype=torch.int32, device="cuda")  # [B]
    B, T, steps = len(lens), int(lens.max()), 4
    prompt = torch.randint(0, config.vocab_size, (B, T), device="cuda")  # [B, T]
    graphed_cache, eager = (make_cache(backend, config, B, T + steps + 2, model.device,
                                       torch.bfloat16, KCacheOptions() if backend == "kcache"
                                       else None) for _ in range(2))
    token = torch.randint(0, config.vocab_size, (B,), device="cuda")  # [B], the static input
    with torch.inference_mode():
        for cache in (graphed_cache, eager):
            model.prefill(prompt, lens, cache)
        graph, logits = capture_graph(lambda: model.decode(token, graphed_cache))  # [B, V]
        model.decode(token, eager)  # the twin of capture_graph's warm-up
        for _ in range(steps):
            token.random_(0, config.vocab_size)
            graph.replay()
            want = model.decode(token, eager)
            torch.testing.assert_close(logits, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(graphed_cache.seq_lens, eager.seq_lens)
    assert torch.equal(eager.seq_lens.cpu(), lens.cpu() + steps + 1)

