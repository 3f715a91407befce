"""The reference Llama decoder, its checkpoint loaders (Hugging Face safetensors, GGUF) and
tokenizer. It runs on any cache of the protocol of kcache_ops.caches.protocol and imports no cache
(layers: cli -> eval / throughput / generate -> model and caches, which import neither the other;
caches -> ops)."""
from .config import LlamaConfig
from .errors import CheckpointError, UnsupportedModelError
from .llama import Llama, pad_prompts
from .load import default_model_path, describe_model, load_model
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "Llama", "LlamaConfig", "Tokenizer", "UnsupportedModelError",
           "default_model_path", "describe_model", "load_model", "pad_prompts"]
