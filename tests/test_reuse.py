"""Cross-step reuse (KCacheOptions.reuse): the V rows a KCache layer read last kept in a pool of C
rows per sequence and KV head on the device. A cache with reuse is checked against its twin
without (the same output: the rows are the same values), and the rows it finds in the pool
against a pool kept by loops over the positions each step selected."""
from dataclasses import replace

import pytest
import torch

from kcache_ops.caches import KCacheOptions, make_cache, sequence_bytes
from kcache_ops.caches import reuse as reuse_module

from conftest import TOL
from test_cache import HKV, HQ, LAYERS, D, tiny_config

SLOTS = 10  # per sequence and KV head: a step reads up to 8 (G · N), some 25 positions are cold
B, CAPACITY, LENS = 2, 64, [30, 21]
BASE = KCacheOptions(topn=4, sinks=2, window=3)  # the defaults, a small N and few hot rows


def twins(device, dtype, options, slots=SLOTS):
    """The same cache without reuse and with a pool of ``slots`` rows."""
    return [make_cache("kcache", tiny_config(), B, CAPACITY, device, dtype,
                       replace(options, reuse=c)) for c in (0, slots)]


def prefill(caches, gen, device, dtype, prompt_lens=LENS):
    """One prompt of ``prompt_lens`` tokens per sequence into every cache (random K and V)."""
    T = max(prompt_lens)
    k, v = (torch.randn(B, HKV, T, D, generator=gen).to(device, dtype) for _ in range(2))
    lens = torch.tensor(prompt_lens, dtype=torch.int32, device=device)  # [B]
    for cache in caches:
        for layer in range(LAYERS):
            cache.store_prompt(layer, k, v, lens)
        cache.finish_prefill(lens)


def decode_steps(caches, gen, device, dtype, steps):
    """``steps`` decode steps of every cache on the same inputs -> outputs [steps, caches, layers]
    of [B, Hq, D]. The queries drift around a fixed one, as a model's do from step to step, so
    steps choose many of the rows the steps before chose."""
    anchor = torch.randn(B, HQ, D, generator=gen)  # [B, Hq, D]
    outs = []
    for _ in range(steps):
        q = (anchor + 0.3 * torch.randn(B, HQ, D, generator=gen)).to(device, dtype)  # [B, Hq, D]
        k, v = (torch.randn(B, HKV, D, generator=gen).to(device, dtype) for _ in range(2))
        outs.append([[cache.decode(layer, q, k, v) for layer in range(LAYERS)]
                     for cache in caches])
        for cache in caches:
            cache.finish_decode()
    return outs


