"""A decode step of the model never waits on the host: with every cache backend, a whole
``Llama.decode`` runs under ``torch.cuda.set_sync_debug_mode("error")``, which turns any
device->host synchronisation (``.item()``, ``.cpu()``, a value check that reads back) into an
error. On the CPU the same path is exercised for correctness by the cache tests."""
from dataclasses import replace

import pytest
import torch

from kcache_ops.caches import KCacheOptions, make_cache
from kcache_ops.model import Llama, LlamaConfig
from cuda_checks import requires_cuda

pytestmark = requires_cuda


PAPER = KCacheOptions.paper_literal()


@pytest.mark.parametrize("backend,options", [
    ("dense", None),
    ("kcache", KCacheOptions()),
    ("kcache", replace(PAPER, topn=8)),
    ("kcache", replace(PAPER, topn=8, group_select=True, renormalize=False, dense_layers=(0,))),
    ("kcache", replace(PAPER, topn=8, tail="mean")),
    ("kcache", replace(PAPER, topn=8, tail="int2", group_select=True)),
    ("kcache", replace(PAPER, topn=8, tail="int4", top_p=0.5)),
    ("kcache", replace(PAPER, topn=8, tail="int2", sinks=4, window=8)),
    ("kcache", replace(PAPER, topn=8, sinks=2, window=4, group_select=True)),
])
@pytest.mark.parametrize("freq_factors", [None, [1.0 + i / 8 for i in range(32)]],
                         ids=["rope", "gguf_freq_factors"])
def test_decode_step_never_syncs(backend, options, freq_factors):
    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=160, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=64, rope_freq_factors=freq_factors)
    model = Llama(c).to("cuda", torch.bfloat16).eval()
    lens = torch.tensor([40, 23], dtype=torch.int32, device="cuda")  # [B]
    tokens = torch.randint(0, c.vocab_size, (2, 40), device="cuda")  # [B, T]
    cache = make_cache(backend, c, 2, 64, model.device, model.dtype, options)
    with torch.inference_mode():
        model.prefill(tokens, lens, cache)  # prefill may sync (it validates the lengths)
        model.decode(tokens[:, 0], cache)   # first step outside: lazy CUDA initialisation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                logits = model.decode(tokens[:, 0], cache)  # [B, V]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits).all()
