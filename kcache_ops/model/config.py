"""LlamaConfig: the hyper-parameters of a Llama-architecture decoder, from a Hugging Face
config.json or from GGUF metadata."""
import sys
from dataclasses import dataclass, field

from ..integers import int_at_least
from .errors import CheckpointError, UnsupportedModelError

SUPPORTED_HF_TYPES = ("llama", "qwen2")
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")
# the smallest normal float32: a smaller positive value is 0 (or denormal) in float32 math
FLOAT32_TINY = 2.0 ** -126


# the most layers a checkpoint may declare: real ones have at most a few hundred, and the model is
# built before its tensors are read (a corrupt count of millions would take minutes)
MAX_LAYERS = 4096


def _integer(key: str, value, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
    """``value``, read from config key ``key``: an int in [``minimum``, ``maximum``] (not a bool,
    nor a float, even an integral one; by default below 2^31, as every size and id is)."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        got = f"{value!r}" + (" (missing or null)" if value is None else "")
        raise CheckpointError(f"{key} must be an integer in [{minimum}, {maximum}], got {got}")
    return value


def _number(key: str, value, minimum: float) -> float:
    """``value``, read from config key ``key``: an int or float, finite as a float, >= ``minimum``
    (NaN fails the comparison)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not minimum <= value <= sys.float_info.max):
        got = f"{value!r}" + (" (missing or null)" if value is None else "")
        raise CheckpointError(f"{key} must be a finite number >= {minimum:.3g}, got {got}")
    return float(value)


def _freq_factors(key: str, factors, head_dim: int) -> list[float]:
    """``factors``, read from ``key``: one RoPE frequency divisor per rotated pair (head_dim / 2),
    each a finite number >= 1 (like the Llama-3 ``factor``: a smaller one, 0 above all, can
    overflow the angles to NaN)."""
    if len(factors) != head_dim // 2:
        raise CheckpointError(f"{key} must hold head_dim / 2 = {head_dim // 2} factors, got "
                              f"{len(factors)}")
    return [_number(key, f, 1) for f in factors]


def _or(value, default):
    """``value``, read from a config key, or ``default`` where it is null or absent (None)."""
    return default if value is None else value


def _flag(key: str, value) -> bool:
    """``value``, read from config key ``key``: true or false (null, as if absent: false)."""
    if value is not None and not isinstance(value, bool):
        raise CheckpointError(f"{key} must be true or false, got {value!r}")
    return bool(value)


def _rope_kind(rope: dict, theta) -> dict:
    """A HF rope dict (``rope_parameters`` or ``rope_scaling``) as it is read: its ``rope_theta``
    (else ``theta``, the config's top-level one or the default), its type under ``rope_type``
    (old configs say ``type``; none is ``"default"``) and a ``partial_rotary_factor`` of 1 where
    it has none: two that say the same compare equal."""
    kind = {"rope_type" if k == "type" else k: v for k, v in rope.items()}
    kind.setdefault("rope_type", "default")
    kind.setdefault("rope_theta", theta)
    kind.setdefault("partial_rotary_factor", 1)
    return kind


LAYER_TYPES = ("full_attention", "sliding_attention")


def _sliding_window(cfg: dict, model_type: str):
    """The config's ``sliding_window``, or where it has none the model type's default (Qwen2's
    4096, as transformers' Qwen2Config; None for Llama)."""
    return cfg.get("sliding_window", 4096 if model_type == "qwen2" else None)


def _sliding_layers(cfg: dict, model_type: str, layers: int) -> list[int]:
    """The layers of ``layers`` that a sliding window limits, as transformers 5 reads a config.
    Qwen2: with ``use_sliding_window`` (else none) and a ``sliding_window`` (default 4096; null:
    none), the layers ``layer_types`` names "sliding_attention", or without that list those from
    ``max_window_layers`` (default 28) on. Llama: every layer where it has a ``sliding_window``
    (its forward without a cache ignores the key, but generate's cache keeps that many keys of
    each layer, whatever ``use_sliding_window`` says), else those ``layer_types`` names."""
    use = _flag("use_sliding_window", cfg.get("use_sliding_window"))
    types = cfg.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != layers
                              or not set(types) <= set(LAYER_TYPES)):
        raise CheckpointError(f"layer_types must be a list of num_hidden_layers = {layers} "
                              f"names, each one of {LAYER_TYPES}, got {types!r}")
    if model_type != "qwen2" and _sliding_window(cfg, model_type) is not None:
        return list(range(layers))
    if model_type == "qwen2" and (not use or _sliding_window(cfg, model_type) is None):
        return []
    if types is None:
        return (list(range(_integer("max_window_layers", cfg.get("max_window_layers", 28), 0),
                           layers)) if model_type == "qwen2" else [])
    return [i for i, kind in enumerate(types) if kind == "sliding_attention"]


