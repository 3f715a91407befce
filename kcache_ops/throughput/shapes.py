"""The model shapes the throughput benchmark runs, and random-weight models of them."""
import torch

from ..model import Llama, LlamaConfig

SHAPES = {
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             rope_theta=500000.0, max_position_embeddings=131072,
                             rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True),
    "tiny": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=4096),
}

# the bench command's default models, and each shape's default contexts (tokens): within its
# max_position_embeddings with a run's steps (SmolLM2 addresses 8192; tiny is --small's)
DEFAULT_MODELS = ["llama3-8b", "smollm2-135m"]
DEFAULT_CONTEXTS = {"llama3-8b": (8192, 32768, 65536), "smollm2-135m": (2048, 4096, 8000),
                    "tiny": (256, 512, 1024)}


def random_model(config, device, dtype):
    """Llama of ``config`` on ``device`` in ``dtype`` with random weights (normal, std 0.02;
    norms 1), built without a float32 copy."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Llama(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model
