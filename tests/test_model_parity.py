"""The decoder's logits against transformers' on the same weights, and the cached paths against
the decoder's own full-sequence forward."""
import pytest
import torch

from kcache_ops.caches import make_cache
from kcache_ops.model.hf import load_hf_model
from kcache_ops.model.llama import float32_logits
from model_helpers import LLAMA3_ROPE, save_tiny_hf

VARIANTS = {
    "mha": ("llama", {}),
    "gqa": ("llama", {"num_key_value_heads": 2}),
    "llama3_rope": ("llama", {"num_key_value_heads": 1, "rope_parameters": LLAMA3_ROPE}),
    "tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2_bias": ("qwen2", {"num_key_value_heads": 2}),
    "llama_bias": ("llama", {"num_key_value_heads": 2, "attention_bias": True}),  # O's too
}


@pytest.fixture(params=list(VARIANTS), scope="module")
def pair(request, tmp_path_factory):
    """(transformers model, our model) on the same random weights."""
    variant, overrides = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    oracle = save_tiny_hf(path, variant, **overrides)
    return oracle, load_hf_model(str(path), "cpu", torch.float32)


def test_forward_matches_transformers(pair):
    oracle, model = pair
    tokens = torch.randint(0, 96, (2, 40))                                   # [B, T]
    with torch.no_grad():
        expected = oracle(tokens).logits                                     # [B, T, V]
        got = model(tokens)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rmsnorm_rounds_as_transformers_in_16_bits(dtype):
    """A 16-bit model's norm gives transformers' bits: normalised in float32, rounded to the
    input's dtype, then times the weight (the parity tests above run float32, where the order of
    the rounding and the product changes nothing; in bfloat16 it changes ~28% of the outputs)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from kcache_ops.model.llama import RMSNorm
    ours, theirs = RMSNorm(256, 1e-6), LlamaRMSNorm(256, eps=1e-6)
    weight = 1 + 0.1 * torch.randn(256)                                      # [E]
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    x = torch.randn(4, 256).to(dtype)                                        # [B, E]
    assert torch.equal(ours.to(dtype)(x), theirs.to(dtype)(x))


def test_prefill_decode_match_forward(pair):
    """Batched varlen prefill, then decode steps: logits equal forward() on each sequence. The
    pads are don't-care, ids outside the vocabulary too."""
    _, model = pair
    lens = [7, 12, 3]
    steps = 6
    full = [torch.randint(0, 96, (n + steps,)) for n in lens]                # per-sequence tokens
    prompts = torch.full((3, max(lens)), -1)                                 # [B, T] right-padded
    prompts[2, -1] = 10**6
    for b, n in enumerate(lens):
        prompts[b, :n] = full[b][:n]
    cache = make_cache("dense", model.config, 3, max(lens) + steps, model.device, model.dtype)
    with torch.no_grad():
        got = [model.prefill(prompts, torch.tensor(lens, dtype=torch.int32), cache)]  # [B, V]
        for s in range(steps):
            nxt = torch.stack([full[b][n + s] for b, n in enumerate(lens)])  # [B]
            got.append(model.decode(nxt, cache))
        for b, n in enumerate(lens):
            ref = model(full[b][None])[0]                                    # [T_b, V]
            for s in range(steps + 1):
                torch.testing.assert_close(got[s][b], ref[n - 1 + s], atol=2e-5, rtol=1e-4)
    assert cache.seq_lens.tolist() == [n + steps for n in lens]


def test_a_loaded_model_builds_no_autograd_graph(pair):
    """Called outside no_grad, as the README's example does, prefill and decode build no
    autograd graph through the cache (it would grow every step)."""
    _, model = pair
    assert not any(p.requires_grad for p in model.parameters())
    cache = make_cache("dense", model.config, 1, 8, model.device, model.dtype)
    logits = model.prefill(torch.randint(0, 96, (1, 4)), torch.tensor([4], dtype=torch.int32),
                           cache)  # [1, V]
    logits = model.decode(logits.argmax(-1), cache)  # [1, V]
    assert not logits.requires_grad and not cache.k[0].requires_grad


