"""The embedded SmolLM2-135M-Instruct (Q4_1 GGUF) end to end: tokenizer, GGUF loading and greedy
generation, against outputs recorded once (float32, CPU)."""
from dataclasses import replace

import pytest
import torch

from kcache_ops.caches import KCacheOptions, make_cache
from kcache_ops.model import load_model
from kcache_ops.generate import TextStream, generate
from model_helpers import requires_embedded_model

PLAIN = "The capital of France is"
PLAIN_IDS = [504, 3575, 282, 4649, 314]
CHAT = "What is the capital of France?"
# recorded greedy outputs, both prompts in one batch
GOLDEN_TOKENS = [[7042, 30, 198, 198, 504, 2988, 314, 42],
                 [504, 3575, 282, 4649, 314, 7042, 30]]
GOLDEN_TEXTS = [" Paris.\n\nThe answer is:", "The capital of France is Paris."]

pytestmark = requires_embedded_model


@pytest.fixture(scope="module")
def smollm():
    return load_model(None, "cpu", torch.float32)


def test_config_and_tokenizer(smollm):
    model, tok = smollm
    c = model.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta) == \
        (30, 9, 3, 64, 100000.0)
    assert c.tie_word_embeddings and c.max_position_embeddings == 8192
    assert tok.encode(PLAIN) == PLAIN_IDS
    text = "Digits 12345, ünïcödé and <|im_start|> tokens."
    assert tok.decode(tok.encode(text)) == text.replace("<|im_start|>", "")
    assert 1 in tok.encode(text) and tok.eos_ids == (2,)
    assert tok.render_chat("hi").endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_golden(smollm):
    model, tok = smollm
    prompts = [tok.encode_prompt(PLAIN, chat=False), tok.encode_prompt(CHAT, chat=True)]
    result = generate(model, prompts, 8, eos_ids=tok.eos_ids, tokenizer=tok)
    assert result.tokens == GOLDEN_TOKENS
    assert result.texts == GOLDEN_TEXTS


@pytest.mark.parametrize("text", ["ok 😀 fin", "ab😀", "a\ufffd"])
def test_stream_pieces_and_flush_make_the_text(smollm, text):
    """The streamed pieces and the flush add up to the decoded text, also where the last token
    leaves a character partial (the emoji's bytes cut) or the text ends in a real U+FFFD."""
    _, tok = smollm
    ids = tok.encode(text)
    for cut in range(1, len(ids) + 1):
        stream = TextStream(tok)
        pieces = "".join(stream.push(t) for t in ids[:cut])
        assert pieces + stream.flush() == tok.decode(ids[:cut]), cut


def test_reuse_keeps_every_logit(smollm):
    """KCache with cross-step reuse (a pool of 96 rows per KV head, twice a step's 3 x 16) on the
    real model: over a prompt long enough for cold rows and 12 decode steps, every logit equals
    the cache's without reuse to the bit (the rows found in the pool are the rows of host RAM),
    while most rows come from the pool."""
    model, tok = smollm
    ids = tok.encode("The capital of France is Paris, and its river is the Seine. " * 20)
    tokens = torch.tensor([ids])  # [1, T]
    lens = torch.tensor([len(ids)], dtype=torch.int32)  # [1]
    forced = torch.tensor(ids[:12])[:, None]  # [12, 1]: the steps' tokens
    logits = []
    for reuse in (0, 96):
        options = replace(KCacheOptions(), topn=16, reuse=reuse)
        cache = make_cache("kcache", model.config, 1, len(ids) + 12, "cpu", torch.float32, options)
        cache.record_mass = True
        with torch.no_grad():
            model.prefill(tokens, lens, cache)
            logits.append(torch.stack([model.decode(t, cache) for t in forced]))  # [12, 1, V]
    assert torch.equal(logits[0], logits[1])
    assert cache.reuse_hit_rate().mean() > 0.5, cache.reuse_hit_rate()
