"""Tiny random Hugging Face checkpoints written into a test's tmp_path."""
import torch

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
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