def test_prefill_leaves_lens_alone(pair):
    _, model = pair
    lens = torch.tensor([3, 5], dtype=torch.int32)
    cache = make_cache("dense", model.config, 2, 8, model.device, model.dtype)
    with torch.no_grad():
        model.prefill(torch.randint(0, 96, (2, 5)), lens, cache)
        model.decode(torch.tensor([1, 2]), cache)
    assert lens.tolist() == [3, 5] and cache.seq_lens.tolist() == [4, 6]


def test_prefill_refuses_an_empty_prompt(pair):
    """A prompt of 0 tokens has no last token to give logits for: an error, not the logits of a
    padded position (all_logits, which returns every position, takes it)."""
    _, model = pair
    cache = make_cache("dense", model.config, 2, 8, model.device, model.dtype)
    tokens, lens = torch.randint(0, 96, (2, 5)), torch.tensor([3, 0], dtype=torch.int32)
    with torch.no_grad(), pytest.raises(ValueError, match=r"lens must be in \[1, 5\].*a token "
                                        r"to predict from.*\[3, 0\]"):
        model.prefill(tokens, lens, cache)
    with torch.no_grad(), pytest.raises(ValueError, match=r"tokens of T = 0 give no token to "
                                        r"predict from"):
        model.prefill(tokens[:, :0], torch.zeros(2, dtype=torch.int32), cache)
    cache = make_cache("dense", model.config, 2, 8, model.device, model.dtype)
    with torch.no_grad():
        assert model.prefill(tokens, lens, cache, all_logits=True).shape == (2, 5, 96)


def test_prefill_refuses_float_lens_and_ids_outside_the_vocabulary(pair):
    """Lengths as floats (cast to int32 silently before) and token ids outside the vocabulary
    (an IndexError deep in the embedding before) are refused naming them, and the range of the
    ids within the prompts' lengths (not the pads)."""
    _, model = pair
    cache = make_cache("dense", model.config, 2, 8, model.device, model.dtype)
    tokens = torch.randint(0, 96, (2, 5))  # [B, T]
    with torch.no_grad(), pytest.raises(ValueError, match=r"lens must be a \[2\] integer tensor"):
        model.prefill(tokens, torch.tensor([3.7, 5.0]), cache)
    tokens[:] = 7
    tokens[0, 3:], tokens[1, 2] = -1, 96  # the pads are not among the ids the error names
    with torch.no_grad(), pytest.raises(ValueError, match=r"token ids must be in \[0, 96\) "
                                        r"\(the vocabulary\), got ids from 7 to 96 within"):
        model.prefill(tokens, torch.tensor([3, 5], dtype=torch.int32), cache)


def test_prefill_checks_shapes_dtypes_and_devices_as_decode_does(pair):
    """Prefill's tokens, lens and cache are checked as decode's tokens are, naming the argument
    (before: an unpacking error for 1-D tokens, the embedding's error for float ones, an
    AttributeError for lens as a list or no cache); nothing is stored."""
    _, model = pair
    cache = make_cache("dense", model.config, 2, 8, model.device, model.dtype)
    tokens, lens = torch.randint(0, 96, (2, 5)), torch.tensor([3, 5], dtype=torch.int32)
    tokens_message = r"prefill: tokens must be a \[2, T\] int32 or int64 tensor on cpu"
    lens_message = r"prefill: lens must be a \[2\] integer tensor"
    with torch.no_grad():
        for bad in (tokens[0], tokens.float(), tokens[:1], tokens.to(torch.uint8),
                    tokens.tolist(), tokens.to("meta")):
            with pytest.raises(ValueError, match=tokens_message):
                model.prefill(bad, lens, cache)
        for bad in ([3, 5], lens[:1], lens[None], torch.tensor([True, True])):
            with pytest.raises(ValueError, match=lens_message):
                model.prefill(tokens, bad, cache)
        with pytest.raises(ValueError, match="prefill: cache must be a cache of the protocol .*"
                                             "got NoneType"):
            model.prefill(tokens, lens, None)
        assert cache.seq_lens.tolist() == [0, 0]
        model.prefill(tokens.int(), lens.to(torch.int16), cache)  # any integer lens
    assert cache.seq_lens.tolist() == [3, 5]