@pytest.mark.parametrize("options", [
    BASE, replace(BASE, group_select=True), replace(BASE, tail="int4", top_p=1.0),
    replace(BASE, tail="none"),
    replace(KCacheOptions.paper_literal(), topn=4, renormalize=False),
    replace(KCacheOptions.paper_literal(), topn=4, group_select=True)],
    ids=["default", "group", "int4", "none", "paper-full-softmax", "paper-group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_reuse_changes_no_output(device, dtype, options):
    """Over two prompts (the second replaces the rows the first's steps kept) and decode steps
    that find most of their rows on the device, every output is the twin's without reuse: on the
    CPU to the bit (the same rows in the same order), on CUDA to rounding (its sparse_attn_v
    orders a head's rows by where they lie)."""
    caches = twins(device, dtype, options)
    for cache in caches:
        cache.record_mass = True
    gen = torch.Generator().manual_seed(0)
    tol = 0 if device == "cpu" else TOL[dtype]
    for _ in range(2):
        prefill(caches, gen, device, dtype)
        for step, (plain, reused) in enumerate(decode_steps(caches, gen, device, dtype, 8)):
            for layer in range(LAYERS):
                torch.testing.assert_close(reused[layer], plain[layer], atol=tol, rtol=tol,
                                           msg=f"step {step}, layer {layer}")
    rate = caches[1].reuse_hit_rate()  # [layers]
    assert (rate > 0.3).all(), rate  # the check above compared rows that came from the device


@pytest.mark.parametrize("options", [BASE, replace(BASE, tail="int4", top_p=0.7, sinks=1,
                                                   window=2)], ids=["default", "int4-top-p"])
def test_reuse_over_prompts_of_other_lengths(device, options):
    """Prompts of other lengths after the first (an empty one, then both far shorter: the pool's
    positions past them are stale) change no output either."""
    caches = twins(device, torch.float32, options)
    gen = torch.Generator().manual_seed(1)
    tol = 0 if device == "cpu" else TOL[torch.float32]
    for lens in (LENS, [0, 21], [3, 1]):
        prefill(caches, gen, device, torch.float32, lens)
        for step, (plain, reused) in enumerate(decode_steps(caches, gen, device, torch.float32,
                                                            6)):
            for layer in range(LAYERS):
                torch.testing.assert_close(reused[layer], plain[layer], atol=tol, rtol=tol,
                                           msg=f"prompts {lens}, step {step}, layer {layer}")


class ReadLog:
    """Every ``ReusedRows.read`` of a run (the real one, called through): per call the layer's
    pool, the indices and new positions it got, the rows it read and the hits per sequence and KV
    head, and the positions the pool held after it."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = reuse_module.ReusedRows.read

        def read(pool, indices, v_host, new_pos):
            reads, counts = real(pool, indices, v_host, new_pos)  # counts [B, Hkv, 2]
            self.calls.append((pool, indices.cpu(), new_pos.cpu().clone(),
                               counts[..., 0].cpu().clone(), counts[..., 1].cpu().clone(),
                               pool.held.cpu().clone()))
            return reads, counts

        monkeypatch.setattr(reuse_module.ReusedRows, "read", read)


class LoopPool:
    """The pool of one (layer, sequence, KV head), kept by loops: the position and the last step
    of each slot; a new row takes the least recently used slot that the step does not read
    (never-used first, ties to the lower slot), in the order of the step's entries; the step's
    new token takes one for this step only, which is then the first to refill."""

    def __init__(self, slots):
        self.pos = [-1] * slots
        self.used = [-1] * slots

    def step(self, entries, new_pos, step):
        """entries: the step's positions in entry order (-1 padding) -> (rows read, hits)."""
        read = list(dict.fromkeys(p for p in entries if p >= 0))  # distinct, first entry first
        held = {p: s for s, p in enumerate(self.pos) if p >= 0}
        mine = {held[p] for p in read if p in held}
        order = sorted(range(len(self.pos)),
                       key=lambda s: (step + 1 if s in mine else self.used[s], s))
        victims = iter(order)
        for p in read:
            s = held[p] if p in held else next(victims)
            if p == new_pos:
                self.pos[s], self.used[s] = -1, -1
            else:
                self.pos[s], self.used[s] = p, step
        return len(read), sum(p in held for p in read)


@pytest.mark.parametrize("hot", [True, False], ids=["hot rows", "new token cold"])
@pytest.mark.parametrize("group_select", [False, True])
def test_the_pool_holds_the_rows_read_last(monkeypatch, group_select, hot):
    """Per layer, sequence and KV head, a step reads the distinct positions its heads selected
    (one row however many heads chose it), finds those its pool holds and puts the others in the
    least recently used slots: the rows, the hits and every slot's position after each step are
    those of a pool kept by loops; the cache's hit rate and bytes saved are those counts."""
    log = ReadLog(monkeypatch)
    options = replace(BASE, group_select=group_select, **({} if hot else {"sinks": 0,
                                                                         "window": 0}))
    _, cache = twins("cpu", torch.float32, options)
    cache.record_mass = True
    gen = torch.Generator().manual_seed(1)
    prefill([cache], gen, "cpu", torch.float32)
    steps = 9
    decode_steps([cache], gen, "cpu", torch.float32, steps)
    assert len(log.calls) == steps * LAYERS
    G = HQ // HKV
    total_rows, total_hits = torch.zeros(LAYERS), torch.zeros(LAYERS)
    for layer in range(LAYERS):
        calls = log.calls[layer::LAYERS]
        assert all(c[0] is cache.reuse[layer] for c in calls)
        pools = {(b, h): LoopPool(SLOTS) for b in range(B) for h in range(HKV)}
        for step, (_, indices, new_pos, rows, hits, held) in enumerate(calls):
            for b in range(B):
                for h in range(HKV):
                    heads = indices[b, h * G:(h + 1) * G]  # [G, N]
                    # group_select: the group's one list, each head cut to its top_p prefix
                    entries = (heads.amax(0) if group_select else heads.flatten()).tolist()
                    want = pools[b, h].step(entries, new_pos[b].item(), step)
                    assert (rows[b, h], hits[b, h]) == want, (layer, step, b, h)
                    assert held[b, h].tolist() == pools[b, h].pos, (layer, step, b, h)
            total_rows[layer] += rows.sum()
            total_hits[layer] += hits.sum()
    assert (total_hits > 0).all() and (total_hits < total_rows).all()  # hits and evictions
    torch.testing.assert_close(cache.reuse_hit_rate(), total_hits / total_rows)
    saved = float(total_hits.sum()) / steps * D * 4  # float32 rows
    assert cache.host_bytes_saved_per_step() == pytest.approx(saved)


@pytest.mark.parametrize("again", ["selects", "skips"])
def test_a_step_run_again_reads_its_new_token_again(device, again):
    """A step given up and run again with another token for the same position: the second run
    attends over the second token's V, as its twin without reuse, and so do the steps after it,
    which select that position again, whether the second run selected it too or not (the first
    run read the first token's V, which must not stay in the pool). The keys make every head
    select the token for the query q, and rank it last for -q; the pool holds every position,
    so nothing is evicted in between. On the CPU to the bit, on CUDA to rounding (its
    sparse_attn_v sums a head's rows in the order they lie: positions for the twin, pool slots
    for the reusing cache, as test_reuse_changes_no_output says)."""
    options = replace(KCacheOptions.paper_literal(), topn=4)  # no hot rows: the token is cold
    tol = 0 if device == "cpu" else TOL[torch.float32]
    plain, reused = twins(device, torch.float32, options, slots=CAPACITY)
    gen = torch.Generator().manual_seed(2)
    prefill([plain, reused], gen, device, torch.float32)
    q = torch.randn(B, HQ, D, generator=gen).to(device)  # [B, Hq, D]
    k = 3 * q.view(B, HKV, HQ // HKV, D).sum(2)  # [B, Hkv, D]: the top score of every head
    first, second = (torch.randn(B, HKV, D, generator=gen).to(device) for _ in range(2))
    q_again = q if again == "selects" else -q
    for layer in range(LAYERS):
        reused.decode(layer, q, k, first)  # the run given up
        torch.testing.assert_close(reused.decode(layer, q_again, k, second),
                                   plain.decode(layer, q_again, k, second), atol=tol, rtol=tol)
    for _ in range(2):  # the steps after it read the token's row from the pool
        for cache in (plain, reused):
            cache.finish_decode()
        k_next, v_next = (torch.randn(B, HKV, D, generator=gen).to(device) for _ in range(2))
        for layer in range(LAYERS):
            torch.testing.assert_close(reused.decode(layer, q, k_next, v_next),
                                       plain.decode(layer, q, k_next, v_next), atol=tol,
                                       rtol=tol)


@pytest.mark.parametrize("group_select", [False, True])
@pytest.mark.parametrize("capacity", [32, 2])
def test_a_pool_smaller_than_a_step_is_refused(group_select, capacity):
    """A pool holds at least a step's rows: N = min(topn, capacity) (a step reads no more), times
    the group without group_select."""
    step_rows = min(BASE.topn, capacity) * (1 if group_select else HQ // HKV)
    options = replace(BASE, group_select=group_select)
    with pytest.raises(ValueError, match=f"at least {step_rows} per KV head .* got "
                                         f"{step_rows - 1}"):
        make_cache("kcache", tiny_config(), 1, capacity, "cpu", torch.float32,
                   replace(options, reuse=step_rows - 1))
    make_cache("kcache", tiny_config(), 1, capacity, "cpu", torch.float32,
               replace(options, reuse=step_rows))


def test_device_memory_of_the_pool():
    """The pool holds C rows per sequence and KV head with their positions and last steps
    (int32 each), in every KCache layer: C = reuse, or max(capacity, a step's entries) where
    that is fewer (G·N entries, N = min(4, capacity)); what device_bytes adds, and what
    sequence_bytes counts for a long sequence."""
    config = tiny_config()
    options = replace(BASE, dense_layers=(1,))
    per_slot = 1 * HKV * (D * 2 + 4 + 4)  # one sequence, bfloat16 rows
    for capacity, slots in ((2, 4), (9, 9), (100, SLOTS)):
        plain, reused = (make_cache("kcache", config, 1, capacity, "cpu", torch.bfloat16,
                                    replace(options, reuse=c)) for c in (0, SLOTS))
        assert reused.device_bytes() - plain.device_bytes() == (LAYERS - 1) * slots * per_slot
    per_layer = SLOTS * per_slot
    long = [sequence_bytes("kcache", config, replace(options, reuse=c), 5000, torch.bfloat16)[0]
            for c in (0, SLOTS)]
    assert long[1] - long[0] == (LAYERS - 1) * per_layer


@pytest.mark.parametrize("group_select", [False, True])
def test_a_pool_past_the_capacity_keeps_capacity_slots(group_select):
    """reuse above the capacity: the pool keeps max(capacity, a step's entries) slots per sequence
    and KV head, not reuse (10**6 rows asked for gigabytes), and finds every row a pool of ten
    times as many finds: a position found is never refilled, and the new token's slot is emptied
    after its step, so the positions held never pass the capacity. A capacity the steps fill, and
    a pool they fill past half of it."""
    capacity = max(LENS) + 8  # the prompt and 8 steps
    options = replace(BASE, topn=16, sinks=0, window=0, reuse=10**6, group_select=group_select)
    caches = [make_cache("kcache", tiny_config(), B, capacity, "cpu", torch.float32, options)
              for _ in range(2)]
    for i, pool in caches[1].reuse.items():
        assert pool.rows.shape == (B, HKV, capacity, D)
        caches[1].reuse[i] = reuse_module.ReusedRows(10 * capacity, group_select, B, HKV, D,
                                                     "cpu", torch.float32)
    for cache in caches:
        cache.record_mass = True
    gen = torch.Generator().manual_seed(4)
    prefill(caches, gen, "cpu", torch.float32)
    for kept, larger in decode_steps(caches, gen, "cpu", torch.float32, 8):
        for layer in range(LAYERS):
            assert torch.equal(kept[layer], larger[layer])
    rates = [cache.reuse_hit_rate() for cache in caches]  # [layers] each
    assert torch.equal(rates[0], rates[1]) and (rates[0] > 0.3).all(), rates
    held = (caches[0].reuse[0].held[0] >= 0).sum(-1)  # [Hkv]: positions sequence 0's pool holds
    assert (held > capacity // 2).all(), held


def test_eval_costs_count_the_rows_the_pool_lacked(monkeypatch):
    """The evaluation's host bytes per step and sequence with reuse, on the basis of those
    without it (every head's rows, ``host_bytes_read_per_step``): the rows read less the share
    of the distinct rows the pools held (each layer's, from what ``read`` returned, averaged over
    the layers), and the new token's rows written."""
    from kcache_ops.eval.runner import Config
    from kcache_ops.eval.summary import costs
    log = ReadLog(monkeypatch)
    plain, reused = twins("cpu", torch.float32, BASE)
    for cache in (plain, reused):
        cache.record_mass = True
    gen = torch.Generator().manual_seed(3)
    prefill([plain, reused], gen, "cpu", torch.float32)
    steps = 6
    decode_steps([plain, reused], gen, "cpu", torch.float32, steps)
    got = [costs(cache, tiny_config(), Config("kcache", cache.options))["host_bytes_per_step"]
           for cache in (plain, reused)]
    counts = {}  # per layer's pool: [rows read, rows found]
    for pool, _, _, rows, hits, _ in log.calls:
        counts.setdefault(id(pool), [0, 0])
        counts[id(pool)][0] += int(rows.sum())
        counts[id(pool)][1] += int(hits.sum())
    assert len(counts) == LAYERS
    found = sum(h / r for r, h in counts.values()) / LAYERS
    written = LAYERS * B * HKV * D * 4 / B  # float32 rows, per sequence
    assert 0 < found < 1
    assert got[1] == pytest.approx(written + (got[0] - written) * (1 - found))
    assert got[1] < got[0]


def test_group_heads_cut_to_different_prefixes(device):
    """group_select with top_p: every head of a group gets the group's list, cut to its own
    prefix, so one head may read rows another head of the group does not: the pool reads the
    longest prefix. Head 0 of each group aims at one key (a prefix of 1), head 1 is nearly flat
    (all N); the output is the twin's without reuse at every step."""
    options = replace(KCacheOptions.paper_literal(), topn=4, group_select=True, top_p=0.5)
    plain, reused = twins(device, torch.float32, options, slots=8)
    gen = torch.Generator().manual_seed(4)
    T = max(LENS)
    k, v = (torch.randn(B, HKV, T, D, generator=gen) for _ in range(2))  # [B, Hkv, T, D]
    lens = torch.tensor(LENS, dtype=torch.int32, device=device)
    for cache in (plain, reused):
        for layer in range(LAYERS):
            cache.store_prompt(layer, k.to(device), v.to(device), lens)
        cache.finish_prefill(lens)
    G = HQ // HKV
    tol = 0 if device == "cpu" else TOL[torch.float32]
    for step in range(6):
        q = torch.zeros(B, HQ, D)  # [B, Hq, D]
        for h in range(HKV):
            q[:, h * G] = 20 * k[:, h, (3 * step + h) % min(LENS)]
            q[:, h * G + 1] = 0.01 * torch.randn(B, D, generator=gen)
        q = q.to(device)
        k_new, v_new = (torch.randn(B, HKV, D, generator=gen).to(device) for _ in range(2))
        for layer in range(LAYERS):
            torch.testing.assert_close(reused.decode(layer, q, k_new, v_new),
                                       plain.decode(layer, q, k_new, v_new), atol=tol, rtol=tol)
        for cache in (plain, reused):
            cache.finish_decode()


def test_a_step_run_again_after_a_failure_is_recorded_once(monkeypatch):
    """A decode step that raises part way (in layer 1, after its attention: layer 0 done, layer
    1's mass and reuse counts made) and is run again, as the transformers bridge reruns it, is
    recorded once: the attention mass and rows read equal a twin's whose steps never failed, and
    the reuse counts are those of the attempts that finished (the failed one's are dropped; the
    rerun finds the rows that attempt read in the pool, so its hits are its own)."""
    log = ReadLog(monkeypatch)
    clean, failing = (make_cache("kcache", tiny_config(), B, CAPACITY, "cpu", torch.float32,
                                 replace(BASE, reuse=SLOTS)) for _ in range(2))
    gen = torch.Generator().manual_seed(3)
    prefill([clean, failing], gen, "cpu", torch.float32)
    real_attend = failing.tails[1].attend

    def attend_then_fail(*args, **kwargs):
        real_attend(*args, **kwargs)
        failing.tails[1].attend = real_attend  # the next attempt runs
        raise RuntimeError("an op failed")

    anchor = torch.randn(B, HQ, D, generator=gen)  # [B, Hq, D]
    for step in range(4):
        q = (anchor + 0.3 * torch.randn(B, HQ, D, generator=gen))  # [B, Hq, D]
        k, v = (torch.randn(B, HKV, D, generator=gen) for _ in range(2))  # [B, Hkv, D] each
        for cache in (clean, failing):
            cache.record_mass = True
            if cache is failing and step == 2:
                failing.tails[1].attend = attend_then_fail
                with pytest.raises(RuntimeError, match="an op failed"):
                    for layer in range(LAYERS):
                        cache.decode(layer, q, k, v)
            for layer in range(LAYERS):
                cache.decode(layer, q, k, v)
            cache.finish_decode()
    assert torch.equal(failing.attention_mass(), clean.attention_mass())
    assert torch.equal(failing.rows_read(), clean.rows_read())
    rows, hits = torch.zeros(LAYERS), torch.zeros(LAYERS)
    for layer in range(LAYERS):
        calls = [c for c in log.calls if c[0] is failing.reuse[layer]]  # its steps, in order
        if layer < 2:  # step 2 read twice: the failed attempt's counts are dropped
            assert len(calls) == 5
            del calls[2]
        rows[layer] = sum(c[3].sum() for c in calls)
        hits[layer] = sum(c[4].sum() for c in calls)
    torch.testing.assert_close(failing.reuse_hit_rate(), hits / rows)
    saved = float(hits.sum()) / 4 * D * 4  # float32 rows over 4 steps
    assert failing.host_bytes_saved_per_step() == pytest.approx(saved)
