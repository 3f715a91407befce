"""LlamaConfig from Hugging Face config dicts of both transformers generations (and from GGUF
metadata), and its errors."""
import numpy as np
import pytest

from kcache_ops.model import CheckpointError, LlamaConfig, UnsupportedModelError
from kcache_ops.model.config import FLOAT32_TINY

BASE = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 4}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
GGUF_BASE = {"general.architecture": "llama", "llama.embedding_length": 16,
             "llama.attention.head_count": 4, "llama.feed_forward_length": 32,
             "llama.block_count": 1, "llama.attention.layer_norm_rms_epsilon": 1e-5}
NAN = float("nan")


def test_defaults_and_eos_list():
    c = LlamaConfig.from_hf({**BASE, "eos_token_id": [7, 9]})
    assert (c.num_kv_heads, c.head_dim, c.rope_theta, c.rope_scaling) == (4, 2, 10000.0, None)
    assert c.eos_token_ids == (7, 9) and not c.attention_bias
    assert c.rms_norm_eps == 1e-6, "without the key, transformers' default (Llama's and Qwen2's)"


def test_rope_formats():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = LlamaConfig.from_hf({**BASE, "rope_theta": 5e5,  # transformers 4.x
                               "rope_scaling": {"rope_type": "llama3", **scaling}})
    new = LlamaConfig.from_hf({**BASE, "rope_parameters": {  # transformers 5.x
        "rope_type": "llama3", "rope_theta": 5e5, **scaling}})
    assert old == new and old.rope_scaling == scaling and old.rope_theta == 5e5


def test_llama3_original_length_beside_the_rope_dict():
    """A top-level original_max_position_embeddings (Phi-3's place for it) that disagrees with
    the rope dict's is refused, as transformers 5 takes it and 4 the dict's (the dict's was used
    without a word); the same value is read, and one the dict lacks (transformers 5 reads it)."""
    with pytest.raises(CheckpointError, match=r"original_max_position_embeddings \(4096\) and "
                                              r"rope_scaling.original_max_position_embeddings "
                                              r"\(8192\) disagree"):
        LlamaConfig.from_hf({**BASE, "rope_scaling": LLAMA3,
                             "original_max_position_embeddings": 4096})
    same = LlamaConfig.from_hf({**BASE, "rope_parameters": {"rope_theta": 5e5, **LLAMA3},
                                "original_max_position_embeddings": 8192})
    assert same.rope_scaling["original_max_position_embeddings"] == 8192
    rope = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    beside = LlamaConfig.from_hf({**BASE, "rope_scaling": rope,  # as transformers 5 reads it
                                  "original_max_position_embeddings": 4096})
    assert beside.rope_scaling["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize("change", [
    {"hidden_act": "swish"},  # transformers' name for the same SiLU
    {"rope_scaling": {"type": "linear", "factor": 1.0}},  # positions divided by 1
    {"use_sliding_window": True},  # a Llama with no sliding_window: no window
    # Qwen2's window on no layer: none from max_window_layers (28 by default) on, none in
    # layer_types, or no window
    {"model_type": "qwen2", "use_sliding_window": True},
    {"model_type": "qwen2", "use_sliding_window": True, "num_hidden_layers": 2,
     "layer_types": ["full_attention", "full_attention"], "max_window_layers": 0},
    {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": None,
     "max_window_layers": 0},
])
def test_keys_that_change_nothing(change):
    """Keys that transformers 5 reads as the plain decoder's are taken as such (they were
    refused), with the decoder's numbers."""
    plain = {k: v for k, v in change.items() if k in ("model_type", "num_hidden_layers")}
    assert LlamaConfig.from_hf({**BASE, **change}) == LlamaConfig.from_hf({**BASE, **plain})