# the most elements of one weight: torch counts a tensor's bytes in an int64, 8 bytes an element
# at most (float64)
MAX_TENSOR_ELEMENTS = 2**59

SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
         "num_kv_heads", "head_dim")  # the fields of LlamaConfig that count something


@dataclass
class LlamaConfig:
    """Shapes and constants of a Llama decoder (also Qwen2, which adds a bias to Q, K and V).

    ``attention_bias``: a bias on Q, K and V; ``output_bias``: one on the attention's output
    projection too (Llama's ``attention_bias`` sets both; Qwen2 has the first alone).

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
    output_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for name in SIZES:  # from_hf and from_gguf check them first, naming the file's keys
            n = int_at_least(getattr(self, name), 1)
            if n is None:
                raise ValueError(f"LlamaConfig: {name} must be an integer >= 1, got "
                                 f"{getattr(self, name)!r}")
            setattr(self, name, n)
        for weight, rows, cols in (("the embedding", self.vocab_size, self.hidden_size),
                                   ("q_proj", self.num_heads * self.head_dim, self.hidden_size),
                                   ("an MLP projection", self.intermediate_size,
                                    self.hidden_size)):
            if rows * cols > MAX_TENSOR_ELEMENTS:  # sizes each in range, their product not
                raise UnsupportedModelError(f"{weight} would be a {rows} x {cols} matrix, "
                                            f"{rows * cols} elements: more than a tensor can hold "
                                            f"(2^59), from sizes {self._sizes()}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"num_heads ({self.num_heads}) must be a multiple of "
                                        f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim ({self.head_dim}) must be even (RoPE rotates "
                                        "pairs of dimensions)")
        if self.rope_scaling is not None and self.rope_freq_factors is not None:
            raise ValueError("set rope_scaling or rope_freq_factors, not both")
        if self.rope_freq_factors is not None:  # as a GGUF's are checked, for a config built here
            self.rope_freq_factors = _freq_factors("rope_freq_factors", self.rope_freq_factors,
                                                   self.head_dim)

    def _sizes(self):
        """The sizes, for an error: "name value, ..."."""
        return ", ".join(f"{name} {getattr(self, name)}" for name in SIZES)

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """From the dict of a Hugging Face config.json (``model_type`` llama or qwen2).

        A required key that is missing raises KeyError; a key of the wrong type or out of range
        raises CheckpointError naming it. Sizes are ints >= 1; ``rms_norm_eps`` is at least
        FLOAT32_TINY (0 turns an all-zero hidden state into NaN); ``rope_theta`` and the Llama-3
        ``factor`` are at least 1 (smaller ones can overflow the float32 RoPE angles to NaN).
        Read as transformers 5 reads them: ``hidden_act`` "swish" is SiLU; a Llama-3 scaling
        without ``original_max_position_embeddings`` takes ``max_position_embeddings``; a linear
        scaling of factor 1 is none; a sliding window is refused only where it limits a layer.
        """
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_HF_TYPES:
            raise UnsupportedModelError(f"unsupported architecture: model_type {model_type!r} "
                                        f"(architectures {cfg.get('architectures')}); supported: "
                                        f"{', '.join(SUPPORTED_HF_TYPES)}")
        quantization = cfg.get("quantization_config")
        if quantization is not None:
            method = (quantization.get("quant_method") if isinstance(quantization, dict)
                      else quantization)
            raise UnsupportedModelError(f"unsupported: quantized weights (quantization_config."
                                        f"quant_method {method!r}); this decoder loads float "
                                        f"weights")
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers: both SiLU
            raise UnsupportedModelError(f"unsupported hidden_act {cfg['hidden_act']!r} (need silu "
                                        f"or swish)")
        if _flag("mlp_bias", cfg.get("mlp_bias")):
            raise UnsupportedModelError("unsupported: mlp_bias=true")
        layers = _integer("num_hidden_layers", cfg["num_hidden_layers"], 1, MAX_LAYERS)
        sliding = _sliding_layers(cfg, model_type, layers)
        if sliding:
            raise UnsupportedModelError(f"unsupported: a sliding window (sliding_window "
                                        f"{_sliding_window(cfg, model_type)}) on layers "
                                        f"{sliding} (this decoder attends every key)")
        max_pos = _integer("max_position_embeddings", _or(cfg.get("max_position_embeddings"),
                                                          32768 if model_type == "qwen2" else 2048))
        # transformers >= 5 writes "rope_parameters" (theta and scaling together); older versions
        # write "rope_theta" and "rope_scaling".
        for key in ("rope_parameters", "rope_scaling"):
            if not isinstance(cfg.get(key), (dict, type(None))):
                raise CheckpointError(f"{key} must be an object or null, got {cfg[key]!r}")
        theta = cfg.get("rope_theta", 10000.0)
        if cfg.get("rope_parameters") and cfg.get("rope_scaling") and \
                _rope_kind(cfg["rope_parameters"], theta) != _rope_kind(cfg["rope_scaling"], theta):
            raise CheckpointError(f"rope_parameters and rope_scaling disagree (transformers 5 "
                                  f"reads rope_scaling, 4 rope_parameters not at all; theta not "
                                  f"in one is rope_theta's, else 10000): "
                                  f"{cfg['rope_parameters']} and {cfg['rope_scaling']}")
        rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        rope = dict(cfg.get(rope_key) or {})
        theta_key = f"{rope_key}.rope_theta" if "rope_theta" in rope else "rope_theta"
        theta = _number(theta_key, rope.pop("rope_theta", theta), 1)
        for key, part in ((f"{rope_key}.partial_rotary_factor", rope.get("partial_rotary_factor")),
                          ("partial_rotary_factor", cfg.get("partial_rotary_factor"))):
            if part is not None and _number(key, part, FLOAT32_TINY) != 1:
                raise UnsupportedModelError(f"unsupported: {key} = {part}, RoPE on part of a "
                                            f"head (this decoder rotates the whole head)")
        if "rope_type" not in rope and "type" not in rope and rope.get("factor", 1) != 1:
            raise UnsupportedModelError(f"unsupported: {rope_key}.factor = {rope['factor']} "
                                        f"without a rope_type (which scaling it means is not said)")
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            top = cfg.get("original_max_position_embeddings")  # transformers 5 reads it first
            if top is not None and rope.setdefault("original_max_position_embeddings", top) != top:
                raise CheckpointError(
                    f"original_max_position_embeddings ({top}) and "
                    f"{rope_key}.original_max_position_embeddings "
                    f"({rope['original_max_position_embeddings']}) disagree (transformers 5 "
                    f"takes the first, 4 the second)")
            if "original_max_position_embeddings" not in rope:  # transformers 5's default
                rope["original_max_position_embeddings"] = max_pos
            scaling = {
                "factor": _number(f"{rope_key}.factor", rope.get("factor"), 1),
                "low_freq_factor": _number(f"{rope_key}.low_freq_factor",
                                           rope.get("low_freq_factor"), FLOAT32_TINY),
                "high_freq_factor": _number(f"{rope_key}.high_freq_factor",
                                            rope.get("high_freq_factor"), FLOAT32_TINY),
                "original_max_position_embeddings": _integer(
                    f"{rope_key}.original_max_position_embeddings",
                    rope.get("original_max_position_embeddings")),
            }
            if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
                raise CheckpointError(f"{rope_key}.high_freq_factor ({rope['high_freq_factor']}) "
                                      f"must be greater than low_freq_factor "
                                      f"({rope['low_freq_factor']})")
        elif rope_type == "linear" and rope.get("factor") == 1:  # positions divided by 1
            scaling = None
        else:
            raise UnsupportedModelError(f"unsupported rope scaling type {rope_type!r} "
                                        "(supported: default, llama3, and linear of factor 1)")
        hidden = _integer("hidden_size", cfg["hidden_size"])
        heads = _integer("num_attention_heads", cfg["num_attention_heads"])
        bos = cfg.get("bos_token_id")
        bias = _flag("attention_bias", cfg.get("attention_bias"))
        vocab = _integer("vocab_size", cfg["vocab_size"])
        eos = cfg.get("eos_token_id")

        def token(key, value):
            """A token id of the vocabulary, read from config key ``key``."""
            if _integer(key, value, 0) >= vocab:
                raise CheckpointError(f"{key} {value} is outside the vocabulary of {vocab}")
            return value
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_integer("intermediate_size", cfg["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            # null as absent, as transformers reads them; 0 is refused, not taken for null
            num_kv_heads=_integer("num_key_value_heads",
                                  _or(cfg.get("num_key_value_heads"), heads)),
            head_dim=_integer("head_dim", _or(cfg.get("head_dim"), hidden // heads)),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=_number("rms_norm_eps", cfg.get("rms_norm_eps", 1e-6), FLOAT32_TINY),
            max_position_embeddings=max_pos,  # transformers' default where unset (or null)
            tie_word_embeddings=_flag("tie_word_embeddings", cfg.get("tie_word_embeddings")),
            # Qwen2 always has a bias on Q, K and V, never on O; Llama one on all four only where
            # attention_bias says so
            attention_bias=bias or model_type == "qwen2",
            output_bias=bias and model_type != "qwen2",
            bos_token_id=None if bos is None else token("bos_token_id", bos),
            eos_token_ids=tuple(token("eos_token_id", e) for e in
                                (eos if isinstance(eos, list) else [] if eos is None else [eos])),
        )

    @classmethod
    def from_gguf(cls, meta: dict, vocab_size: int, has_output: bool, has_qkv_bias: bool,
                  rope_freq_factors: list[float] | None,
                  has_output_bias: bool = False) -> "LlamaConfig":
        """From GGUF metadata (``general.architecture`` llama or qwen2).

        ``vocab_size`` is the token count of the vocabulary, ``has_output`` whether the file holds
        its own ``output.weight`` (else the embeddings are tied), ``has_qkv_bias`` whether it holds
        ``attn_q.bias`` and its kin, ``has_output_bias`` ``attn_output.bias``,
        ``rope_freq_factors`` the
        contents of ``rope_freqs.weight`` if present. Values are checked as in :meth:`from_hf`
        (a required key that is missing is a CheckpointError too), each rope frequency factor
        like the Llama-3 ``factor``.
        """
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHS:
            raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; supported: "
                                        f"{', '.join(SUPPORTED_GGUF_ARCHS)}")
        scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling_type != "none":
            raise UnsupportedModelError(f"unsupported GGUF rope scaling type {scaling_type!r}")
        for key in (f"{arch}.rope.scaling.factor", f"{arch}.rope.scale_linear"):
            factor = meta.get(key)  # without a type llama.cpp takes a factor as linear scaling
            if f"{arch}.rope.scaling.type" not in meta and factor not in (None, 0, 1):
                raise UnsupportedModelError(f"unsupported GGUF rope scaling: {key} = {factor} "
                                            f"without a type (linear, as llama.cpp takes it)")

        def get(name, default=None):  # (key, value) of metadata "{arch}.{name}", for the checks
            return f"{arch}.{name}", meta.get(f"{arch}.{name}", default)

        hidden = _integer(*get("embedding_length"))
        heads = _integer(*get("attention.head_count"))
        head_dim = _integer(*get("attention.key_length", hidden // heads))
        for name, what in (("attention.value_length", "V heads of another size than K's"),
                           ("rope.dimension_count", "RoPE on part of a head")):
            key, size = get(name, head_dim)
            if _integer(key, size) != head_dim:
                raise UnsupportedModelError(f"unsupported: {key} = {size}, not the head dim "
                                            f"{head_dim}: {what} (this decoder has one head "
                                            f"size and rotates the whole head)")
        if rope_freq_factors is not None:
            rope_freq_factors = _freq_factors("rope_freqs.weight", rope_freq_factors, head_dim)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        ends = [(key, meta[key]) for key in ("tokenizer.ggml.eos_token_id",
                                              "tokenizer.ggml.eot_token_id")
                if meta.get(key) is not None]
        return cls(
            vocab_size=_integer(*get("vocab_size", vocab_size)),
            hidden_size=hidden,
            intermediate_size=_integer(*get("feed_forward_length")),
            num_layers=_integer(*get("block_count"), 1, MAX_LAYERS),
            num_heads=heads,
            num_kv_heads=_integer(*get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rope_theta=_number(*get("rope.freq_base", 10000.0), 1),
            rope_freq_factors=rope_freq_factors,
            rms_norm_eps=_number(*get("attention.layer_norm_rms_epsilon"), FLOAT32_TINY),
            max_position_embeddings=_integer(*get("context_length", 2048)),
            tie_word_embeddings=not has_output,
            attention_bias=has_qkv_bias,
            output_bias=has_output_bias,
            bos_token_id=None if bos is None else _integer("tokenizer.ggml.bos_token_id", bos, 0),
            eos_token_ids=tuple(dict.fromkeys(_integer(key, e, 0) for key, e in ends)),
        )
