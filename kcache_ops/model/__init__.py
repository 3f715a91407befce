"""The reference Llama decoder with pluggable attention backends (``dense``, ``kcache``), its
checkpoint loaders (Hugging Face safetensors, GGUF) and tokenizer."""
from .attention import DenseCache, make_cache
from .config import LlamaConfig
from .errors import CheckpointError, UnsupportedModelError
from .llama import Llama
from .load import default_model_path, load_model
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "DenseCache", "Llama", "LlamaConfig", "Tokenizer",
           "UnsupportedModelError", "default_model_path", "load_model", "make_cache"]