def test_llama3_original_length_defaults_to_the_positions():
    """A Llama-3 scaling without original_max_position_embeddings takes max_position_embeddings
    (where that is unset, transformers' default: Llama's 2048, Qwen2's 32768), as transformers 5
    does (it was refused as missing)."""
    rope = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    for change, expected in (({"max_position_embeddings": 131072}, 131072), ({}, 2048),
                             ({"model_type": "qwen2"}, 32768)):
        c = LlamaConfig.from_hf({**BASE, "rope_scaling": rope, **change})
        assert c.max_position_embeddings == expected
        assert c.rope_scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": expected}


def test_qwen2_has_qkv_bias():
    """Qwen2: a bias on Q, K and V, never on O (attention_bias or not); Llama with
    attention_bias: on all four."""
    assert LlamaConfig.from_hf({**BASE, "model_type": "qwen2"}).attention_bias
    c = LlamaConfig.from_hf({**BASE, "model_type": "qwen2", "attention_bias": True})
    assert (c.attention_bias, c.output_bias) == (True, False)
    c = LlamaConfig.from_hf({**BASE, "attention_bias": True})
    assert (c.attention_bias, c.output_bias) == (True, True)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mixtral"}, "model_type 'mixtral'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling type 'linear'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 0},
     r"sliding window \(sliding_window 4096\) on layers \[0\]"),
    ({"model_type": "qwen2", "use_sliding_window": True, "num_hidden_layers": 3,
      "layer_types": ["full_attention", "sliding_attention", "full_attention"],
      "sliding_window": 64}, r"sliding window \(sliding_window 64\) on layers \[1\]"),
    ({"rope_scaling": {"type": "linear", "factor": 1.5}}, "rope scaling type 'linear'"),
    # a Llama's sliding_window: transformers' generate keeps that many keys of every layer
    ({"sliding_window": 4, "num_hidden_layers": 2},
     r"sliding window \(sliding_window 4\) on layers \[0, 1\]"),
    ({"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]},
     r"sliding window \(sliding_window None\) on layers \[0\]"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"head_dim": 3}, r"head_dim \(3\) must be even"),
    # a partial RoPE (transformers reads the factor beside the rope dict or in it)
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5, RoPE on part of a head"),
    ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.25}},
     "rope_parameters.partial_rotary_factor = 0.25"),
    # a scaling of no type: linear to llama.cpp, nothing to transformers 5 (it was ignored)
    ({"rope_scaling": {"factor": 4.0}}, "rope_scaling.factor = 4.0 without a rope_type"),
    ({"rope_scaling": {"factor": 0.5}}, "rope_scaling.factor = 0.5 without a rope_type"),
    # quantized weights (an FP8 checkpoint's scales were "unexpected tensor ...weight_scale_inv")
    ({"quantization_config": {"quant_method": "fp8"}},
     r"quantized weights \(quantization_config.quant_method 'fp8'\)"),
])
def test_unsupported(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        LlamaConfig.from_hf({**BASE, **change})


BIG = 2**31 - 1  # the largest size a config may give


@pytest.mark.parametrize("change, weight", [
    ({"hidden_size": BIG, "intermediate_size": BIG, "num_attention_heads": 1, "head_dim": 2},
     "an MLP projection"),
    ({"vocab_size": BIG, "hidden_size": 2**29, "num_attention_heads": 1}, "the embedding"),
    ({"hidden_size": 2**29, "num_attention_heads": 2, "head_dim": 2**30}, "q_proj")])
def test_sizes_whose_product_no_tensor_holds(change, weight):
    """Sizes each in range whose product is a weight of more elements than torch can count the
    bytes of are refused by name (building the model raised "Storage size calculation
    overflowed", a traceback from the CLI)."""
    with pytest.raises(UnsupportedModelError, match=f"^{weight} would be a \\d+ x \\d+ matrix, "
                                                    f"\\d+ elements: more than a tensor can hold"):
        LlamaConfig.from_hf({**BASE, **change})


def test_the_largest_weight_a_config_may_give():
    """2^59 elements a weight is the limit: taken at it, refused one row past it."""
    at = {**BASE, "hidden_size": 2**29, "intermediate_size": 2**30, "num_attention_heads": 2**28}
    assert LlamaConfig.from_hf(at).intermediate_size == 2**30
    with pytest.raises(UnsupportedModelError, match=f"an MLP projection would be a {2**30 + 1} x "
                                                    f"{2**29} matrix"):
        LlamaConfig.from_hf({**at, "intermediate_size": 2**30 + 1})


def test_rope_parameters_and_rope_scaling_must_agree():
    """transformers 5 reads rope_scaling as rope_parameters: a config holding both, saying
    different things (a theta too), is refused (rope_scaling was ignored); saying the same, or
    the old form of the same (``type``, no type for the default), it is read."""
    with pytest.raises(CheckpointError, match="rope_parameters and rope_scaling disagree"):
        LlamaConfig.from_hf({**BASE, "rope_parameters": {"rope_theta": 1e4},
                             "rope_scaling": LLAMA3})
    same = LlamaConfig.from_hf({**BASE, "rope_theta": 5e5, "rope_scaling": LLAMA3,
                                "rope_parameters": {"rope_theta": 5e5, **LLAMA3}})
    assert same.rope_scaling["factor"] == 8.0 and same.rope_theta == 5e5
    plain = LlamaConfig.from_hf({**BASE, "rope_parameters": {"rope_theta": 5e5},
                                 "rope_scaling": {"type": "default", "rope_theta": 5e5}})
    assert plain.rope_scaling is None and plain.rope_theta == 5e5
    assert LlamaConfig.from_hf({**BASE, "partial_rotary_factor": 1.0}).rope_scaling is None
    # a theta in one of them only: transformers 5 reads rope_scaling, whose theta is then the
    # top-level one (here the default 10000), not rope_parameters' 1e6
    for scaling in ({"rope_type": "default"}, {"rope_type": "default", "rope_theta": 1e4}):
        with pytest.raises(CheckpointError, match="rope_parameters and rope_scaling disagree"):
            LlamaConfig.from_hf({**BASE, "rope_parameters": {"rope_theta": 1e6},
                                 "rope_scaling": scaling})
    agreed = LlamaConfig.from_hf({**BASE, "rope_theta": 1e6, "rope_scaling": {"type": "default"},
                                  "rope_parameters": {"rope_theta": 1e6,
                                                      "partial_rotary_factor": 1.0}})
    assert agreed.rope_theta == 1e6
    assert LlamaConfig.from_hf({**BASE, "rope_scaling": {"factor": 1.0}}).rope_scaling is None


@pytest.mark.parametrize("key, what", [("attention.value_length", "V heads of another size"),
                                       ("rope.dimension_count", "RoPE on part of a head")])
def test_gguf_heads_of_another_shape(key, what):
    """A GGUF file whose V heads or rotated dims differ from the key length is refused (a partial
    RoPE was rotated whole: llama.cpp rotates rope.dimension_count dims); equal, it is read."""
    LlamaConfig.from_gguf({**GGUF_BASE, f"llama.{key}": 4}, 10, True, False, None)
    with pytest.raises(UnsupportedModelError, match=f"llama.{key} = 2, not the head dim 4: "
                                                    f"{what}"):
        LlamaConfig.from_gguf({**GGUF_BASE, f"llama.{key}": 2}, 10, True, False, None)
    with pytest.raises(CheckpointError, match=f"llama.{key} must be an integer"):
        LlamaConfig.from_gguf({**GGUF_BASE, f"llama.{key}": 2.5}, 10, True, False, None)


def test_accepted_value_forms():
    """Ints where floats are expected, null for optional keys, the smallest eps allowed."""
    c = LlamaConfig.from_hf({**BASE, "rope_theta": 500000, "rms_norm_eps": FLOAT32_TINY,
                             "num_key_value_heads": None, "head_dim": None, "rope_scaling": None,
                             "rope_parameters": None, "tie_word_embeddings": None,
                             "attention_bias": None, "bos_token_id": 0, "eos_token_id": 0,
                             "max_position_embeddings": None})
    assert (c.rope_theta, c.rms_norm_eps, c.num_kv_heads, c.head_dim) == (5e5, FLOAT32_TINY, 4, 2)
    assert c.max_position_embeddings == 2048
    assert not c.tie_word_embeddings and (c.bos_token_id, c.eos_token_ids) == (0, (0,))
    c = LlamaConfig.from_hf({**BASE, "rope_scaling": {**LLAMA3, "factor": 1, "low_freq_factor": 1}})
    assert c.rope_scaling == {"factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("change, key, found", [
    ({"rms_norm_eps": -1}, "rms_norm_eps", -1),
    ({"rms_norm_eps": 0}, "rms_norm_eps", 0),
    ({"rms_norm_eps": 1e-300}, "rms_norm_eps", 1e-300),  # 0 in float32
    ({"rms_norm_eps": NAN}, "rms_norm_eps", NAN),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps", "1e-5"),
    ({"rms_norm_eps": None}, "rms_norm_eps", None),
    ({"hidden_size": 128.0}, "hidden_size", 128.0),
    ({"hidden_size": True}, "hidden_size", True),
    ({"vocab_size": -5}, "vocab_size", -5),
    ({"intermediate_size": "16"}, "intermediate_size", "16"),
    ({"num_hidden_layers": 0}, "num_hidden_layers", 0),
    ({"num_hidden_layers": 4097}, "num_hidden_layers", 4097),  # past MAX_LAYERS, as GGUF's
    ({"num_attention_heads": 0}, "num_attention_heads", 0),
    ({"num_attention_heads": 4.0}, "num_attention_heads", 4.0),
    ({"num_key_value_heads": -2}, "num_key_value_heads", -2),
    ({"num_key_value_heads": 0}, "num_key_value_heads", 0),  # 0 is not null
    ({"head_dim": 0}, "head_dim", 0),
    ({"head_dim": 2.0}, "head_dim", 2.0),
    ({"max_position_embeddings": 0}, "max_position_embeddings", 0),
    ({"rope_scaling": "linear"}, "rope_scaling", "linear"),
    ({"rope_parameters": ["default"]}, "rope_parameters", ["default"]),
    ({"rope_theta": 0}, "rope_theta", 0),
    ({"rope_theta": -1e4}, "rope_theta", -1e4),
    ({"rope_theta": NAN}, "rope_theta", NAN),
    ({"rope_theta": float("inf")}, "rope_theta", float("inf")),
    ({"rope_theta": 10 ** 400}, "rope_theta", 10 ** 400),  # too large for a float
    ({"rope_theta": 0.5}, "rope_theta", 0.5),
    ({"rope_theta": "10000"}, "rope_theta", "10000"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": False}},
     "rope_parameters.rope_theta", False),
    ({"rope_scaling": {**LLAMA3, "factor": -1}}, "rope_scaling.factor", -1),
    ({"rope_scaling": {**LLAMA3, "factor": 0.5}}, "rope_scaling.factor", 0.5),
    ({"rope_parameters": {**LLAMA3, "low_freq_factor": 0}}, "rope_parameters.low_freq_factor", 0),
    ({"rope_parameters": {**LLAMA3, "high_freq_factor": NAN}},
     "rope_parameters.high_freq_factor", NAN),
    ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 8192.0}},
     "rope_scaling.original_max_position_embeddings", 8192.0),
    # a key of the Llama-3 scaling missing: named with its dict (it was "lacks the key 'factor'")
    ({"rope_parameters": {k: v for k, v in LLAMA3.items() if k != "factor"}},
     "rope_parameters.factor", None),
    ({"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "high_freq_factor"}},
     "rope_scaling.high_freq_factor", None),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings", "false"),
    ({"attention_bias": 1}, "attention_bias", 1),
    ({"mlp_bias": "no"}, "mlp_bias", "no"),
    ({"use_sliding_window": 0}, "use_sliding_window", 0),
    ({"layer_types": ["chunked_attention"]}, "layer_types", ["chunked_attention"]),
    ({"model_type": "qwen2", "layer_types": "full_attention"}, "layer_types", "full_attention"),
    ({"bos_token_id": -1}, "bos_token_id", -1),
    ({"eos_token_id": 2.0}, "eos_token_id", 2.0),
    ({"eos_token_id": [2, "</s>"]}, "eos_token_id", "</s>"),
])
def test_malformed_value(change, key, found):
    """A value of the wrong type or out of range: the error names the key and the value."""
    with pytest.raises(CheckpointError) as e:
        LlamaConfig.from_hf({**BASE, **change})
    missing = " (missing or null)" if found is None else ""
    assert str(e.value).startswith(f"{key} must be ")
    assert str(e.value).endswith(f"got {found!r}{missing}")


