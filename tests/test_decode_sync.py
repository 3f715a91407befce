"""A decode step of the model never waits on the host, with every cache backend. On a GPU, a
whole ``Llama.decode`` runs under ``torch.cuda.set_sync_debug_mode("error")``, which turns any
device->host synchronisation (``.item()``, ``.cpu()``, a value check that reads back) into an
error. On the CPU, where nothing syncs, the same steps fail on what would (tests/host_waits.py): a
tensor's value read on the host, an op whose output size depends on values, or a kcache_ops op
called with its value check on (on CUDA that check reads the lengths or indices back)."""
from dataclasses import replace

import pytest
import torch

import kcache_ops
from kcache_ops.caches import KCacheOptions, make_cache
from kcache_ops.caches.lengths import index_at
from kcache_ops.model import Llama, LlamaConfig
from cuda_checks import requires_cuda
from host_waits import host_waits

PAPER = KCacheOptions.paper_literal()
BACKENDS = pytest.mark.parametrize("backend,options", [
    ("dense", None),
    ("kcache", KCacheOptions()),
    ("kcache", replace(PAPER, topn=8)),
    ("kcache", replace(PAPER, topn=8, group_select=True, renormalize=False, dense_layers=(0,))),
    ("kcache", replace(PAPER, topn=8, tail="mean")),
    ("kcache", replace(PAPER, topn=8, tail="int2", group_select=True)),
    ("kcache", replace(PAPER, topn=8, tail="int4", top_p=0.5)),
    ("kcache", replace(PAPER, topn=8, tail="int2", sinks=4, window=8)),
    ("kcache", replace(PAPER, topn=8, sinks=2, window=4, group_select=True)),
    ("kcache", replace(PAPER, topn=8, sinks=4, window=0)),  # the sinks alone
    ("kcache", replace(PAPER, topn=8, sinks=0, window=8)),  # the window alone
    ("kcache", replace(PAPER, topn=8, sinks=2, window=4, renormalize=False)),
    ("kcache", replace(KCacheOptions(), topn=8, reuse=32)),
    ("kcache", replace(PAPER, topn=8, group_select=True, reuse=16)),
])
FREQ_FACTORS = pytest.mark.parametrize("freq_factors", [None, [1.0 + i / 8 for i in range(32)]],
                                       ids=["rope", "gguf_freq_factors"])


def prefilled(backend, options, freq_factors, device, dtype, capacity=64):
    """(model, cache, tokens [B, T]): a tiny random model and its cache of ``capacity`` tokens
    after a prefill of two prompts of 40 and 23 tokens (a prefill may sync: it validates the
    lengths)."""
    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=160, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=64, rope_freq_factors=freq_factors)
    model = Llama(c).to(device, dtype).eval()
    lens = torch.tensor([40, 23], dtype=torch.int32, device=device)  # [B]
    tokens = torch.randint(0, c.vocab_size, (2, 40), device=device)  # [B, T]
    cache = make_cache(backend, c, 2, capacity, model.device, model.dtype, options)
    with torch.inference_mode():
        model.prefill(tokens, lens, cache)
    return model, cache, tokens


def steps_without_syncs(model, cache, tokens, steps):
    """A decode step of ``cache`` on CUDA (lazy CUDA initialisation), then ``steps`` more under
    ``set_sync_debug_mode("error")`` -> (logits [B, V] of the last, the most bytes they allocated
    at once beyond those allocated before them)."""
    with torch.inference_mode():
        model.decode(tokens[:, 0], cache)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                logits = model.decode(tokens[:, 0], cache)  # [B, V]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return logits, torch.cuda.max_memory_allocated() - before


@requires_cuda
@BACKENDS
@FREQ_FACTORS
def test_decode_step_never_syncs(backend, options, freq_factors):
    model, cache, tokens = prefilled(backend, options, freq_factors, "cuda", torch.bfloat16)
    logits, _ = steps_without_syncs(model, cache, tokens, 3)
    assert torch.isfinite(logits).all()


@requires_cuda
@BACKENDS
@pytest.mark.usefixtures("poisoned_outputs")  # torch's deterministic mode
def test_decode_step_in_deterministic_mode(backend, options):
    """Under torch's deterministic mode, whose index_put_ CUDA runs by sorting (copying the whole
    destination where the index tensors stand apart: tests/host_waits.py), a decode step still
    never syncs, and allocates less than one layer's K (16 MiB here): no K or V buffer, host V
    through PCIe included, is copied whole."""
    model, cache, tokens = prefilled(backend, options, None, "cuda", torch.bfloat16, 1 << 15)
    layer_k = cache.k[0].nbytes  # [B, Hkv, S, D]: 2 x 2 x 32768 x 64 bfloat16
    logits, grew = steps_without_syncs(model, cache, tokens, 2)
    assert grew < layer_k, f"a step allocated {grew} bytes, a layer's K is {layer_k}"
    assert torch.isfinite(logits).all()


