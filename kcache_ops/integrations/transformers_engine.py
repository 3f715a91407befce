"""A transformers model behind the interface of kcache_ops' own decoder, so the evaluation (and
whatever else runs a model on a kcache_ops cache) measures a user's transformers checkpoint with
the same caches and the same code: ``python -m kcache_ops eval --engine transformers``.

The model attends with ``attn_implementation="kcache"``; every call wraps the cache the caller
built (``kcache_ops.caches.make_cache``: dense or KCache) in a :class:`CacheBridge`, so the prefill
and each decode step run through exactly that cache.
"""
import inspect
import os
from types import SimpleNamespace

import torch

from ..devices import check_device, default_device
from ..integers import int_at_least
from ..model.errors import CheckpointError, UnsupportedModelError
from ..model.gguf_loader import metadata, open_gguf
from ..model.hf import SAFETENSORS_NAMES, config_json, shard_files
from ..model.llama import float32_logits
from ..model.load import default_model_path
from ..model.tokenizer import Tokenizer
from .transformers import SUPPORTED_MODEL_TYPES, CacheBridge, check_model, head_dim_of, enable


# The sizes a GGUF's metadata must give ("{arch}.{name}"): transformers fills a missing one with
# its config class's default (Llama's: a 7B model, whose weights it would allocate)
GGUF_SIZES = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")


def cache_arg(model):
    """The keyword ``model``'s forward takes its cache by: "cache" from transformers 5.2x,
    "past_key_values" before (which later versions deprecate)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TransformersDecoder:
    """A transformers Llama-family model with the calls of :class:`kcache_ops.model.Llama` that run
    it on a kcache_ops cache: ``prefill``, ``decode``, ``forward``, and ``config``, ``device``,
    ``dtype``.

    Parameters
    ----------
    model : transformers PreTrainedModel
        Switched to ``attn_implementation="kcache"`` (see
        :func:`kcache_ops.integrations.transformers.enable`).

    Attributes
    ----------
    model : the transformers model
    config : namespace with ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``,
        ``vocab_size``, ``max_position_embeddings`` (what ``make_cache`` and the callers read)
    """

    def __init__(self, model):
        self.model = enable(model).eval()
        c = model.config
        self.config = SimpleNamespace(num_layers=c.num_hidden_layers,
                                      num_heads=c.num_attention_heads,
                                      num_kv_heads=c.num_key_value_heads, head_dim=head_dim_of(c),
                                      vocab_size=c.vocab_size,
                                      max_position_embeddings=c.max_position_embeddings)
        self._cache_arg = cache_arg(model.get_decoder())
        self._capacities = set()  # those check_capacity has checked

    def check_capacity(self, capacity):
        """ValueError where the model cannot attend through a cache of ``capacity`` tokens per
        sequence (a sliding window that would bind: :func:`check_model`); checked once per
        capacity. The evaluation calls it before its first run."""
        if capacity not in self._capacities:
            check_model(self.model, capacity)
            self._capacities.add(capacity)

    def _bridge(self, cache, seen):
        """The transformers cache over the kcache_ops ``cache`` (:class:`CacheBridge`)."""
        self.check_capacity(cache.capacity)
        return CacheBridge(self.model, cache.capacity, cache, seen=seen, check=False)

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    def _hidden(self, **inputs):
        """The model's decoder's last hidden states [B, T, E] for ``inputs`` (its forward's
        arguments)."""
        return self.model.get_decoder()(**inputs).last_hidden_state

    def _logits(self, h):
        """Hidden states h [..., E] -> logits [..., V] float32 through the model's head with
        :func:`float32_logits`, as our decoder computes them (transformers' head rounds them to
        the model's dtype first)."""
        return float32_logits(h, self.model.get_output_embeddings().weight)

    def forward(self, tokens):
        """Causal full-sequence forward, no cache.

        tokens [B, T] long -> logits [B, T, V] float32."""
        return self._logits(self._hidden(input_ids=tokens, use_cache=False))

    __call__ = forward

    def prefill(self, tokens, lens, cache, all_logits=False):
        """Run right-padded prompts into an empty kcache_ops ``cache``.

        tokens [B, T] long (right-padded), lens [B] int32 -> logits [B, V] float32 at each prompt's
        last token, or [B, T, V] if ``all_logits`` (rows past ``lens[b]`` are don't-care).
        """
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(b, t)  # [B, T]
        mask = (positions < lens[:, None]).long()  # [B, T]
        bridge = self._bridge(cache, 0)
        # the pads as a valid id, as our decoder's prefill reads them: don't-care (a -1 too)
        h = self._hidden(input_ids=tokens * mask, attention_mask=mask, position_ids=positions,
                         **{self._cache_arg: bridge})  # [B, T, E]
        if all_logits:
            return self._logits(h)  # [B, T, V]
        return self._logits(h[torch.arange(b, device=tokens.device), lens.long() - 1])  # [B, V]

    def decode(self, tokens, cache):
        """One new token per sequence at its own position ``cache.seq_lens[b]``.

        tokens [B] long -> logits [B, V] float32.
        """
        positions = cache.seq_lens.long()[:, None]  # [B, 1]
        bridge = self._bridge(cache, 1)
        h = self._hidden(input_ids=tokens[:, None], position_ids=positions,
                         **{self._cache_arg: bridge})  # [B, 1, E]
        return self._logits(h[:, 0])  # [B, V]


def _from_pretrained(path, *args, **kwargs):
    """transformers' AutoModelForCausalLM.from_pretrained(*args, **kwargs), a checkpoint at
    ``path`` that it refuses (weights of another shape than its config's, say: a RuntimeError;
    a config value of the wrong type: huggingface_hub's StrictDataclassError, a plain Exception)
    a CheckpointError naming it; running out of memory stays itself."""
    import huggingface_hub.errors
    import transformers
    config_error = getattr(huggingface_hub.errors, "StrictDataclassError", RuntimeError)
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, config_error) as e:
        raise CheckpointError(f"{path}: transformers could not load it: {e}") from e


