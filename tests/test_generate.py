"""Batched generation (greedy, sampled, EOS, streaming) and the ``generate`` command line."""
import argparse
from dataclasses import replace
import math
import re
import sys
from types import SimpleNamespace
import warnings

import numpy as np
import pytest
import torch

import kcache_ops.cli.generate as command
from kcache_ops.cli.progress import PrefillProgress
from kcache_ops.__main__ import main
from kcache_ops.model import load_model, pad_prompts
from kcache_ops.generate import generate, sample
from model_helpers import save_tiny_hf, save_tiny_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama with head dim 64 (the kcache ops need 64 or 128) and a tokenizer."""
    path = tmp_path_factory.mktemp("gen")
    save_tiny_hf(path, num_key_value_heads=2, head_dim=64)
    save_tiny_tokenizer(path, 96)
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    return load_model(folder, "cpu")


PROMPTS = [[5, 17, 30, 41, 8, 9, 60], [3], [70, 71, 72, 20]]


def test_batched_varlen_equals_one_by_one(loaded):
    model, _ = loaded
    batched = generate(model, PROMPTS, 12)
    for p, tokens in zip(PROMPTS, batched.tokens):
        assert generate(model, [p], 12).tokens[0] == tokens
    assert batched.decode_tokens == 3 * 11 and batched.prefill_s > 0 and batched.tokens_per_s > 0


def test_prefill_and_decode_times_split_the_run(loaded, monkeypatch):
    """prefill_s runs from the start to the first token, decode_s from there to the end: on a
    clock that ticks a second at each read (start, the first token, the end), one second each,
    not the decode counted from the start."""
    import types
    import kcache_ops.generate as gen
    ticks = iter(range(100))
    monkeypatch.setattr(gen, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    model, _ = loaded
    g = generate(model, [PROMPTS[0]], 4)
    assert (g.prefill_s, g.decode_s, g.decode_tokens) == (1.0, 1.0, 3)
    assert g.tokens_per_s == 3.0


def test_kcache_options_are_the_caches(loaded):
    """generate(backend="kcache", options=...) runs the cache those options make: its greedy
    tokens are a step-by-step loop's over make_cache with the same options (N = 2 of up to 18
    keys, so a cache with other options would pick other rows), and the cache it returns holds
    them."""
    from kcache_ops.caches import KCacheOptions, make_cache
    model, _ = loaded
    options = KCacheOptions(topn=2, tail="none", top_p=1.0, sinks=0, window=0)
    got = generate(model, PROMPTS, 12, backend="kcache", options=options)
    assert got.cache.options == options
    prompts, lens = pad_prompts(PROMPTS)  # [B, T], [B]
    cache = make_cache("kcache", model.config, len(PROMPTS), prompts.shape[1] + 12, "cpu",
                       model.dtype, options)
    nxt = model.prefill(prompts, lens, cache).argmax(-1)  # [B]
    want = [nxt]
    for _ in range(11):
        nxt = model.decode(nxt, cache).argmax(-1)  # [B]
        want.append(nxt)
    assert got.tokens == torch.stack(want, 1).tolist()
    assert got.tokens != generate(model, PROMPTS, 12, backend="kcache").tokens
    reused = generate(model, PROMPTS, 12, backend="kcache", options=replace(options, reuse=8),
                      reuse_stats=True)
    assert reused.tokens == got.tokens  # the same output, some rows from the pool
    assert 0 < reused.cache.reuse_hit_rate().nanmean() < 1


@pytest.mark.parametrize("backend, options", [
    ("dense", None), ("kcache", None),
    ("kcache", dict(topn=2, tail="mean", sinks=0, window=0)),
    ("kcache", dict(topn=2, tail="int4", reuse=8)),
    ("kcache", dict(topn=2, group_select=True, sinks=1, window=2))])
def test_torch_default_device_is_not_ours(folder, loaded, backend, options):
    """torch.set_default_device (gpt-fast builds its model under one) changes nothing of a CPU
    model's loading and generation: the library builds each tensor on the device it means. Here
    'meta' stands in for a GPU: a tensor built on the default device has no data, and fails."""
    from kcache_ops.caches import KCacheOptions
    from kcache_ops.eval import agreement
    options = None if options is None else KCacheOptions(**options)
    model, _ = loaded
    want = generate(model, PROMPTS, 6, backend=backend, options=options, temperature=0.8,
                    seed=3, reuse_stats=bool(options and options.reuse))
    torch.set_default_device("meta")
    try:
        reloaded, _ = load_model(folder, "cpu")
        got = generate(reloaded, PROMPTS, 6, backend=backend, options=options, temperature=0.8,
                       seed=3, reuse_stats=bool(options and options.reuse))
        tokens = torch.tensor(got.tokens, device="cpu")  # [B, 6]
        summary = agreement.summarize(tokens, tokens.flip(0))
    finally:
        torch.set_default_device(None)
    assert got.tokens == want.tokens and got.cache.device_bytes() == want.cache.device_bytes()
    assert summary["first_divergence_rows"][1] == 6  # the middle row, flipped, meets itself


def test_reuse_stats_are_opt_in(loaded):
    """With reuse, generate records what the pool found only when asked (``reuse_stats``: its
    counting ops run inside decode_s); asking without KCache's reuse, or not with a bool, is an
    error naming the argument."""
    from kcache_ops.caches import KCacheOptions
    model, _ = loaded
    options = KCacheOptions(topn=2, tail="none", top_p=1.0, sinks=0, window=0, reuse=8)
    plain = generate(model, PROMPTS, 4, backend="kcache", options=options)
    assert plain.cache.record_mass is False and plain.cache.reuse_hit_rate().isnan().all()
    counted = generate(model, PROMPTS, 4, backend="kcache", options=options,
                       reuse_stats=np.bool_(True))  # a flag of any type
    assert counted.tokens == plain.tokens and counted.cache.record_mass is True
    assert 0 < counted.cache.reuse_hit_rate().nanmean() <= 1
    for backend, opts in (("dense", None), ("kcache", None), ("kcache", replace(options, reuse=0))):
        with pytest.raises(ValueError, match=r"reuse_stats needs backend='kcache' with "
                                             r"options.reuse > 0, got backend='"):
            generate(model, PROMPTS, 2, backend=backend, options=opts, reuse_stats=True)
    with pytest.raises(ValueError, match="reuse_stats must be a bool, got 1"):
        generate(model, PROMPTS, 2, backend="kcache", options=options, reuse_stats=1)


def test_stop_on_eos_per_sequence(loaded):
    model, _ = loaded
    free = generate(model, PROMPTS, 10).tokens
    eos = free[0][3]
    stopped = generate(model, PROMPTS, 10, eos_ids=[eos]).tokens
    for full, cut in zip(free, stopped):
        assert cut == (full[:full.index(eos)] if eos in full else full)


def test_sampling_seeded_and_nucleus(loaded):
    model, _ = loaded
    first = generate(model, PROMPTS, 8, temperature=1.0, seed=1).tokens
    assert generate(model, PROMPTS, 8, temperature=1.0, seed=1).tokens == first
    assert generate(model, PROMPTS, 8, temperature=1.0, seed=2).tokens != first
    # a nucleus this small holds only the most likely token: greedy
    assert generate(model, PROMPTS, 8, temperature=1.0, top_p=1e-6, seed=3).tokens == \
        generate(model, PROMPTS, 8).tokens


def test_sample_keeps_to_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)  # [B, V]
    drawn = sample(logits, 1.0, 0.75, torch.Generator().manual_seed(0))       # [B]
    assert set(drawn.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are out
    assert sample(logits, 0.0).eq(0).all()


def test_top_k_keeps_to_the_k_most_likely(loaded):
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]])).expand(2000, 4)  # [B, V]
    drawn = sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0), top_k=2)  # [B]
    assert set(drawn.tolist()) == {1, 2}
    assert set(sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0), top_k=9).tolist()) \
        == {0, 1, 2, 3}  # k past the vocabulary: every token
    model, _ = loaded
    assert generate(model, PROMPTS, 8, temperature=1.0, top_k=1, seed=3).tokens == \
        generate(model, PROMPTS, 8).tokens  # the one most likely token: greedy
    with pytest.raises(ValueError, match="top_k must be None or an integer >= 1, got 0"):
        generate(model, PROMPTS, 8, temperature=1.0, top_k=0)


@pytest.mark.parametrize("temperature, top_p, top_k, want", [
    (1.0, 1.0, None, [0.1, 0.4, 0.3, 0.2]),
    (1.0, 1.0, 2, [0.0, 4 / 7, 3 / 7, 0.0]),  # the two most likely, renormalised
    (1.0, 0.75, None, [0.0, 4 / 9, 3 / 9, 2 / 9]),  # 0.4 + 0.3 < 0.75: 0.2 joins the nucleus
    (0.5, 1.0, None, [0.01 / 0.30, 0.16 / 0.30, 0.09 / 0.30, 0.04 / 0.30]),  # p^2, renormalised
])
def test_draw_frequencies(temperature, top_p, top_k, want):
    """The draws follow softmax(logits / T) over the top-k and the nucleus, renormalised: each
    token's frequency in 40000 seeded draws within 0.01 of its probability (about 4 standard
    errors), not only the set of tokens that can appear."""
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]])).expand(40000, 4)  # [B, V]
    drawn = sample(logits, temperature, top_p, torch.Generator().manual_seed(0), top_k)  # [B]
    freq = torch.bincount(drawn, minlength=4).double() / len(drawn)  # [V]
    torch.testing.assert_close(freq, torch.tensor(want, dtype=torch.float64), atol=0.01, rtol=0)


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-45])
def test_a_tiny_temperature_tends_to_the_argmax(temperature):
    """logits / T overflows to inf for a tiny T (the CLI takes any T >= 0): the draw is the
    argmax, not an error on a NaN probability."""
    logits = torch.randn(64, 500) * 10  # [B, V]
    drawn = sample(logits, temperature, 0.9, torch.Generator().manual_seed(0))  # [B]
    assert torch.equal(drawn, logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_infinite_logits_draw_a_token(dtype):
    """A +inf logit (float16's overflow) is drawn, sharing with any other +inf; a row of -inf is
    uniform: a token each time, not an error on a NaN probability."""
    inf = float("inf")
    logits = torch.tensor([[0.0, inf, 1.0, -inf], [inf, 2.0, inf, 0.0], [-inf] * 4],
                          dtype=dtype).repeat(1000, 1)  # [B, V]
    drawn = sample(logits, 1.0, 0.9, torch.Generator().manual_seed(0)).view(1000, 3)  # [., 3]
    assert set(drawn[:, 0].tolist()) == {1} and set(drawn[:, 1].tolist()) == {0, 2}
    assert set(drawn[:, 2].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_are_an_error(folder, temperature):
    """A model whose float16 activations overflow (its MLP weights scaled by 2e4, finite in
    float16) gives NaN logits: an error naming the sequence, the step and the dtype, not the
    empty text greedy argmax made of token 0, nor multinomial's RuntimeError."""
    model, _ = load_model(folder, "cpu", torch.float16)
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.up_proj.weight.mul_(2e4)
            layer.mlp.down_proj.weight.mul_(2e4)
    with pytest.raises(ValueError, match=r"generate: sequence 0's logits at new token 0 are NaN "
                                         r"\(a value overflowed in torch.float16; float32 or "
                                         r"bfloat16 have a wider range\)"):
        generate(model, PROMPTS, 4, temperature=temperature, seed=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_banned_tokens_stay_banned_at_a_high_temperature(dtype):
    """A -inf logit is never drawn, at any temperature: clamped to the dtype's largest, float16's
    -65504 / 1e5 drew it more often than the one allowed token."""
    inf = float("inf")
    logits = torch.tensor([[0.0, -inf, -inf, -inf], [-inf, 3.0, -inf, 1.0]],
                          dtype=dtype).repeat(500, 1)  # [B, V]
    for top_p, top_k in ((1.0, None), (0.99, 3)):
        drawn = sample(logits, 1e5, top_p, torch.Generator().manual_seed(0), top_k).view(500, 2)
        assert set(drawn[:, 0].tolist()) == {0} and set(drawn[:, 1].tolist()) == {1, 3}


def test_streaming_pieces_make_the_texts(loaded):
    model, tokenizer = loaded
    prompts = [tokenizer.encode("the t"), tokenizer.encode("ok")]
    pieces = ["", ""]

    def collect(i, text):
        pieces[i] += text
    result = generate(model, prompts, 15, tokenizer=tokenizer, on_text=collect)
    assert pieces == result.texts == [tokenizer.decode(t) for t in result.tokens]


def test_on_token_sees_each_new_token(loaded):
    """on_token: one call per new token, in order, EOS left out (a progress bar's count)."""
    model, tokenizer = loaded
    prompts = [tokenizer.encode("the t"), tokenizer.encode("ok")]
    first = generate(model, prompts, 6).tokens
    eos = first[1][2]  # the second sequence stops at its third token
    seen = [[], []]
    result = generate(model, prompts, 6, eos_ids=eos, on_token=lambda i, t: seen[i].append(t))
    assert seen == result.tokens and len(seen[1]) < len(first[1])


def test_prefill_progress_counts_the_layers_of_the_prefill_alone(loaded):
    """The command line's bar over a prefill: one count per layer of the next forward pass, then
    closed and its hooks removed, so the decode steps run none; removed too where the pass
    failed."""
    model, _ = loaded
    layers = model.config.num_layers
    counts = []
    with PrefillProgress(model) as progress:
        generate(model, PROMPTS, 4, on_token=lambda *_: counts.append(progress.bar.n))
        hooks = [len(layer._forward_hooks) for layer in model.layers]
    assert counts and set(counts) == {layers} and hooks == [0] * layers
    with pytest.raises(ValueError, match="need at least one prompt"), PrefillProgress(model):
        generate(model, [[]], 4)
    assert not any(layer._forward_hooks for layer in model.layers)
    stack = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])  # any model's layers
    with PrefillProgress(SimpleNamespace(layers=stack)) as progress:
        stack[1](torch.zeros(1))  # the bar starts at whichever layer runs first
        stack[0](torch.zeros(1))
    assert progress.bar.n == 2
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in stack)
    with PrefillProgress(SimpleNamespace(layers=torch.nn.ModuleList())) as progress:
        pass  # no layer: no bar
    assert progress.bar is None