@pytest.mark.parametrize("lens", [[2**32 + 3, 5], [2**32, 5], [6, 5], [-2**32 + 3, 5]])
def test_prefill_refuses_lens_past_the_prompt_before_they_wrap(pair, lens):
    """int64 lengths outside [0, T] are refused, also those an int32 cast would have wrapped into
    it (2^32 + 3 became 3, and 2^32 an empty prompt whose logits were a padded position's)."""
    _, model = pair
    cache = make_cache("dense", model.config, 2, 8, model.device, model.dtype)
    for all_logits in (False, True):
        with torch.no_grad(), pytest.raises(ValueError, match=r"lens must be in \[[01], 5\]"):
            model.prefill(torch.randint(0, 96, (2, 5)), torch.tensor(lens), cache, all_logits)
    assert cache.seq_lens.tolist() == [0, 0]


def test_decode_refuses_tokens_of_the_wrong_shape_type_or_vocabulary(pair):
    """Decode's tokens are checked without reading them: their shape, dtype and device (before:
    a size mismatch or an unpacking error deep in the model, naming no argument). Their ids are
    not read (a decode step never reads a value on the host): an id outside the vocabulary is
    the embedding's IndexError on the CPU."""
    _, model = pair
    cache = make_cache("dense", model.config, 2, 8, model.device, model.dtype)
    with torch.no_grad():
        model.prefill(torch.randint(0, 96, (2, 5)), torch.tensor([3, 5], dtype=torch.int32),
                      cache)
        for bad in (torch.tensor([1, 2, 3]), torch.tensor([[1], [2]]), torch.tensor([1.0, 2.0]),
                    torch.tensor([1, 2], dtype=torch.uint8), [1, 2]):
            with pytest.raises(ValueError, match=r"tokens must be a \[2\] int32 or int64 tensor on "
                                                 r"cpu"):
                model.decode(bad, cache)
        with pytest.raises(ValueError, match="decode: cache must be a cache of the protocol"):
            model.decode(torch.tensor([1, 2]), None)
        for bad in ([1, 96], [-1, 2]):
            with pytest.raises(IndexError, match="index out of range"):
                model.decode(torch.tensor(bad), cache)
        assert cache.seq_lens.tolist() == [3, 5]
        model.decode(torch.tensor([1, 95], dtype=torch.int32), cache)  # any integer dtype
    assert cache.seq_lens.tolist() == [4, 6]


def test_logits_of_a_16_bit_model_are_float32_sums(device, dtype):
    """The head's product leaves in float32 from 16-bit weights too: logits near 30 are not
    rounded to bfloat16's 0.125 steps (noise the evaluation would count as KCache's). V spans
    two and a part of the 1024-row slices in which the CPU upcasts the head."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 64, generator=gen).to(device, dtype)  # [B, T, E]
    head = (torch.randn(2085, 64, generator=gen) * 0.9).to(device, dtype)  # [V, E]
    logits = float32_logits(h, head)  # [B, T, V]
    want = (h.double() @ head.double().t()).float()  # [B, T, V]
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, 2085)
    torch.testing.assert_close(logits, want, atol=2e-5, rtol=1e-5)
    assert logits.abs().max() > 16  # where a bfloat16 result would be off by up to 0.0625
    leaf = h.detach().requires_grad_()  # [B, T, E]
    float32_logits(leaf, head).sum().backward()  # with autograd too (out= has no gradient)
    torch.testing.assert_close(leaf.grad, head.sum(0).expand_as(h), atol=0.1, rtol=0.01)
