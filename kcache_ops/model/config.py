"""LlamaConfig: the hyper-parameters of a Llama-architecture decoder, from a Hugging Face
config.json or from GGUF metadata."""
from dataclasses import dataclass, field

from .errors import UnsupportedModelError

SUPPORTED_HF_TYPES = ("llama", "qwen2")
SUPPORTED_GGUF_ARCHS = ("llama",)


@dataclass
class LlamaConfig:
    """Shapes and constants of a Llama decoder (also Qwen2, which adds a bias to Q, K and V).

    ``rope_scaling`` is None or the Llama-3 parameters ``{"factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}``. ``rope_freq_factors`` is the same
    scaling already expanded to one divisor per frequency ([head_dim / 2] floats), as GGUF files
    store it (tensor ``rope_freqs.weight``); at most one of the two is set.
    """
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_freq_factors: list[float] | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"num_heads ({self.num_heads}) must be a multiple of "
                                        f"num_kv_heads ({self.num_kv_heads})")
        if self.rope_scaling is not None and self.rope_freq_factors is not None:
            raise ValueError("set rope_scaling or rope_freq_factors, not both")

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """From the dict of a Hugging Face config.json (``model_type`` llama or qwen2)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_HF_TYPES:
            raise UnsupportedModelError(f"unsupported architecture: model_type {model_type!r} "
                                        f"(architectures {cfg.get('architectures')}); supported: "
                                        f"{', '.join(SUPPORTED_HF_TYPES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {cfg['hidden_act']!r} (need silu)")
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError("unsupported: mlp_bias=true")
        if cfg.get("use_sliding_window"):
            raise UnsupportedModelError("unsupported: use_sliding_window=true")
        # transformers >= 5 writes "rope_parameters" (theta and scaling together); older versions
        # write "rope_theta" and "rope_scaling".
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}
        else:
            raise UnsupportedModelError(f"unsupported rope scaling type {rope_type!r} "
                                        "(supported: default, llama3)")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            # Qwen2 always has a bias on Q, K and V; Llama has one only where attention_bias says so
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )

    @classmethod
    def from_gguf(cls, meta: dict, vocab_size: int, has_output: bool, has_qkv_bias: bool,
                  rope_freq_factors: list[float] | None) -> "LlamaConfig":
        """From GGUF metadata (``general.architecture`` llama).

        ``vocab_size`` is the token count of the vocabulary, ``has_output`` whether the file holds
        its own ``output.weight`` (else the embeddings are tied), ``has_qkv_bias`` whether it holds
        ``attn_q.bias`` and its kin, ``rope_freq_factors`` the
        contents of ``rope_freqs.weight`` if present.
        """
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHS:
            raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; supported: "
                                        f"{', '.join(SUPPORTED_GGUF_ARCHS)}")
        scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling_type != "none":
            raise UnsupportedModelError(f"unsupported GGUF rope scaling type {scaling_type!r}")
        hidden = meta[f"{arch}.embedding_length"]
        heads = meta[f"{arch}.attention.head_count"]
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            vocab_size=meta.get(f"{arch}.vocab_size", vocab_size),
            hidden_size=hidden,
            intermediate_size=meta[f"{arch}.feed_forward_length"],
            num_layers=meta[f"{arch}.block_count"],
            num_heads=heads,
            num_kv_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
            head_dim=meta.get(f"{arch}.attention.key_length", hidden // heads),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_freq_factors=rope_freq_factors,
            rms_norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
            max_position_embeddings=meta.get(f"{arch}.context_length", 2048),
            tie_word_embeddings=not has_output,
            attention_bias=has_qkv_bias,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (eos,),
        )