def test_bad_arguments(loaded):
    model, tokenizer = loaded
    for kwargs in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0},
                   {"on_text": print}):
        with pytest.raises(ValueError):
            generate(model, PROMPTS, **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        generate(model, PROMPTS, 0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 2.5"):
        generate(model, PROMPTS, 2.5)
    with pytest.raises(ValueError, match=r"no empty one, got token counts \[1, 0\]"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match="a list of token id lists.*got list of \\['int'"):
        generate(model, [1, 2, 3], 4)  # one prompt, not wrapped in a list
    for ids in ([1.99, 2.99], [True, 2]):  # not truncated to 1, 2 nor taken as 1
        with pytest.raises(ValueError, match="prompt token ids must be integers"):
            generate(model, [ids], 4)
    for eos in ([96], ["2"], [-1]):
        with pytest.raises(ValueError, match=r"eos_ids must be token ids in \[0, 96\)"):
            generate(model, PROMPTS, 4, eos_ids=eos)
    with pytest.raises(ValueError, match=r"eos_ids .* got \[5, 96\]"):  # not [], read once
        generate(model, PROMPTS, 4, eos_ids=(i for i in (5, 96)))
    for temperature in (float("nan"), math.inf, 1e39, -1e-50, "1", None):  # 1e39: inf in float32
        with pytest.raises(ValueError, match="temperature must be a number >= 0, finite as a "
                                             "float32, got"):
            generate(model, PROMPTS, 4, temperature=temperature, top_k=5)
    for top_p in (0, 1.5, float("nan"), None, "0.5", [0.5]):
        with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\], got"):
            generate(model, PROMPTS, 4, temperature=1.0, top_p=top_p)
    with pytest.raises(ValueError, match="eos_ids must be token ids .* got 2.5"):
        generate(model, PROMPTS, 4, eos_ids=2.5)
    for name in ("on_token", "on_text"):  # refused before the prefill, not at the first token
        with pytest.raises(ValueError, match=f"{name} must be None or a callable .*, got 5$"):
            generate(model, PROMPTS, 4, tokenizer=tokenizer, **{name: 5})


def test_prompts_not_a_list_are_a_value_error(loaded):
    """prompts that are not iterable (an int, None, a 0-d tensor) are the documented ValueError
    naming their type, not a bare TypeError from iterating them."""
    model, _ = loaded
    for prompts, got in ((5, "int"), (None, "NoneType"), (torch.tensor(3), "a 0-D tensor"),
                         (torch.tensor([3, 4]), "a 1-D tensor"), ("abc", "str")):
        with pytest.raises(ValueError, match=f"prompts must be a list of token id lists .*, got "
                                             f"{got}$"):
            generate(model, prompts, 2)


def test_eos_ids_default_to_the_tokenizers(loaded):
    """Given a tokenizer, generate stops at its eos_ids unless told otherwise (it never stopped,
    unlike the command line); without one, it stops at none."""
    import copy
    model, tokenizer = loaded
    free = generate(model, PROMPTS, 10).tokens
    tok = copy.copy(tokenizer)
    tok.eos_ids = (free[0][3],)
    stopped = generate(model, PROMPTS, 10, eos_ids=tok.eos_ids).tokens
    assert stopped != free
    assert generate(model, PROMPTS, 10, tokenizer=tok).tokens == stopped
    assert generate(model, PROMPTS, 10, tokenizer=tok, eos_ids=()).tokens == free


def test_ids_of_any_integer_type(loaded):
    """Token ids and EOS ids as NumPy integers or 0-d tensors are the same ids (a set of 0-d
    tensors never matched a sampled id, so generation ran past EOS)."""
    model, _ = loaded
    free = generate(model, PROMPTS, 10).tokens
    eos = free[0][3]
    want = generate(model, PROMPTS, 10, eos_ids=[eos]).tokens
    for ids in (torch.tensor([eos]), np.array([eos]), [np.int64(eos)]):
        assert generate(model, PROMPTS, 10, eos_ids=ids).tokens == want
    assert generate(model, PROMPTS, 10, eos_ids=np.int64(eos)).tokens == want  # one id
    prompts = [[np.int64(t) for t in p] for p in PROMPTS]
    assert generate(model, prompts, 10).tokens == free
    for count in (np.int64(10), torch.tensor(10)):  # max_new_tokens of any integer type
        assert generate(model, PROMPTS, count).tokens == free
    assert generate(model, PROMPTS, 10, temperature=1.0, top_k=np.int64(1), seed=0).tokens == free
    assert generate(model, (p for p in PROMPTS), 10).tokens == free  # any iterable, read once
    same_length = torch.tensor([p[:1] for p in PROMPTS])  # [B, 1]: B prompts
    assert generate(model, same_length, 10).tokens == generate(model, same_length.tolist(),
                                                               10).tokens
    assert generate(model, [np.array(p) for p in PROMPTS], 10).tokens == free
    assert generate(model, [torch.tensor(p) for p in PROMPTS], 10).tokens == free


def test_seed_of_any_integer_type_and_range(loaded):
    """A seed is an integer of any type in the range torch.Generator.manual_seed takes, [-2^63,
    2^64); anything else is a ValueError naming it (before: a TypeError for a NumPy integer, a
    RuntimeError for a 0-d tensor or a float, an overflow message naming nothing past the
    range)."""
    model, _ = loaded
    want = generate(model, PROMPTS, 4, temperature=1.0, seed=3).tokens
    for seed in (np.int64(3), torch.tensor(3), np.array(3)):
        assert generate(model, PROMPTS, 4, temperature=1.0, seed=seed).tokens == want
    for seed in (-(1 << 63), (1 << 64) - 1):
        generate(model, PROMPTS, 1, temperature=1.0, seed=seed)
    for seed in (1 << 64, -(1 << 63) - 1, 1.5, True, "3", torch.tensor([3])):
        with pytest.raises(ValueError, match=r"seed must be None or an integer in \[-2\^63, "
                                             r"2\^64\) .*, got"):
            generate(model, PROMPTS, 1, temperature=1.0, seed=seed)


def test_sample_checks_its_arguments():
    """sample, public, checks what generate checks (the same function): a negative temperature
    drew the least likely token, top_k 0 or -3 failed deep in torch, top_p 2 was taken. Numbers
    of any type are taken."""
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))  # [B, V]
    for kwargs, message in [({"temperature": -1.0}, "temperature must be a number >= 0"),
                            ({"temperature": math.inf}, "temperature must be a number >= 0"),
                            ({"temperature": "1"}, "temperature must be a number >= 0"),
                            ({"temperature": 1.0, "top_k": 0}, "top_k must be None or an "
                                                               "integer >= 1, got 0"),
                            ({"temperature": 1.0, "top_k": -3}, "top_k .* got -3"),
                            ({"temperature": 1.0, "top_k": 1.5}, "top_k .* got 1.5"),
                            ({"temperature": 1.0, "top_p": 2.0}, r"top_p must be a number in "
                                                                 r"\(0, 1\], got 2.0"),
                            ({"temperature": 1.0, "top_p": 0}, r"top_p .* got 0")]:
        with pytest.raises(ValueError, match=message):
            sample(logits, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for temperature in (np.float32(0.5), torch.tensor(0.5), 1):
        assert sample(logits, temperature, torch.tensor(0.5), gen, np.int64(1)).tolist() == [0]
    assert sample(logits, torch.tensor(0.0)).tolist() == [0]
    for bad, got in ((logits[0], r"shape \[3\] torch.float32"),  # IndexError before
                     (logits[:, :0], r"shape \[1, 0\]"),
                     (logits[None], r"shape \[1, 1, 3\]"),  # a size mismatch with top_k
                     (logits.long(), r"shape \[1, 3\] torch.int64"), ([[0.1, 0.2]], "list")):
        for temperature in (0.0, 1.0):  # greedy returned a 0-d tensor for a 1-D one
            with pytest.raises(ValueError, match=f"logits must be a .B, V. floating-point tensor "
                                                 f"with V >= 1, got {got}"):
                sample(bad, temperature, top_k=2)


def test_sample_refuses_nan_logits_where_it_draws():
    """A NaN logit leaves no distribution to draw from: sampling refuses it, naming the rows (on
    CUDA torch.multinomial would meet it as a device-side assert, and the CPU's error named
    neither the rows nor the cause); greedy takes an argmax as before."""
    nan = float("nan")
    logits = torch.tensor([[0.0, 1.0], [nan, 0.0], [2.0, nan]])  # [B, V]
    for top_p, top_k in ((1.0, None), (0.5, None), (1.0, 1)):
        with pytest.raises(ValueError, match=r"logits of row\(s\) \[1, 2\] hold NaN"):
            sample(logits, 1.0, top_p, top_k=top_k)
    assert sample(logits, 0.0).shape == (3,)
    assert sample(logits[:1], 1.0).tolist() in ([0], [1])


def test_float32_zero_temperature_or_top_p_is_greedy(loaded):
    """A temperature or a top_p that is 0 in float32 (1e-300, 1e-50) gives the greedy tokens,
    not a multinomial error on a NaN or all-zero distribution."""
    model, _ = loaded
    greedy = generate(model, PROMPTS, 6).tokens
    assert generate(model, PROMPTS, 6, temperature=1e-300, seed=0).tokens == greedy
    assert generate(model, PROMPTS, 6, temperature=1.0, top_p=1e-50, seed=0).tokens == greedy


def test_cli_says_when_a_sequence_ended_at_end_of_sequence(folder, capsys, monkeypatch):
    """A sequence that ends at an end-of-sequence token is said so in the summary (one that ended
    at once printed nothing and "decode 0 more", with no word of why)."""
    from kcache_ops.caches import make_cache
    from kcache_ops.generate import Generation
    args = ["generate", "--model", str(folder), "--prompt", "a", "--prompt", "b",
            "--max-new-tokens", "3"]
    for tokens, said in (([[], [5, 6, 7]], "; 1 of 2 ended at an end-of-sequence token\n"),
                         ([[5, 6, 7], [5, 6, 7]], " tokens/s\n")):
        monkeypatch.setattr(command, "generate", lambda model, *a, **k: Generation(
            tokens, ["", ""], 0.1, 0.2, 4,
            make_cache("dense", model.config, 2, 8, "cpu", torch.float32)))
        assert main(args) == 0
        assert said in capsys.readouterr().err


def test_cli_passes_its_flags_on(folder, capsys, monkeypatch):
    """Each flag reaches what it sets: --device and --dtype the model loaded, the sampling flags,
    --max-new-tokens, --backend and the cache options generate (a flag parsed and dropped
    leaves a run that still works, with the defaults)."""
    from kcache_ops.caches import make_cache
    from kcache_ops.generate import Generation
    seen = {}

    def load(path, device, dtype):
        seen["load"] = (device, dtype)
        return load_model(path, device, dtype)

    def fake_generate(model, prompts, max_new_tokens, **kwargs):
        seen.update(kwargs, max_new_tokens=max_new_tokens, dtype=model.dtype)
        return Generation([[5]], ["x"], 0.1, 0.2, 0, make_cache("dense", model.config, 1, 8,
                                                               "cpu", model.dtype))
    monkeypatch.setattr(command, "load_model", load)
    monkeypatch.setattr(command, "generate", fake_generate)
    assert main(["generate", "--model", str(folder), "--prompt", "a", "--device", "cpu",
                 "--dtype", "bfloat16", "--max-new-tokens", "4", "--temperature", "0.7",
                 "--top-p", "0.9", "--top-k", "5", "--seed", "3", "--backend", "kcache",
                 "--topn", "4"]) == 0
    assert seen["load"] == (torch.device("cpu"), torch.bfloat16)
    assert seen["dtype"] == torch.bfloat16 and seen["max_new_tokens"] == 4
    assert {k: seen[k] for k in ("temperature", "top_p", "top_k", "seed", "backend")} == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 3, "backend": "kcache"}
    assert seen["options"].topn == 4


