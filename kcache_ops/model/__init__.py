"""The reference Llama decoder with pluggable attention backends (``dense``, ``kcache``), its
checkpoint loaders (Hugging Face safetensors, GGUF) and tokenizer."""
from .attention import DenseCache, make_cache
from .config import LlamaConfig
from .errors import CheckpointError, UnsupportedModelError
from .llama import Llama

__all__ = ["CheckpointError", "DenseCache", "Llama", "LlamaConfig", "UnsupportedModelError",
           "make_cache"]
