"""Hot rows (KCacheOptions.sinks / window): V of the first sinks and the last window positions kept
on the device and attended exactly, the top N chosen among the other positions, the tail (if any)
taking the rest. Each decode step is checked against the reference ops over the selection the
design defines, built here by loops over the positions."""
import re
from dataclasses import replace

import pytest
import torch

from kcache_ops import reference
from kcache_ops.caches import KCache, KCacheOptions, check_kcache, sequence_bytes
from kcache_ops.caches.hot import HotSlots
from kcache_ops.model.config import LlamaConfig

from test_cache import HKV, HQ, LAYERS, LENS, STEPS, D, Run, exact_attention, make, tiny_config

SINKS, WINDOW, TOPN = 2, 3, 3  # the ring of 3 wraps twice over the decode steps


def hot_positions(length, sinks, window):
    """The hot positions of a sequence of ``length`` tokens."""
    return {j for j in range(length) if j < sinks or j >= length - window}


@pytest.mark.parametrize("sinks, window", [(2, 3), (0, 4), (3, 0), (1, 1)])
def test_slots_hold_the_first_and_last_positions(sinks, window):
    """Slot j holds a hot position, every hot position has a slot, whatever the length."""
    hot = HotSlots(sinks, window, 1, 1, "cpu")
    for length in range(0, 20):
        pos, valid = hot.positions(torch.tensor([length], dtype=torch.int32))  # [1, H] each
        held = [p for p, ok in zip(pos[0].tolist(), valid[0].tolist()) if ok]
        assert len(held) == len(set(held)) and set(held) == hot_positions(length, sinks, window)
        for j, p in enumerate(held):
            if j < sinks:
                assert p == j
            else:
                assert (p - sinks) % window == j - sinks


@pytest.mark.parametrize("sinks, window", [(2, 3), (0, 4), (3, 0)])
def test_slots_follow_the_lengths(device, sinks, window):
    """``held``, which a decode step reads instead of recomputing the slots' positions, is what
    ``positions`` gives at the length the next step attends over (its new token included), after
    the prefill and after each step; ``gather`` and ``empty`` follow it, and every layer shares
    them."""
    run = Run(make(device, topn=TOPN, sinks=sinks, window=window), device, torch.float32)
    run.prefill()
    slots = run.cache.hot_slots
    assert all(hot.slots is slots for hot in run.cache.hot.values())
    for step in range(STEPS + 1):
        pos, valid = slots.positions(run.cache.lengths.attend_lens)  # [B, H] each
        want = torch.where(valid, pos, -1)  # [B, H]
        assert torch.equal(slots.held.long(), want), step
        assert torch.equal(slots.gather, want.clamp(min=0)) and torch.equal(slots.empty, want < 0)
        if step < STEPS:
            run.step()