def test_cli_dense_and_kcache(folder, capsys):
    # on the CPU where a GPU is there too (the CLI's default): the lines below name the device
    args = ["generate", "--model", str(folder), "--prompt", "the t", "--max-new-tokens", "6",
            "--chat", "--device", "cpu"]
    assert main(args) == 0
    dense = capsys.readouterr()
    assert "tokens/s" in dense.err and "dense on cpu float32" in dense.err
    assert re.search(r"prefill: \d+ prompt tokens \(1 sequence\) on cpu\n", dense.err)
    assert re.search(r"prefill: +0%.* 0/2 ", dense.err)  # the bar of its layers
    assert main(args + ["--backend", "kcache", "--topn", "4", "--dense-layers", "0"]) == 0
    kcache = capsys.readouterr()
    assert "kcache on cpu" in kcache.err and "MiB host memory" in kcache.err
    assert "reuse" not in kcache.err
    assert main(args + ["--backend", "kcache", "--topn", "4", "--reuse", "16", "--sinks", "0",
                        "--window", "0"]) == 0
    assert re.search(r"reuse: \d+% of the V rows a step read came from the device pool \(16 "
                     r"rows per KV head\), \d+\.\d KiB", capsys.readouterr().err)
    assert main(args + ["--backend", "kcache", "--topn", "4", "--reuse", "16"]) == 0  # all hot
    assert "reuse: no decode step read a V row from host RAM" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "--prompt", "a", "--prompt", "bc d",
                 "--max-new-tokens", "3", "--temperature", "0.8", "--top-k", "5", "--seed",
                 "1"]) == 0
    assert capsys.readouterr().out.count("--- [") == 2
    capsys.readouterr()
    for flags in (["--top-k", "5"], ["--top-p", "0.9", "--top-k", "5"], ["--seed", "1"],
                  ["--top-k", "5", "--seed", "0"]):  # greedy: no effect
        assert main(["generate", "--model", str(folder), "--prompt", "a", *flags]) == 2
        assert re.search(r"^error: --(top-|seed).* to sampling; give --temperature > 0",
                         capsys.readouterr().err)
    assert main(["generate", "--model", str(folder), "--prompt", "a", "--topn", "8"]) == 2
    assert capsys.readouterr().err.startswith("error: --topn applies to --backend kcache only")
    assert main(["generate", "--model", str(folder), "--prompt", "a", "--tail", "int4", "--topn",
                 "8"]) == 2
    assert capsys.readouterr().err.startswith("error: --topn, --tail apply to --backend kcache")
    assert main(["generate", "--model", str(folder / "missing.gguf"), "--prompt", "a"]) == 2
    assert capsys.readouterr().err.startswith("error: no such model file or folder")


