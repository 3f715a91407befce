"""KCache inside the decoder: on a tiny random Llama, the logits of every decode step equal the
dense backend's when N covers the whole sequence, for batched varlen prompts."""
from dataclasses import replace

import pytest
import torch

from kcache_ops.caches import KCacheOptions, make_cache
from kcache_ops.model import Llama, LlamaConfig

LENS = [9, 30, 17]
STEPS = 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=160, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0)
    return Llama(config).eval()


def teacher_forced_logits(model, backend, tokens, lens, forced, options=None):
    """Prefill tokens [B, T] (lens [B]), then decode forced [STEPS, B] one step at a time
    -> logits [STEPS + 1, B, V]: after the prompt, then after each forced token."""
    cache = make_cache(backend, model.config, tokens.shape[0], tokens.shape[1] + STEPS,
                       model.device, model.dtype, options)
    with torch.no_grad():
        logits = [model.prefill(tokens, lens, cache)]  # [B, V]
        for step in forced:
            logits.append(model.decode(step, cache))
    return torch.stack(logits)


@pytest.fixture(scope="module")
def prompts(model):
    """(tokens [B, T], lens [B], forced [STEPS, B], dense logits [STEPS + 1, B, V])."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (len(LENS), max(LENS)), generator=gen)  # [B, T]
    lens = torch.tensor(LENS, dtype=torch.int32)  # [B]
    forced = torch.randint(0, 128, (STEPS, len(LENS)), generator=gen)  # [STEPS, B]
    return tokens, lens, forced, teacher_forced_logits(model, "dense", tokens, lens, forced)


PAPER = KCacheOptions.paper_literal()


@pytest.mark.parametrize("options", [
    replace(PAPER, topn=64),
    replace(PAPER, topn=42, group_select=True),
    replace(PAPER, topn=64, renormalize=False),
    replace(PAPER, topn=1, dense_layers=(0, 1, 2)),
    KCacheOptions(),
], ids=["topn64", "group_select", "no_renormalize", "all_dense", "defaults"])
def test_kcache_covering_every_key_equals_dense(model, prompts, options):
    """N (with the defaults: the hot rows) covering every key is exact."""
    tokens, lens, forced, dense = prompts
    got = teacher_forced_logits(model, "kcache", tokens, lens, forced, options)
    torch.testing.assert_close(got, dense, atol=2e-5, rtol=1e-4)


def test_small_topn_changes_the_logits(model, prompts):
    """N = 2 of up to 42 keys is an approximation: the logits move (the sparse path is live)."""
    tokens, lens, forced, dense = prompts
    got = teacher_forced_logits(model, "kcache", tokens, lens, forced, replace(PAPER, topn=2))
    torch.testing.assert_close(got[0], dense[0], atol=2e-5, rtol=1e-4)  # prefill is exact
    assert (got[1:] - dense[1:]).abs().max() > 1e-3


def test_decode_reuses_the_rope_frequencies(monkeypatch):
    """A GGUF model's rope_freq_factors (a Python list) become the frequencies once, at the first
    prefill: a decode step copies nothing from the host (on CUDA such a copy synchronises)."""
    c = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=64,
                    rope_freq_factors=[1.0 + i / 8 for i in range(32)])
    llama = Llama(c).eval()
    tokens = torch.randint(0, c.vocab_size, (1, 5))  # [B, T]
    cache = make_cache("dense", c, 1, 8, llama.device, llama.dtype)
    with torch.inference_mode():
        llama.prefill(tokens, torch.tensor([5], dtype=torch.int32), cache)
        monkeypatch.setattr("kcache_ops.model.llama.inv_frequencies",
                            lambda *a: pytest.fail("decode recomputed the RoPE frequencies"))
        for t in range(2):  # the first step, and one after it
            assert torch.isfinite(llama.decode(tokens[:, t], cache)).all()
