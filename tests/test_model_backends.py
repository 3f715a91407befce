"""The cache factory and DenseCache's bookkeeping: options, capacity, memory."""
import pytest
import torch

from kcache_ops.caches import KCacheOptions, make_cache
from kcache_ops.model import LlamaConfig

CONFIG = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=64)


def test_bad_backends_and_options():
    with pytest.raises(ValueError, match="unknown attention backend 'sparse'"):
        make_cache("sparse", CONFIG, 1, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="'dense' takes no options"):
        make_cache("dense", CONFIG, 1, 8, "cpu", torch.float32, KCacheOptions(topn=4))
    with pytest.raises(TypeError, match="unknown option.* top_n; the options are topn"):
        make_cache("kcache", CONFIG, 1, 8, "cpu", torch.float32,
                   KCacheOptions.from_dict({"top_n": 4}))
    with pytest.raises(ValueError, match="capacity"):
        make_cache("dense", CONFIG, 1, 0, "cpu", torch.float32)


def test_dense_capacity_and_memory():
    cache = make_cache("dense", CONFIG, 2, 5, "cpu", torch.float16)
    assert cache.device_bytes() == 2 * 2 * (2 * 2 * 5 * 64) * 2 and cache.host_bytes() == 0
    q = torch.randn(2, 4, 6, 64, dtype=torch.float16)                      # [B, Hq, T, D]
    kv = torch.randn(2, 2, 6, 64, dtype=torch.float16)                     # [B, Hkv, T, D]
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        cache.prefill(0, q, kv, kv, torch.tensor([6, 6], dtype=torch.int32))
    lens = torch.tensor([5, 2], dtype=torch.int32)
    for layer in range(2):
        cache.prefill(layer, q[:, :, :5], kv[:, :, :5], kv[:, :, :5], lens)
    cache.finish_prefill(lens)
    with pytest.raises(ValueError, match="cache full"):
        cache.decode(0, q[:, :, 0], kv[:, :, 0], kv[:, :, 0])