def test_past_the_trained_positions_warns(loaded):
    """Generating past max_position_embeddings runs (RoPE has no hard limit) but warns, at the
    caller's line; up to it (the last new token is sampled, never run) it does not."""
    model, _ = loaded
    trained = model.config.max_position_embeddings
    with pytest.warns(UserWarning, match=f"runs past the {trained} positions") as record:
        generate(model, [[5] * (trained - 1)], 3)
    assert record[0].filename == __file__  # the caller's line, not torch.no_grad's wrapper
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, [[5] * (trained - 2)], 3)  # positions 0 .. trained - 1


def test_token_ids_outside_the_vocabulary(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 96\).*\[1000000\]"):
        generate(model, [[5, 10**6]], 2)


def test_cli_reports_the_pool_it_used_and_no_rate_without_a_step(folder, capsys):
    """generate names the reuse pool it used: --reuse past what the cache can hold is capped (it
    printed the asked-for 100000 rows); with one new token (the prefill's) it says no decode step
    ran (it printed 0.0 tokens/s)."""
    args = ["generate", "--model", str(folder), "--prompt", "the t", "--device", "cpu"]
    assert main(args + ["--max-new-tokens", "6", "--backend", "kcache", "--topn", "4", "--reuse",
                        "100000", "--sinks", "0", "--window", "0"]) == 0
    err = capsys.readouterr().err
    pool = re.search(r"\((\d+) rows per KV head; --reuse 100000 capped: more slots than the "
                     r"(\d+)-token cache would stay empty\)", err)
    assert pool and int(pool[1]) < 100000
    assert main(args + ["--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "(the first new token); no decode step" in err and "tokens/s" not in err


def test_cli_threads(folder):
    """--threads (any command's) sets torch's CPU threads before the command runs."""
    threads = 1 if torch.get_num_threads() > 1 else 2  # not what torch has now
    assert main(["generate", "--model", str(folder), "--prompt", "a", "--max-new-tokens", "2",
                 "--device", "cpu", "--threads", str(threads)]) == 0
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "expected an integer >= 1"),
    (["generate", "--prompt", "hi", "--temperature", "nan"],
     r"expected a finite number in \[0.0, inf\)"),
    (["generate", "--prompt", "hi", "--temperature", "inf"],
     r"expected a finite number in \[0.0, inf\), got 'inf'"),
    (["generate", "--prompt", "hi", "--temperature", "1e39"],  # infinite in float32
     r"expected a number >= 0 that is finite as a float32 \(at most 3.4028235e\+38\), got "
     r"'1e39'"),
    (["generate", "--prompt", "hi", "--top-p", "0"], r"expected a finite number in \(0.0, 1.0\]"),
    (["generate", "--prompt", "hi", "--top-k", "0"], "expected an integer >= 1, got '0'"),
    (["generate", "--prompt", "hi", "--seed", str(1 << 64)], r"--seed: expected an integer in "),
    (["demo", "--prompt-tokens", "-5"], "expected an integer >= 1, got '-5'"),
    (["demo", "--depth", "2"], r"expected a finite number in \[0.0, 1.0\], got '2'"),
    (["bench", "--small", "--steps", "0"], "expected an integer >= 1"),
    (["generate", "--prompt", "hi", "--backend", "kcache", "--tail", "int3"],
     r"--tail: invalid choice: 'int3' \(choose from 'none', 'mean', 'int2', 'int4'\)"),
    (["eval", "--quick", "--gpu-sizes"], "--gpu-sizes: not allowed with argument --quick"),
    (["eval", "--tails", "int3"], r"argument --tails: expected comma-separated values of none"),
    (["bench", "--small", "--budget", "-1"], r"expected a finite number in \(0.0, 1000000000.0\]"),
    (["bench", "--small", "--budget", "1e300"], r"\(0.0, 1000000000.0\], got '1e300'"),
    (["bench", "--small", "--reserve", "1e300"], r"\[0.0, 1000000000.0\], got '1e300'"),
    (["bench", "--small", "--contexts", "0"], "expected comma-separated integers >= 1"),
    (["bench", "--small", "--dense-layers", "1,,2"], "expected comma-separated integers, got "
                                                     "'1,,2'"),
    (["eval", "--needle-lengths", "200,200"], "integers >= 1, each once, got '200,200'"),
    (["eval", "--threads", str(2 ** 31)], r"expected an integer in \[1, 1024\]"),
    (["generate", "--prompt", "hi", "--threads", "0"], "--threads: expected an integer >= 1"),
    (["demo", "--threads", "2000"], r"--threads: expected an integer in \[1, 1024\]"),
    (["bench", "--small", "--threads", "x"], "--threads: expected an integer"),
    (["eval", "--quick", "--prefill", "0"], "expected an integer >= 1"),
    (["generate", "--prompt", "hi", "--device", "tpu"], "expected cpu, cuda or cuda:N, got 'tpu'"),
    (["bench", "--small", "--device", "cuda:64"],
     r"'cuda:64': this machine has \d+ CUDA device\(s\) torch can use"),
])
def test_cli_bad_values_are_usage_errors(argv, message, capsys):
    """A value a flag cannot take is refused by the flag's parser, before any model loads."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt-file", "/nonexistent/prompt.txt"],
     "--prompt-file /nonexistent/prompt.txt: No such file or directory"),
    (["generate", "--prompt-file", "{tmp_path}"], "--prompt-file {tmp_path}: Is a directory"),
    (["generate", "--prompt-file", ""], "--prompt-file : No such file or directory"),
    # an empty prompt, before the model loads (a missing one here), naming the flag
    (["generate", "--model", "{missing}", "--prompt", ""], "--prompt is empty"),
    (["generate", "--model", "{missing}", "--prompt", "a", "--prompt", ""], "--prompt 2 is empty"),
    (["generate", "--model", "{missing}", "--prompt-file", "{empty}"], "{empty} is empty"),
    (["bench", "--small", "--models", "nosuch"], "--models: unknown nosuch; known: "),
    (["bench", "--small", "--dense-layers", "9"], "dense_layers [9] out of range"),
    (["generate", "--prompt-file", "{latin1}"], "{latin1} is not UTF-8 text"),
    (["generate", "--prompt", "caf\udce9"], "--prompt 'caf\\udce9' is not UTF-8 text"),
    (["bench", "--small", "--topn", "0"], "topn must be an integer >= 1, got 0"),
    (["generate", "--prompt", "hi", "--backend", "kcache", "--attn-top-p", "0"],
     "KCache: top_p (--attn-top-p) must be a number in (0, 1]"),  # not generate's --top-p
    (["bench", "--device", "cpu"], "give --budget (GB) on the CPU, or --small"),
])
def test_cli_bad_input_is_an_error_line(argv, message, capsys, tmp_path):
    """Bad input found past the flags (a file, a name, options a model shape cannot take) gives
    one ``error:`` line and exit 2, before any work, not a traceback."""
    latin1, empty = tmp_path / "latin1.txt", tmp_path / "empty.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    empty.write_bytes("\ufeff".encode("utf-8"))  # a BOM only
    names = dict(latin1=latin1, empty=empty, tmp_path=tmp_path, missing=tmp_path / "missing")
    argv = [a.format(**names) for a in argv]
    message = message.format(**names)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("backend, owner", [("kcache", "KCache"), ("dense", "DenseCache")])
def test_cli_caches_beyond_memory_are_an_error_line(folder, capsys, backend, owner):
    """A cache larger than the host's memory (10^12 new tokens) gives the cache's own error, the
    bytes asked for, as one ``error:`` line and exit 2, not a traceback (the dense cache, the
    default backend, had no check), then what its capacity is made of (it named the capacity
    alone, a number the user never gave)."""
    argv = ["generate", "--model", str(folder), "--prompt", "the t", "--backend", backend,
            "--max-new-tokens", str(10**12)]
    with pytest.warns(UserWarning, match="runs past the 256 positions"):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.match(rf"error: generate: {owner}: .* bytes.* \(the capacity is the longest "
                    rf"prompt, 4 tokens, \+ max_new_tokens, {10**12}\)$",
                    err.splitlines()[-1])  # after the loading bar
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--dense-layers", "5"], r"dense_layers \[5\] out of range"),
    (["--topn", "4", "--reuse", "2"], "reuse must hold the rows of a whole step"),
])
def test_cli_refuses_options_the_model_cannot_take_before_the_prefill(folder, capsys, flags,
                                                                      message):
    """--dense-layers past the model's 2 layers, or a reuse pool below a step's rows, is one
    error line before the prefill is announced (the error came from the cache after "prefill:
    ... prompt tokens", as if the prefill had begun)."""
    assert main(["generate", "--model", str(folder), "--prompt", "the t", "--backend", "kcache",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err.splitlines()[-1]) and "prefill:" not in err


@pytest.mark.filterwarnings("ignore:.*is not a token of the vocabulary")  # its tiny vocabulary
def test_cli_prompt_of_no_token_is_an_error_line(folder, capsys, tmp_path):
    """A prompt none of whose characters the tokenizer knows (a BPE without an unknown token
    drops them) is refused naming the flag ("token counts [0]" before)."""
    import shutil
    import tokenizers
    shutil.copytree(folder, tmp_path / "m")
    tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1}, [])).save(
        str(tmp_path / "m" / "tokenizer.json"))
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "zzz"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "error: --prompt encodes to no token (none of its characters is in the tokenizer's "
        "vocabulary)")