def test_llama3_frequency_band():
    with pytest.raises(CheckpointError, match=r"rope_scaling.high_freq_factor \(1.0\) must be "
                                              r"greater than low_freq_factor \(1.0\)"):
        LlamaConfig.from_hf({**BASE, "rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}})


def test_gguf_metadata():
    c = LlamaConfig.from_gguf(GGUF_BASE, 10, True, False, rope_freq_factors=[1.0, 8])
    assert (c.vocab_size, c.num_kv_heads, c.head_dim, c.rope_freq_factors) == (10, 4, 4, [1.0, 8.0])
    assert c.eos_token_ids == () and c.rms_norm_eps == 1e-5
    # keys the file may lack: llama.cpp's rope base, and a context of 2048
    assert (c.rope_theta, c.max_position_embeddings) == (10000.0, 2048), c
    c = LlamaConfig.from_gguf({**GGUF_BASE, "llama.attention.layer_norm_rms_epsilon": 1e-6}, 10,
                              True, False, None)
    assert c.rms_norm_eps == 1e-6  # the file's, not a default that happens to equal it
    ends = {"tokenizer.ggml.eos_token_id": 7, "tokenizer.ggml.eot_token_id": 9}
    c = LlamaConfig.from_gguf({**GGUF_BASE, **ends}, 10, True, False, None)
    assert c.eos_token_ids == (7, 9)  # a chat turn's end stops generation too (Llama 3)
    c = LlamaConfig.from_gguf({**GGUF_BASE, **ends, "tokenizer.ggml.eot_token_id": 7}, 10, True,
                              False, None)
    assert c.eos_token_ids == (7,), "an EOS that is also the EOT is listed once"
    c = LlamaConfig.from_gguf({**GGUF_BASE, "general.architecture": "qwen2",
                               **{k.replace("llama.", "qwen2.", 1): v for k, v in GGUF_BASE.items()
                                  if k.startswith("llama.")}}, 10, True, True, None)
    assert (c.num_heads, c.hidden_size, c.attention_bias, c.output_bias) == (4, 16, True, False)


@pytest.mark.parametrize("change, key, found", [
    ({"llama.attention.layer_norm_rms_epsilon": -1.0}, "llama.attention.layer_norm_rms_epsilon",
     -1.0),
    ({"llama.block_count": None}, "llama.block_count", None),  # the key is missing
    ({"llama.attention.head_count": 0}, "llama.attention.head_count", 0),
    ({"llama.attention.head_count_kv": 2.0}, "llama.attention.head_count_kv", 2.0),
    ({"llama.rope.freq_base": NAN}, "llama.rope.freq_base", NAN),
    ({"llama.context_length": "2048"}, "llama.context_length", "2048"),
    ({"llama.vocab_size": 0}, "llama.vocab_size", 0),
    ({"llama.block_count": 4097}, "llama.block_count", 4097),  # past MAX_LAYERS
    ({"tokenizer.ggml.bos_token_id": -1}, "tokenizer.ggml.bos_token_id", -1),
    ({"rope_freqs": [1.0, NAN]}, "rope_freqs.weight", NAN),
    ({"rope_freqs": [1.0, 0.0]}, "rope_freqs.weight", 0.0),
])
def test_gguf_malformed_value(change, key, found):
    """GGUF metadata (and rope_freqs.weight) is checked as config.json is."""
    meta = {**GGUF_BASE, **change}
    with pytest.raises(CheckpointError) as e:
        LlamaConfig.from_gguf(meta, 10, True, False, rope_freq_factors=meta.pop("rope_freqs", None))
    missing = " (missing or null)" if found is None else ""
    assert str(e.value).startswith(f"{key} must be ")
    assert str(e.value).endswith(f"got {found!r}{missing}")


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_gguf_rope_scaling_type(kind):
    """A GGUF rope scaling type other than none is refused (linear was taken as no scaling)."""
    meta = {**GGUF_BASE, "llama.rope.scaling.type": kind, "llama.rope.scaling.factor": 4.0}
    with pytest.raises(UnsupportedModelError, match=f"unsupported GGUF rope scaling type "
                                                    f"'{kind}'"):
        LlamaConfig.from_gguf(meta, 10, True, False, None)


def test_gguf_rope_freqs_length():
    with pytest.raises(CheckpointError, match="rope_freqs.weight must hold head_dim / 2 = 2 "
                                              "factors, got 3"):
        LlamaConfig.from_gguf(GGUF_BASE, 10, True, False, rope_freq_factors=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("factors, message", [
    ([1.0], "rope_freq_factors must hold head_dim / 2 = 2 factors, got 1"),
    ([1.0, 1.0, 1.0], "rope_freq_factors must hold head_dim / 2 = 2 factors, got 3"),
    ([1.0, 0.0], "rope_freq_factors must be a finite number >= 1, got 0.0"),
    ([1.0, NAN], "rope_freq_factors must be a finite number >= 1, got nan"),
])
def test_rope_freq_factors_of_a_config_built_directly(factors, message):
    """A config built in code checks its factors as a GGUF's are: one per rotated pair (a single
    one would broadcast to every frequency), each >= 1 (0 makes the RoPE angles NaN)."""
    with pytest.raises(CheckpointError, match=message):
        LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=2, head_dim=4, rope_freq_factors=factors)


def test_rope_scaling_and_freq_factors_exclude_each_other():
    """A config built in code with both forms of the Llama-3 scaling is refused (the factors won,
    the scaling was dropped without a word)."""
    scaling = {k: v for k, v in LLAMA3.items() if k != "rope_type"}
    with pytest.raises(ValueError, match="set rope_scaling or rope_freq_factors, not both"):
        LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=2, head_dim=4, rope_scaling=scaling, rope_freq_factors=[1.0, 8.0])


@pytest.mark.parametrize("name, value", [("num_kv_heads", 0), ("num_layers", -1),
                                         ("num_heads", 0), ("head_dim", 4.0),
                                         ("vocab_size", True)])
def test_sizes_of_a_config_built_directly(name, value):
    """A config built in code checks its sizes as from_hf does: integers >= 1 (num_kv_heads 0
    raised ZeroDivisionError; num_layers -1 and num_heads 0 were taken), by name."""
    sizes = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                 num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match=rf"LlamaConfig: {name} must be an integer >= 1, got "
                                         rf"{value!r}"):
        LlamaConfig(**{**sizes, name: value})
    config = LlamaConfig(**{**sizes, "num_layers": np.int64(3)})  # as int, like from_hf's
    assert type(config.num_layers) is int and config.num_layers == 3