def selection(scores, lse, length, group_select, topn=TOPN, sinks=SINKS, window=WINDOW,
              top_p=1.0):
    """What one step of sequence ``length`` attends exactly, by loops: scores [Hq, L], lse [Hq]
    -> per head the top ``topn`` cold positions (by score, or by group mass), cut below 1
    ``top_p`` to the shortest prefix whose own mass exp(s − lse) reaches it, and every hot
    position, as (scores [Hq, M], indices [Hq, M]) padded with -inf / -1."""
    hot = sorted(hot_positions(length, sinks, window))
    cold = [j for j in range(length) if j not in hot]
    g = HQ // HKV
    rows = []
    for h in range(HQ):
        if group_select:
            heads = range(h // g * g, h // g * g + g)
            rank = {j: sum(torch.exp(scores[x, j] - lse[x]).item() for x in heads) for j in cold}
        else:
            rank = {j: scores[h, j].item() for j in cold}
        top = sorted(cold, key=lambda j: (-rank[j], j))[:topn]
        mass = [torch.exp(scores[h, j] - lse[h]).item() for j in top]
        cut = next((i for i in range(1, len(top)) if sum(mass[:i]) >= top_p), len(top))
        rows.append(top[:cut] + hot)
    width = max(len(r) for r in rows)
    idx = torch.full((HQ, width), -1, dtype=torch.int32)
    for h, r in enumerate(rows):
        idx[h, :len(r)] = torch.tensor(r, dtype=torch.int32)
    sel = torch.where(idx >= 0, torch.gather(scores, 1, idx.long().clamp(min=0)),
                      torch.tensor(float("-inf")))  # [Hq, M]
    return sel, idx


def reference_step(q, k, v, group_select, renormalize, tail, **hot):
    """One step of one sequence by the reference ops over :func:`selection` (``hot``: its
    keywords): q [1, Hq, D], k/v [1, Hkv, L, D] float32 -> out [1, Hq, D]."""
    lens = torch.tensor([k.shape[2]], dtype=torch.int32)  # [1]
    scores, lse = reference.qk_scores(q, k, lens)  # [1, Hq, L], [1, Hq]
    sel, idx = selection(scores[0], lse[0], k.shape[2], group_select, **hot)
    sel, idx = sel[None], idx[None]  # [1, Hq, M]
    if tail == "none":
        return reference.sparse_attn_v(sel, idx, v, lse, renormalize)
    bits = {"int2": 2, "int4": 4}[tail]
    codes, meta = reference.quantize_rows(v, bits)
    top = reference.sparse_attn_v(sel, idx, v, lse, renormalize=False)  # [1, Hq, D]
    every, _ = reference.qk_scores(q, k, lens)  # [1, Hq, L]
    return top + reference.lowbit_tail(every, lens, lse, idx, codes, meta, bits)


@pytest.mark.parametrize("group_select", [False, True])
@pytest.mark.parametrize("renormalize, tail", [(True, "none"), (False, "none"), (True, "int2"),
                                               (True, "int4")])
def test_step_matches_reference_ops_over_hot_and_cold_rows(device, group_select, renormalize,
                                                           tail):
    """Each decode step (the ring wrapping, sequences shorter than sinks + window + N among
    them) equals the reference ops over the hot rows and the top N cold rows, with the tail over
    every other row."""
    run = Run(make(device, topn=TOPN, group_select=group_select, renormalize=renormalize,
                   tail=tail, sinks=SINKS, window=WINDOW), device, torch.float32)
    run.check_steps(lambda q, k, v: reference_step(q, k, v, group_select, renormalize, tail))


@pytest.mark.parametrize("group_select", [False, True])
@pytest.mark.parametrize("top_p", [0.5, 0.2])
def test_step_with_top_p_matches_reference_ops(device, group_select, top_p):
    """The shipped defaults' kind of step (hot rows, an int2 tail, ``top_p`` below 1) with cold
    rows actually read and cut: each step equals the reference ops over the hot rows and each
    head's mass prefix of its top N, the tail over every other row. Some heads are cut."""
    cuts = []

    def want(q, k, v):
        lens = torch.tensor([k.shape[2]], dtype=torch.int32)  # [1]
        scores, lse = reference.qk_scores(q, k, lens)  # [1, Hq, L], [1, Hq]
        full = selection(scores[0], lse[0], k.shape[2], group_select, topn=5)[1]  # [Hq, M]
        cut = selection(scores[0], lse[0], k.shape[2], group_select, topn=5, top_p=top_p)[1]
        cuts.append(((cut >= 0).sum(-1) < (full >= 0).sum(-1)).any().item())
        return reference_step(q, k, v, group_select, True, "int2", topn=5, top_p=top_p)

    run = Run(make(device, topn=5, group_select=group_select, tail="int2", top_p=top_p,
                   sinks=SINKS, window=WINDOW), device, torch.float32)
    run.check_steps(want)
    assert any(cuts)


@pytest.mark.parametrize("sinks, window", [(0, 4), (3, 0)])
def test_sinks_or_window_alone(device, sinks, window):
    run = Run(make(device, topn=TOPN, tail="int2", sinks=sinks, window=window), device,
              torch.float32)
    run.check_steps(lambda q, k, v: reference_step(q, k, v, False, True, "int2", sinks=sinks,
                                                   window=window))


@pytest.mark.parametrize("tail", ["int2", "none"])  # the op's hot rows, or HotPart's
@pytest.mark.parametrize("sinks, window", [(3, 0), (0, 3), (2, 2)])
def test_prompts_shorter_than_the_hot_rows(device, sinks, window, tail):
    """Prompts of 2, 1 and 0 tokens, shorter than sinks + window, growing past them over 5 steps,
    N covering every cold key: each step is exact attention (a sink slot taken by position
    ``sinks``, or a position both hot and ranked, would be off by the whole row). The padding
    rows past each prompt are NaN: a slot they would fill is empty, and weighs 0 without them
    (0 x NaN would be NaN)."""
    torch.manual_seed(0)
    options = replace(KCacheOptions.paper_literal(), topn=64, sinks=sinks, window=window,
                      tail=tail)
    lens = torch.tensor([2, 1, 0], dtype=torch.int32, device=device)  # [B]
    cache = KCache(tiny_config(), 3, 16, device, torch.float32, options)
    k0, v0 = (torch.randn(3, HKV, 2, D, device=device) for _ in range(2))  # [B, Hkv, T, D]
    for b, n in enumerate(lens.tolist()):
        v0[b, :, n:] = float("nan")  # don't-care padding
    for layer in range(LAYERS):
        cache.store_prompt(layer, k0, v0, lens)
    cache.finish_prefill(lens)
    keys = [[k0[b, :, :n]] for b, n in enumerate(lens.tolist())]  # per sequence [Hkv, L, D]
    values = [[v0[b, :, :n]] for b, n in enumerate(lens.tolist())]
    for _ in range(5):
        q = torch.randn(3, HQ, D, device=device)  # [B, Hq, D]
        k, v = (torch.randn(3, HKV, D, device=device) for _ in range(2))  # [B, Hkv, D]
        outs = [cache.decode(layer, q, k, v) for layer in range(LAYERS)]  # [B, Hq, D] each
        cache.finish_decode()
        for b in range(3):
            keys[b].append(k[b, :, None])
            values[b].append(v[b, :, None])
            want = exact_attention(q[b].cpu(), torch.cat(keys[b], 1).cpu(),
                                   torch.cat(values[b], 1).cpu())
            torch.testing.assert_close(outs[0][b].double().cpu(), want, atol=1e-5, rtol=1e-5)


def test_select_reads_n_host_rows_of_cold_positions(device):
    """The host rows of a step are the top N cold ones: never a hot position, N of them once a
    sequence has N cold positions."""
    cache = make(device, topn=TOPN, sinks=SINKS, window=WINDOW)
    gen = torch.Generator().manual_seed(1)
    lens = torch.tensor([30, 6, 1], dtype=torch.int32, device=device)  # [B]
    q = torch.randn(3, HQ, D, generator=gen).to(device)  # [B, Hq, D]
    k = torch.randn(3, HKV, 32, D, generator=gen).to(device)  # [B, Hkv, S, D]
    scores, indices, lse = cache.select(q, k, lens)  # [B, Hq, N] x2, [B, Hq]
    assert indices.shape == (3, HQ, TOPN)
    s, want_lse = reference.qk_scores(q.cpu(), k.cpu(), lens.cpu())  # [B, Hq, S], [B, Hq]
    torch.testing.assert_close(lse.cpu(), want_lse)
    for b, length in enumerate(lens.tolist()):
        _, idx = selection(s[b, :, :length], want_lse[b], length, False)
        cold = len(range(SINKS, max(SINKS, length - WINDOW)))
        for h in range(HQ):
            got = [i for i in indices[b, h].tolist() if i >= 0]
            assert got == idx[h, :min(TOPN, cold)].tolist(), (b, h)


@pytest.mark.parametrize("tail", ["none", "int2"])
@pytest.mark.parametrize("sinks, window", [(4, 30), (40, 0), (0, 50), (32, 32), (2**31, 0),
                                           (0, 2**40), (3, 2**70)])
def test_all_rows_hot_is_exact(device, sinks, window, tail):
    """sinks + window >= L: every row is attended exactly from the device (no host row read, no
    tail term), so the step equals exact attention. Past the capacity (32) the cache keeps one
    slot per position, not sinks + window, and its ops skip no more (counts past int32 and
    int64 included)."""
    run = Run(make(device, topn=1, sinks=sinks, window=window, tail=tail), device,
              torch.float32)
    assert run.cache.hot_slots.size == min(sinks + window, 32)
    run.prefill()
    for _ in range(2):
        for layer, (q, out) in enumerate(run.step()):
            for b in range(len(LENS)):
                want = run.exact(layer, b, q[b])
                torch.testing.assert_close(out[b].double().cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_cache_takes_prompt_lens_on_the_cpu():
    """The prefill's lens may be on the CPU, as the cache's lengths take them: the hot rows' slots
    come out the same as from lens on the device."""
    caches = [make("cuda", topn=TOPN, sinks=SINKS, window=WINDOW) for _ in range(2)]
    B, T = len(LENS), max(LENS)
    k, v = torch.randn(B, HKV, T, D, device="cuda"), torch.randn(B, HKV, T, D, device="cuda")
    for cache, where in zip(caches, ("cpu", "cuda")):
        lens = torch.tensor(LENS, dtype=torch.int32, device=where)  # [B]
        for layer in range(LAYERS):
            cache.store_prompt(layer, k, v, lens)
        cache.finish_prefill(lens)
    assert torch.equal(caches[0].hot_slots.held, caches[1].hot_slots.held)
    for layer in range(LAYERS):
        assert torch.equal(caches[0].hot[layer].v, caches[1].hot[layer].v)


def one_layer_step(options, capacity, k, v, q, k_new, v_new):
    """One decode step of a one-layer KCache (4 query heads, 2 KV heads, D 64, float32) with
    ``options`` after the prefill of one sequence: k, v [1, Hkv, T, D], q [1, Hq, D], k_new,
    v_new [1, Hkv, D] on the device of the cache -> out [1, Hq, D]."""
    c = LlamaConfig(vocab_size=32, hidden_size=256, intermediate_size=64, num_layers=1,
                    num_heads=4, num_kv_heads=2, head_dim=64)
    cache = KCache(c, 1, capacity, k.device, torch.float32, options)
    lens = torch.tensor([k.shape[2]], dtype=torch.int32, device=k.device)  # [1]
    cache.store_prompt(0, k, v, lens)
    cache.finish_prefill(lens)
    return cache.decode(0, q, k_new, v_new)


@pytest.mark.parametrize("tail", ["int2", "none"])
def test_all_rows_hot_is_exact_at_large_scores(device, tail):
    """Scores of order 1e5 (q, K and V scaled by 1000), every row hot: the hot rows' weights are
    taken from the step's own scores (qk_topn's), so they add up to 1 with the lse and the step is
    exact (recomputed from K, rounding made them 0.5 · V off)."""
    torch.manual_seed(0)
    k, v = (torch.randn(1, 2, 8, 64, device=device) * 1000 for _ in range(2))  # [B, Hkv, T, D]
    q1 = torch.randn(1, 4, 64, device=device) * 1000  # [B, Hq, D]
    k1, v1 = (torch.randn(1, 2, 64, device=device) * 1000 for _ in range(2))  # [B, Hkv, D]
    out = one_layer_step(KCacheOptions(top_p=1.0, tail=tail), 16, k, v, q1, k1, v1)  # [B, Hq, D]
    K = torch.cat([k, k1[:, :, None]], 2).repeat_interleave(2, 1).double()  # [B, Hq, 9, D]
    V = torch.cat([v, v1[:, :, None]], 2).repeat_interleave(2, 1).double()  # [B, Hq, 9, D]
    p = torch.softmax(torch.einsum("bhd,bhjd->bhj", q1.double(), K) / 8, -1)  # [B, Hq, 9]
    want = torch.einsum("bhj,bhjd->bhd", p, V)  # [B, Hq, D]
    torch.testing.assert_close(out.double(), want, atol=1e-2, rtol=1e-5)


@pytest.mark.parametrize("tail, renormalize", [("none", False), ("none", True), ("int2", True)])
@pytest.mark.parametrize("group_select", [True, False])
@pytest.mark.parametrize("row", [0, 10, 28])  # a sink, a cold row, in the window
def test_overflowing_scores_give_no_nan(device, tail, renormalize, group_select, row):
    """Finite q and K whose scaled product overflows float32 (1e19 · 1e19 · 64 / 8): that score
    and the lse are +inf. Every weight exp(s − lse) is then 0, as the ops take it (not the NaN of
    inf − inf), so the step is zeros on every path, the row hot or not, never NaN."""
    torch.manual_seed(0)
    options = KCacheOptions(topn=4, top_p=1.0, tail=tail, renormalize=renormalize, sinks=2,
                            window=3, group_select=group_select)
    k, v = (torch.randn(1, 2, 30, 64, device=device) for _ in range(2))  # [B, Hkv, T, D]
    k[:, :, row] = 1e19
    q1 = torch.full((1, 4, 64), 1e19, device=device)  # [B, Hq, D]
    k1, v1 = (torch.randn(1, 2, 64, device=device) for _ in range(2))  # [B, Hkv, D]
    out = one_layer_step(options, 40, k, v, q1, k1, v1)  # [B, Hq, D]
    assert torch.equal(out, torch.zeros_like(out))


def test_hot_rows_count_in_device_memory(device):
    """Per KCache layer and sequence, sinks + window V rows on the device: a per-sequence cost,
    not a per-token one."""
    B, S = len(LENS), 32
    extra = make(device, capacity=S, sinks=SINKS, window=WINDOW).device_bytes() - \
        make(device, capacity=S).device_bytes()
    assert extra == LAYERS * B * HKV * (SINKS + WINDOW) * D * 4
    config = tiny_config()
    options = KCacheOptions(topn=TOPN, tail="int2", sinks=SINKS, window=WINDOW)
    plain = replace(options, sinks=0, window=0)
    for capacity in (100, 1000):
        hot = sequence_bytes("kcache", config, options, capacity, torch.bfloat16)[0]
        assert hot - sequence_bytes("kcache", config, plain, capacity, torch.bfloat16)[0] == \
            LAYERS * HKV * (SINKS + WINDOW) * D * 2


@pytest.mark.parametrize("dense_layers", [(), (1,)])
@pytest.mark.parametrize("sinks, window, reuse, group_select", [
    (SINKS, WINDOW, 0, False), (9, 0, 0, False), (0, 9, 0, False), (4, 60, 0, False),
    (0, 0, 8, False), (0, 0, 100, True), (SINKS, WINDOW, 100, False)])
def test_sequence_bytes_count_what_a_cache_holds(sinks, window, reuse, group_select, dense_layers):
    """sequence_bytes is what a cache of one sequence holds, at capacities below, at and above
    sinks + window and the reuse pool (a cache keeps at most one hot row per position, and a pool
    of at most max(capacity, a step's entries) slots)."""
    options = KCacheOptions(topn=TOPN, tail="int2", sinks=sinks, window=window, reuse=reuse,
                            group_select=group_select, dense_layers=dense_layers)
    for capacity in (1, 2, 5, 9, 10, 70, 150):
        cache = KCache(tiny_config(), 1, capacity, "cpu", torch.bfloat16, options)
        assert sequence_bytes("kcache", tiny_config(), options, capacity, torch.bfloat16) == \
            (cache.device_bytes(), cache.host_bytes()), capacity


@pytest.mark.parametrize("capacity", [0, -5, 1.5, True, "8"])
def test_sequence_bytes_of_a_bad_capacity(capacity):
    with pytest.raises(ValueError, match=f"sequence_bytes: capacity must be an integer >= 1, "
                                         f"got {re.escape(repr(capacity))}"):
        sequence_bytes("kcache", tiny_config(), None, capacity, torch.bfloat16)


def test_sequence_bytes_of_options_no_cache_takes():
    """Options no KCache of the capacity could be built with are refused as building one would
    refuse them: not KCacheOptions, a pool smaller than a step's rows."""
    with pytest.raises(TypeError, match="KCache: options must be a KCacheOptions, got dict"):
        sequence_bytes("kcache", tiny_config(), {"topn": 3}, 10, torch.bfloat16)
    with pytest.raises(ValueError, match="reuse must hold the rows of a whole step, at least 6"):
        sequence_bytes("kcache", tiny_config(), KCacheOptions(topn=3, reuse=5), 10,
                       torch.bfloat16)


@pytest.mark.parametrize("options, message", [
    (dict(tail="mean", sinks=4), "the mean tail takes the mean of every row not read"),
    (dict(sinks=-1), "sinks must be an integer >= 0, got -1"),
    (dict(window=True), "window must be an integer >= 0, got True"),
    (dict(window=2.5), "window must be an integer >= 0, got 2.5"),
])
def test_bad_hot_rows_options(options, message):
    with pytest.raises(ValueError, match=message):
        KCacheOptions(**options)


def test_cuda_limit_is_on_topn_alone():
    """qk_topn does not rank the hot rows (skip_first / skip_last), so N alone is what the CUDA
    select sorts, whatever sinks + window (checked without a GPU: the check is on the device
    type)."""
    check_kcache(tiny_config(), "cuda", torch.float32,
                 KCacheOptions(topn=4096, sinks=4, window=200), 10**5)
    with pytest.raises(ValueError, match=r"topn must be at most 4096 on CUDA, got 4097"):
        check_kcache(tiny_config(), "cuda", torch.float32,
                     KCacheOptions(topn=4097, sinks=4, window=60), 10**5)


def test_label_and_paper_literal():
    paper = KCacheOptions.paper_literal()
    assert replace(paper, topn=8, tail="int2", sinks=4, window=60).label == \
        "N=8 tail=int2 sinks=4 win=60"
    assert KCacheOptions().label == "N=64 tail=int2 p=0.9 sinks=4 win=60"  # the defaults
    assert KCacheOptions.paper_literal().hot_rows == 0


def test_float16_hot_rows_and_a_group_row_of_little_mass():
    """tail="none" with renormalize, hot rows and group_select in float16: the group's shared row
    carries about 1e-10 of head 1's mass, and that head's output is still the softmax over the
    hot row and that row (the top N's weighted sum in float16 underflowed to 0 before the
    division by their mass, leaving the hot row alone: 2.6 off)."""
    D = 64
    config = LlamaConfig(vocab_size=32, hidden_size=2 * D, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=D)
    options = replace(KCacheOptions.paper_literal(), topn=1, group_select=True, sinks=1, window=0)
    torch.manual_seed(0)
    k = torch.zeros(1, 1, 4, D)  # [B, Hkv, T, D]: k_j = 8 e_j
    k[0, 0, torch.arange(4), torch.arange(4)] = 8.0
    v, v_new = torch.randn(1, 1, 4, D), torch.randn(1, 1, D)
    q = torch.zeros(1, 2, D)  # [B, Hq, D]: head 0 on position 1, head 1 on 2, 3 and the new one
    q[0, 0, 1], q[0, 0, 4] = 20.0, -20.0
    q[0, 1, :5] = torch.tensor([-40.0, -2.0, 20.0, 20.0, 20.0])
    k_new = torch.zeros(1, 1, D)
    k_new[0, 0, 4] = 8.0
    cache = KCache(config, 1, 8, "cpu", torch.float16, options)
    lens = torch.tensor([4], dtype=torch.int32)
    cache.prefill(0, torch.zeros(1, 2, 4, D).half(), k.half(), v.half(), lens)
    cache.finish_prefill(lens)
    out = cache.decode(0, q.half(), k_new.half(), v_new.half())  # [B, Hq, D]
    keys = torch.cat([k[0, 0], k_new[0]]).half().double()  # [5, D]
    values = torch.cat([v[0, 0], v_new[0]]).half().double()  # [5, D]
    s = q[0].half().double() @ keys.T / D ** 0.5  # [Hq, 5]
    want = torch.softmax(s[:, [0, 1]], -1) @ values[[0, 1]]  # the hot row 0 and the group's row 1
    torch.testing.assert_close(out[0].double(), want, atol=2e-3, rtol=2e-3)