def test_cli_prompt_file_drops_a_bom(folder, monkeypatch, tmp_path):
    """A prompt file saved with a UTF-8 BOM (Windows editors) is the same prompt as without."""
    seen = []

    def load(*args):  # load_model, with a tokenizer that records the prompts it encodes
        model, tokenizer = load_model(*args)
        tokenizer.encode_prompt = lambda text, chat: seen.append(text) or tokenizer.encode(text)
        return model, tokenizer
    monkeypatch.setattr(command, "load_model", load)
    for name, text in (("plain.txt", "the t"), ("bom.txt", "\ufeffthe t")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert main(["generate", "--model", str(folder), "--prompt-file", str(tmp_path / name),
                     "--max-new-tokens", "1"]) == 0
    assert seen == ["the t", "the t"]


def test_cli_one_new_token_with_reuse(folder, capsys):
    """With no decode step (one new token), the reuse line says so, not that no step read the
    host; one prompt is "1 sequence"."""
    assert main(["generate", "--model", str(folder), "--prompt", "the t", "--max-new-tokens", "1",
                 "--backend", "kcache", "--topn", "4", "--reuse", "16"]) == 0
    err = capsys.readouterr().err
    assert "(1 sequence)" in err and "reuse: no decode step ran\n" in err


def test_cli_chat_without_a_template_warns(folder, tmp_path):
    """--chat on a model without a chat template says that the prompt is used as plain text."""
    import json
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.warns(UserWarning, match="--chat: the model has no chat template; the prompt is "
                                         "used as plain text"):
        assert main(["generate", "--model", str(tmp_path), "--prompt", "a", "--chat",
                     "--max-new-tokens", "1"]) == 0


@pytest.mark.parametrize("error, code, err", [(KeyboardInterrupt, 130, "\ninterrupted\n"),
                                              (BrokenPipeError, 141, "")])
def test_cli_interrupted_or_piped_is_quiet(monkeypatch, capsys, error, code, err):
    """Ctrl-C ends a command with "interrupted" and 130, a reader of stdout that left (`| head`)
    quietly with 141 (128 + SIGPIPE): no traceback, nor "error: [Errno 32] Broken pipe"."""

    def run(args):
        raise error()
    monkeypatch.setattr(command, "run", run)
    format_warning = warnings.formatwarning
    assert main(["generate", "--prompt", "a"]) == code
    assert capsys.readouterr().err == err
    assert warnings.formatwarning is format_warning  # main's one-line warnings end with it


@pytest.mark.parametrize("error", [
    ImportError("loading a GGUF file needs the gguf package: pip install gguf"),
    PermissionError(13, "Permission denied", "/models/m.gguf"),
    MemoryError("KCache: 2 cache tensors of 80 GiB do not fit the host's memory"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")],
    ids=["import", "os", "memory", "cuda-memory"])
def test_cli_names_a_missing_package_an_unreadable_file_or_memory(monkeypatch, capsys, error):
    """An optional package a file needs and the machine lacks (gguf, for a GGUF model), a file
    the command cannot read, or memory the host or the GPU lacks, ends the command with its
    message and 2, not a traceback."""

    def run(args):
        raise error
    monkeypatch.setattr(command, "run", run)
    assert main(["generate", "--prompt", "a"]) == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_cli_value_types_at_their_bounds(monkeypatch):
    """--seed takes any seed torch.Generator does, [-2^63, 2^64); cuda:N names a GPU below the
    machine's count (one GPU here: cuda:0, not cuda:1); the other ranges take their closed
    ends."""
    from kcache_ops.cli import args as cli_args
    assert cli_args.seed("-1") == -1 and cli_args.seed(str(-(1 << 63))) == -(1 << 63)
    assert cli_args.seed(str((1 << 64) - 1)) == (1 << 64) - 1
    for refused in (str(-(1 << 63) - 1), str(1 << 64)):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_args.seed(refused)
    monkeypatch.setattr(cli_args, "cuda_count", lambda: 1)
    assert cli_args.device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(argparse.ArgumentTypeError, match="'cuda:1': this machine has 1 CUDA"):
        cli_args.device("cuda:1")
    # the closed ends of the other ranges: --threads 1024, --top-p 1 (no nucleus), a count >= 0
    assert cli_args.thread_count("1024") == 1024 and cli_args.nonnegative_int("0") == 0
    assert cli_args.bounded_float(0.0, 1.0, low_open=True)("1") == 1.0
    for refused in ("1025", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_args.thread_count(refused)
    # a list of contexts or N gives each once (a value twice would run twice)
    assert cli_args.positive_int_list("256,512") == (256, 512)
    with pytest.raises(argparse.ArgumentTypeError, match="each once, got '256,256'"):
        cli_args.positive_int_list("256,256")
    # eval's --dense-layers names at least one layer ('' is none for the KCache flag)
    with pytest.raises(argparse.ArgumentTypeError, match="layer indices, at least one, got ''"):
        cli_args.layer_list("")


def test_the_default_device_is_cuda_where_available(monkeypatch):
    """With no --device the commands (and load_model) run on CUDA where torch has it, else on
    the CPU (checked without a GPU: the answer is torch.cuda.is_available's)."""
    from kcache_ops.devices import default_device
    for available, want in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        assert default_device() == torch.device(want), f"is_available() {available}"


@pytest.mark.parametrize("argv0, prog", [("/venv/bin/kcache-ops", "kcache-ops"),
                                          ("/src/kcache_ops/__main__.py", "python -m kcache_ops")])
def test_usage_names_the_command_as_called(monkeypatch, capsys, argv0, prog):
    """Usage and errors name the command as the user called it: pip's kcache-ops script, or
    python -m kcache_ops (the script's said python -m kcache_ops)."""
    from kcache_ops.__main__ import cli
    monkeypatch.setattr(sys, "argv", [argv0, "generate", "--nope"])
    with pytest.raises(SystemExit):
        cli()
    assert capsys.readouterr().err.startswith(f"usage: {prog} generate [-h]")


# python -m kcache_ops, and what pip's kcache-ops script runs (setup.py's console_scripts)
LAUNCHERS = {"module": ["-m", "kcache_ops"],
             "script": ["-c", "import sys; from kcache_ops.__main__ import cli; sys.exit(cli())"]}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_cli_process_warnings_and_a_closed_pipe(folder, launcher):
    """In the process: a warning is one "warning: " line (no source path nor code line), and
    stdout's reader leaving ends it quietly (no traceback at the write, nor at exit's flush),
    also where two prompts' texts wait in a buffered stdout until the end."""
    import os
    import subprocess
    argv = [sys.executable, *LAUNCHERS[launcher], "generate", "--model", str(folder),
            "--prompt", "a " * 200, "--prompt", "b", "--max-new-tokens", "4"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    proc.stdout.close()  # the reader leaves before the first token
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert len(lines) == 1 and re.search(r"^warning: generate: prompt \(\d+ tokens\) \+ "
                                         r"max_new_tokens \(4\) runs past the 256 positions",
                                         lines[0].split("\r")[-1]), err
    assert "Traceback" not in err and "Broken pipe" not in err and "Exception" not in err
