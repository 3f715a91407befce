"""LlamaConfig from Hugging Face config dicts of both transformers generations, and its errors."""
import pytest

from kcache_ops.model import LlamaConfig, UnsupportedModelError

BASE = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 4}


def test_defaults_and_eos_list():
    c = LlamaConfig.from_hf({**BASE, "eos_token_id": [7, 9]})
    assert (c.num_kv_heads, c.head_dim, c.rope_theta, c.rope_scaling) == (4, 2, 10000.0, None)
    assert c.eos_token_ids == (7, 9) and not c.attention_bias


def test_rope_formats():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = LlamaConfig.from_hf({**BASE, "rope_theta": 5e5,  # transformers 4.x
                               "rope_scaling": {"rope_type": "llama3", **scaling}})
    new = LlamaConfig.from_hf({**BASE, "rope_parameters": {  # transformers 5.x
        "rope_type": "llama3", "rope_theta": 5e5, **scaling}})
    assert old == new and old.rope_scaling == scaling and old.rope_theta == 5e5


def test_qwen2_has_qkv_bias():
    assert LlamaConfig.from_hf({**BASE, "model_type": "qwen2"}).attention_bias


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mixtral"}, "model_type 'mixtral'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling type 'linear'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "sliding_window"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
])
def test_unsupported(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        LlamaConfig.from_hf({**BASE, **change})