@BACKENDS
@FREQ_FACTORS
def test_decode_step_would_not_sync(backend, options, freq_factors):
    model, cache, tokens = prefilled(backend, options, freq_factors, "cpu", torch.float32)
    with torch.inference_mode(), host_waits() as waits:
        for _ in range(3):
            logits = model.decode(tokens[:, 0], cache)  # [B, V]
    assert waits.found == []
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("options", [KCacheOptions(), replace(KCacheOptions(), topn=8, reuse=32)],
                         ids=["default", "reuse"])
def test_a_recorded_decode_step_would_not_sync(options):
    """With ``record_mass`` on, the steps' records (the mass, the rows, the reuse counts), kept
    apart until finish_decode, are device ops too."""
    model, cache, tokens = prefilled("kcache", options, None, "cpu", torch.float32)
    cache.record_mass = True
    with torch.inference_mode(), host_waits() as waits:
        for _ in range(3):
            model.decode(tokens[:, 0], cache)
    assert waits.found == []
    assert not cache.attention_mass().isnan().any()  # recorded


@pytest.mark.parametrize("inference", [False, True], ids=["grad", "inference"])
def test_host_waits_finds_what_would_sync(inference):
    """The checker itself: each kind of op that would wait on the host on CUDA, or copy its whole
    destination in deterministic mode, is found, in and out of inference mode, and the same ops
    sized without values, or with their index tensors side by side, are not."""
    t, mask, repeats = torch.randn(5), torch.randn(5) > 0, torch.tensor([1, 2, 1, 1, 1])
    cache, row = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 4)  # [B, H, S, D], [B, H, D]
    rows, heads, pos = torch.arange(2), torch.arange(3), torch.tensor([5, 1])  # [B], [H], [B]
    with torch.inference_mode(inference), host_waits() as waits:
        t[mask]
        t.nonzero()
        t.masked_select(mask)
        t.unique()
        torch.equal(t, t)
        repeats.bincount()
        torch.repeat_interleave(t, repeats)
        t.index_put_((mask,), torch.tensor(1.0))
        kcache_ops.quantize_rows(torch.randn(2, 64), 2)  # no check_values: nothing to find
        cache[rows, :, pos] = row  # index tensors apart
        cache.transpose(1, 2)[rows, pos] = row  # a non-contiguous destination
        kcache_ops.gather_rows(torch.randn(1, 1, 4, 8), torch.zeros(1, 1, 2, dtype=torch.int32))
        with pytest.raises(AssertionError, match="read a tensor's values on the host"):
            t.sum().item()
        found = len(waits.found)
        t[torch.tensor([0, 2])]
        t.nonzero_static(size=5)
        torch.repeat_interleave(t, repeats, output_size=6)
        t.index_put_((torch.tensor([1]),), torch.tensor(2.0))
        cache[index_at(rows, heads, pos)] = row
        cache[:, :, pos] = 1.0  # one index tensor, not at the front
    assert len(waits.found) == found == 11, waits.found
    assert waits.found[-1] == "kcache_ops::gather_rows with check_values on"


@requires_cuda
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_a_transformers_decode_step_never_syncs():
    """A transformers model's decode step through a KCacheCache (kcache_ops.integrations), left
    padding and the step's mask given, as generate passes them: transformers' code included, no
    device->host synchronisation (its SDPA mask of a step read one; none is built now)."""
    pytest.importorskip("transformers")
    import kcache_ops.integrations.transformers as kt
    from test_transformers_integration import padded, random_prompts, tiny_model

    model = kt.enable(tiny_model("llama", seed=5)).to("cuda", torch.bfloat16)
    ids, mask = (x.cuda() for x in padded(random_prompts([9, 5])))  # [B, 9] each
    cache = kt.KCacheCache(model, 32)
    ones = torch.ones(2, 1, dtype=mask.dtype, device="cuda")  # [B, 1]
    with torch.no_grad():
        nxt = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, ones], -1)
        nxt = model(nxt, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()  # the first step outside: lazy initialisation
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                mask = torch.cat([mask, ones], -1)  # [B, T + 1]
                logits = model(nxt, attention_mask=mask, past_key_values=cache).logits
                nxt = logits[:, -1:].argmax(-1)  # [B, 1]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    model.set_attn_implementation("sdpa")
    assert torch.isfinite(logits).all()
