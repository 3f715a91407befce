"""The reference Llama decoder with pluggable attention backends (``dense``, ``kcache``), its
checkpoint loaders (Hugging Face safetensors, GGUF), tokenizer and batched generation."""
from .attention import DenseCache, make_cache
from .config import LlamaConfig
from .errors import CheckpointError, UnsupportedModelError
from .generate import Generation, generate
from .llama import Llama
from .load import default_model_path, load_model
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "DenseCache", "Generation", "Llama", "LlamaConfig", "Tokenizer",
           "UnsupportedModelError", "default_model_path", "generate", "load_model", "make_cache"]