def load_transformers_model(path=None, device=None, dtype=None):
    """Load a checkpoint with transformers (as :func:`kcache_ops.model.load_model` loads it with
    our decoder) -> (TransformersDecoder, Tokenizer).

    ``path``: a Hugging Face folder, or a ``.gguf`` file (``gguf_file=``; transformers needs
    ``accelerate`` for that); None: the embedded SmolLM2 GGUF. Device default: CUDA where
    available; dtype default: bfloat16 on CUDA, float32 on the CPU.
    """
    path = os.path.abspath(default_model_path() if path is None else os.fspath(path))
    device = default_device() if device is None else check_device(device,
                                                                  "load_transformers_model")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    load = dict(attn_implementation="kcache", dtype=dtype)
    if os.path.isdir(path):
        config, cfg = config_json(path)  # none: transformers would say it has no model_type
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:  # before transformers reads the weights
            raise UnsupportedModelError(f"{config}: model_type {model_type!r}; KCache runs in "
                                        f"transformers: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if any(os.path.isfile(os.path.join(path, name)) for name in SAFETENSORS_NAMES):
            shard_files(path)  # checked (transformers also takes other formats)
        model = _from_pretrained(path, path, **load)
        eos = model.generation_config.eos_token_id
        tokenizer = Tokenizer.from_folder(path, eos if isinstance(eos, list) else
                                          () if eos is None else (eos,))
    elif os.path.isfile(path):
        reader = open_gguf(path)  # a file that is not GGUF fails here
        meta = metadata(reader)
        if meta.get("split.count", 1) > 1:  # transformers would read part 1 and draw the rest
            raise UnsupportedModelError(f"{path}: a GGUF checkpoint split into "
                                        f"{meta['split.count']} files (split.count); transformers "
                                        f"reads one file: merge them with llama-gguf-split "
                                        f"--merge, or load it with kcache_ops.model.load_model")
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_MODEL_TYPES:  # before transformers maps its tensors onto one
            raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r}; KCache runs in "
                                        f"transformers: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for key in (f"{arch}.{name}" for name in GGUF_SIZES):
            if int_at_least(meta.get(key), 1) is None:  # transformers would take its default
                raise CheckpointError(f"{path}: {key} must be an integer >= 1, got "
                                      f"{meta.get(key)!r}")
        model = _from_pretrained(path, os.path.dirname(path), gguf_file=os.path.basename(path),
                                 **load)
        tokenizer = Tokenizer.from_gguf(reader)
    else:
        raise CheckpointError(f"no such model file or folder: {path}")
    return TransformersDecoder(model.to(device)), tokenizer
