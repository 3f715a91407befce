"""KCache inside Hugging Face transformers models: a cache for ``generate`` and the attention
implementation ``"kcache"`` (DESIGN.md §1, §3, §4; issue 11).

    import kcache_ops.integrations.transformers as kt
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kcache")
    cache = kt.KCacheCache(model, max_cache_len=4096, topn=64)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

How transformers' two extension points meet. Every attention layer of a Llama-family model calls
``cache.update(k, v, layer)`` and then the attention function with the keys and values that
``update`` returned. The cache's ``update`` (:class:`CacheBridge`) stores nothing itself: it
returns k and v as they came and notes them as the layer's pending call; :func:`kcache_attention`
claims that call (the same key tensor object, so a call can only pair with its own update) and runs
the layer through the kcache_ops cache the bridge holds (for :class:`KCacheCache`, a
:class:`kcache_ops.caches.KCache` built at the prefill):

* prefill (the first forward into an empty cache): exact attention — transformers' own SDPA
  function with transformers' mask — then each sequence's prompt K and V, compacted (its
  padding dropped: K already carries RoPE, so the row a key sits in does not matter), go to
  ``store_prompt``: K in device memory, V handed off to ``alloc_host`` memory (CUDA: on the
  side stream, behind this layer's attention).
* decode (one new token per sequence): ``decode`` stores the token and attends (KCache: through
  ``qk_topn`` + ``sparse_attn_v``); no host sync: the step reads no attention mask, and
  :func:`kcache_mask` has transformers build none.

transformers' own bookkeeping (positions, masks, ``get_seq_length``) keeps counting the padded
length; the KCache keeps the true per-sequence lengths. Without a KCacheCache (a plain forward, or
``generate`` with transformers' own cache), ``"kcache"`` attention is exact SDPA.
"""
import math
import threading
import warnings
from importlib.metadata import PackageNotFoundError, version
from types import SimpleNamespace

import torch

from . import TRANSFORMERS_REQUIREMENT


def check_transformers_version(found):
    """Raise ImportError unless transformers version ``found`` (a string) is in the tested range."""
    from packaging.requirements import Requirement
    specifier = Requirement(TRANSFORMERS_REQUIREMENT).specifier
    if not specifier.contains(found, prereleases=True):
        raise ImportError(
            f"kcache_ops.integrations.transformers is tested with {TRANSFORMERS_REQUIREMENT}, but "
            f"transformers {found} is installed; install a tested version with "
            f"pip install 'kcache_ops[transformers]' (or pip install "
            f"'{TRANSFORMERS_REQUIREMENT}')")


try:
    check_transformers_version(version("transformers"))
except PackageNotFoundError:
    raise ImportError("kcache_ops.integrations.transformers needs transformers; install it with "
                      "pip install 'kcache_ops[transformers]'") from None

# after the version check: these are the extension points of the tested range
from transformers import AttentionInterface, AttentionMaskInterface  # noqa: E402
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import sdpa_mask  # noqa: E402

from ..caches import KCache, KCacheOptions, check_kcache  # noqa: E402
from ..integers import int_at_least  # noqa: E402
from ..ops import HEAD_DIMS  # noqa: E402

ATTN_IMPLEMENTATION = "kcache"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# a default max_cache_len (the model's positions) above this warns: each prefill allocates K and
# host V for that many tokens a sequence (Llama-3.1's 131072: 16 GiB for one sequence at 8B)
LARGE_DEFAULT_CACHE = 32768

# On this thread: ``cache``, the cache whose update ran last and whose attention has not run yet;
# ``decode_keys``, (config, keys) of the decode step whose mask sizes a cache gave last, which
# kcache_mask builds no mask for.
_active = threading.local()


def check_model(model, max_cache_len=None):
    """Raise ValueError unless ``model`` is a transformers model KCache serves exactly.

    Checks the model type (the Llama family: ``SUPPORTED_MODEL_TYPES``), full attention on every
    layer (a sliding window is accepted only when ``max_cache_len`` fits inside it, so it never
    binds; ``max_cache_len=None`` leaves that check to the cache), the head dim, and that the model
    sits on one device.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"KCache: model type {model_type!r} ({type(model).__name__}) is not "
                         f"supported; supported are the Llama family as transformers implements "
                         f"it: {', '.join(SUPPORTED_MODEL_TYPES)}")
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if other:
        raise ValueError(f"KCache: {model_type} layer types {other} are not supported; "
                         "only full attention layers are")
    window = getattr(config, "sliding_window", None)
    if window is not None and (model_type == "mistral" or "sliding_attention" in layer_types):
        if max_cache_len is not None and max_cache_len > window:
            raise ValueError(
                f"KCache: this {model_type} model attends through a sliding window of {window} "
                f"tokens, and KCache attends over every cached token; that is exact only while a "
                f"sequence fits the window, so max_cache_len must be <= {window} (got "
                f"{max_cache_len})")
    head_dim = head_dim_of(config)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"KCache: {model_type} head dim {head_dim} is not supported; the kcache "
                         f"ops serve head dims {HEAD_DIMS}")
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise ValueError(f"KCache: the model spans devices {sorted(map(str, devices))}; KCache "
                         "serves a model on one device")


def enable(model):
    """Switch a loaded Llama-family ``model`` to ``attn_implementation="kcache"`` (after
    :func:`check_model`) and return it; the same as loading it with that argument."""
    check_model(model)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def head_dim_of(config):
    """The head dim D of a transformers config (``head_dim``, else hidden size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class _KCacheLayer(CacheLayerMixin):
    """One layer's view of a :class:`KCacheCache` for transformers: its padded token count
    (``seen``; transformers is told the owner's :meth:`~CacheBridge.held`), and the generation
    features KCache does not support, refused."""

    is_sliding = False
    supports_early_init = False

    def __init__(self, owner, index):
        super().__init__()
        self.owner = owner
        self.index = index
        self.seen = 0  # tokens per sequence as transformers counts them: padded prompt + steps

    def lazy_initialization(self, key_states, value_states):
        """Nothing to do: the owner allocates its KCache at the prefill."""

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner._update(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length):
        # asked before any layer runs: a cache reused for a prompt no longer than it holds gets
        # no tokens past them from generate, a forward of 0 tokens that would fail in a reshape
        held = self.owner.held()
        self.owner._check_forward(held, query_length)
        # a decode step's model and key count, for kcache_mask, which transformers calls next
        decode = held > 0 and query_length == 1
        _active.decode_keys = (self.owner._config, held + 1) if decode else None
        return held + query_length, 0

    def get_seq_length(self):
        return self.owner.held()

    def get_max_length(self):
        return self.owner.capacity

    def reset(self):
        self.seen = 0

    def _refuse(self, feature):
        raise NotImplementedError(f"{type(self.owner).__name__} does not support {feature}")

    def reorder_cache(self, beam_idx):
        self._refuse("beam search (reorder_cache); use greedy or sampled generation")

    def crop(self, tokens_to_remove):
        if tokens_to_remove != 0:
            self._refuse("crop (assisted or speculative generation, rollback)")

    def batch_repeat_interleave(self, repeats):
        self._refuse("batch_repeat_interleave (num_return_sequences > 1 or beam expansion after "
                     "the prefill); repeat the prompts instead")

    def batch_select_indices(self, indices):
        self._refuse("batch_select_indices (contrastive search)")

    def offload(self):
        self._refuse("offloading (V already lives in host RAM)")

    def prefetch(self):
        self._refuse("offloading (V already lives in host RAM)")


class CacheBridge(Cache):
    """A transformers cache whose attention layers run through one of kcache_ops' caches (their
    protocol: ``store_prompt``, ``finish_prefill``, ``decode``, ``finish_decode``; see
    kcache_ops.caches.protocol), for a model with ``attn_implementation="kcache"``.

    :class:`KCacheCache` builds a KCache at each prefill; the transformers engine
    (transformers_engine.py, of ``eval`` and ``bench --engine transformers``) hands in the cache
    it built itself.

    Parameters
    ----------
    model : transformers PreTrainedModel
        Llama, Mistral, Qwen2, Qwen3 (SmolLM is Llama); see :func:`check_model`.
    capacity : int
        Tokens per sequence transformers may put in, padding included.
    inner : kcache_ops cache, optional
        The cache to run through; None: made at the prefill by :meth:`_make_inner`.
    seen : int
        Tokens per sequence ``inner`` already holds as transformers counts them (0: the next
        forward is the prefill).
    check : bool
        Whether to :func:`check_model` (False: the caller has, for this capacity; the check walks
        every parameter, too slow for each decode step).

    Attributes
    ----------
    inner : kcache_ops cache or None
        The cache the layers run through: K [B, Hkv, S, D] per layer on the device, V in host RAM
        (KCache), ``seq_lens`` [B] int32 without padding.

    Not supported (each raises NotImplementedError): beam search, more than one sequence per
    prompt after the prefill, assisted/speculative generation, a forward of more than one token
    after the prefill (chunked prefill, continuing from a filled cache: call :meth:`reset` first).
    """

    def __init__(self, model, capacity, inner=None, seen=0, check=True):
        config = model.config
        if check:
            check_model(model, capacity)
        if config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"{type(self).__name__}: the model attends with {config._attn_implementation!r}; "
                f"load it with attn_implementation={ATTN_IMPLEMENTATION!r} or call "
                "kcache_ops.integrations.transformers.enable(model) first")
        super().__init__(layers=[_KCacheLayer(self, i) for i in range(config.num_hidden_layers)])
        for layer in self.layers:
            layer.seen = seen
        self.capacity = capacity  # S: tokens per sequence, padding included
        self.inner = inner
        self._config = config
        self._pending = None  # (layer, key tensor) of the update whose attention has not run
        self._prompt = None   # at the prefill: (order [B, T] long or None, lens [B] int32)

    def _make_inner(self, batch, device, dtype):
        """The cache a prefill of ``batch`` sequences runs into: the one given."""
        if self.inner is None:
            raise RuntimeError(f"{type(self).__name__}: no cache to prefill into")
        return self.inner

    # -- transformers' side ---------------------------------------------------------------------

    # the cache's bookkeeping (Python ints it changes per layer) and the kcache ops run outside a
    # compiled graph: inductor's code read a symbol of a guard the counters had changed
    @torch.compiler.disable
    def _update(self, layer, key, value):
        """``update`` of layer ``layer`` with key/value [B, Hkv, T, D] (RoPE applied): checks, and
        marks the call pending for :func:`kcache_attention`; returns (key, value) unchanged."""
        name = type(self).__name__
        if self._config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"{name}: the model now attends with "
                               f"{self._config._attn_implementation!r}; it needs "
                               f"attn_implementation={ATTN_IMPLEMENTATION!r}")
        if self._pending is not None:
            raise RuntimeError(f"{name}: the attention of layer {self._pending[0]} did not run "
                               f"through attn_implementation={ATTN_IMPLEMENTATION!r}, or the "
                               "forward stopped early; call reset() before reusing this cache")
        if layer == 0 and self.layers[0].seen != self.held():
            self._rewind(self.held())  # the forward before stopped between two layers
        seen, t = self.layers[layer].seen, key.shape[2]
        self._check_forward(seen, t)
        if seen + t > self.capacity:
            raise ValueError(f"{name}: capacity overflow: {seen + t} tokens per sequence (padding "
                             f"included) exceed max_cache_len={self.capacity}")
        if layer == 0:
            if seen == 0:
                self.inner = self._make_inner(key.shape[0], key.device, _attention_dtype(key))
        elif self.layers[0].seen != seen + t:
            raise RuntimeError(f"{name}: layer {layer} ran out of order (layer 0 holds "
                               f"{self.layers[0].seen} tokens, this layer {seen})")
        if key.shape[0] != self.inner.seq_lens.shape[0]:
            raise ValueError(f"{name}: a batch of {key.shape[0]} sequences, but the prefill had "
                             f"{self.inner.seq_lens.shape[0]}")
        self.layers[layer].seen = seen + t
        self._pending = (layer, key)
        _active.cache = self
        return key, value

    def _check_forward(self, seen, t):
        """Refuse a forward of ``t`` tokens after the ``seen`` a layer holds unless it is one
        decode step (or the prefill, ``seen`` 0)."""
        if seen > 0 and t != 1:
            raise NotImplementedError(
                f"{type(self).__name__}: a forward of {t} tokens after the prefill, while the "
                f"cache holds {seen} (chunked prefill, assisted or speculative generation, a "
                "continued conversation, a cache reused for a new prompt, or generate with "
                "use_cache=False, which runs the whole sequence each step) is not supported; "
                "decode one token per step, or reset() and prefill again")

    def reset(self):
        """Forget the cached tokens (the buffers go with them); the next forward is a prefill."""
        super().reset()
        self.inner = None
        self._pending = None
        self._prompt = None

    # -- the attention ------------------------------------------------------------------------

    @torch.compiler.disable
    def _attend(self, module, query, key, value, attention_mask, dropout, scaling, kwargs):
        """The attention of the pending layer. query [B, Hq, T, D], key/value [B, Hkv, T, D]
        -> ([B, T, Hq, D], None), transformers' attention output convention. Under autocast it
        attends in autocast's dtype, as SDPA would, with autocast off inside the cache."""
        layer = self._pending[0]
        self._pending = None
        done = self.layers[layer].seen - key.shape[2]  # tokens before this forward
        try:
            if getattr(module, "layer_idx", layer) != layer:
                raise RuntimeError(f"{type(self).__name__}: the attention of layer "
                                   f"{module.layer_idx} ran after the cache update of layer "
                                   f"{layer}")
            last = layer == len(self.layers) - 1
            dtype = _attention_dtype(key)
            query, key, value = (x.to(dtype) for x in (query, key, value))
            with torch.autocast(key.device.type, enabled=False):
                if done == 0:  # the prefill
                    return self._prefill(layer, last, module, query, key, value, attention_mask,
                                         dropout, scaling, kwargs), None
                out = self.inner.decode(layer, query[:, :, 0], key[:, :, 0], value[:, :, 0])
                if last:
                    self.inner.finish_decode()
        except BaseException:
            self._rewind(done)
            raise
        return out[:, None], None  # [B, Hq, D] -> [B, 1, Hq, D]

    def held(self):
        """Tokens per sequence of the forwards that went through every layer: the last layer's
        count (a forward stopped part way runs again from there), what transformers is told."""
        return self.layers[-1].seen

    def _rewind(self, done):
        """Give up a forward that stopped part way (an error in a layer): every layer back to the
        ``done`` tokens before it, so that it can run again (the inner cache takes a prompt or a
        step again from its first layer)."""
        for layer in self.layers:
            layer.seen = done
        self._prompt = None

    def _prefill(self, layer, last, module, query, key, value, attention_mask, dropout, scaling,
                 kwargs):
        """Exact attention over the prompt ([B, T, Hq, D]), and its K and V into the cache."""
        layers = getattr(getattr(module, "config", None), "num_hidden_layers", len(self.layers))
        if layers != len(self.layers):  # a layer never run would hold the steps back
            raise ValueError(f"{type(self).__name__}: built for a model of {len(self.layers)} "
                             f"layers, run by one of {layers}: a cache serves the model it was "
                             f"built for")
        head_dim = query.shape[-1]
        if scaling is not None and not math.isclose(scaling, head_dim ** -0.5):
            raise ValueError(f"KCache: attention scaling {scaling} is not 1/sqrt(head_dim) "
                             f"= {head_dim ** -0.5}, which the kcache ops use")
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        dropout=dropout, scaling=scaling, **kwargs)
        if layer == 0:
            self._prompt = _prompt_layout(attention_mask, key)
        order, lens = self._prompt
        self.inner.store_prompt(layer, _compact(key, order), _compact(value, order), lens)
        if last:
            self.inner.finish_prefill(lens)
            self._prompt = None
        return out

    # -- accounting -----------------------------------------------------------------------------

    def device_bytes(self):
        """Bytes the inner cache holds in device memory (its ``device_bytes``); 0 before the
        prefill."""
        return 0 if self.inner is None else self.inner.device_bytes()

    def host_bytes(self):
        """Bytes the inner cache holds in host RAM (its ``host_bytes``); 0 before the prefill."""
        return 0 if self.inner is None else self.inner.host_bytes()

    def host_bytes_read_per_step(self):
        """Bytes a decode step moves between host RAM and the device (the inner cache's count,
        kcache_ops.caches.protocol); 0 before the prefill."""
        return 0 if self.inner is None else self.inner.host_bytes_read_per_step()

    def device_bytes_read_per_step(self, tokens):
        """Bytes of device memory a decode step reads while every sequence holds ``tokens`` keys
        (the inner cache's count, kcache_ops.caches.protocol); 0 before the prefill."""
        return 0 if self.inner is None else self.inner.device_bytes_read_per_step(tokens)


class KCacheCache(CacheBridge):
    """A transformers cache that runs a Llama-family model with KCache: pass it to
    ``model.generate(..., past_key_values=cache)`` (or to the model's forward) on a model loaded
    with ``attn_implementation="kcache"`` (or switched by :func:`enable`). Each prefill builds a
    fresh :class:`kcache_ops.caches.KCache` (``cache.inner``) for its batch.

    Parameters
    ----------
    model : transformers PreTrainedModel
        Llama, Mistral, Qwen2, Qwen3 (SmolLM is Llama); see :func:`check_model`.
    max_cache_len : int, optional
        Tokens per sequence the cache holds, the padded prompt and the new tokens together.
        Default: ``model.config.max_position_embeddings`` (with a warning above
        :data:`LARGE_DEFAULT_CACHE`). K is allocated on the model's device and V in host RAM for
        this many tokens at the prefill.
    options : kcache_ops.caches.KCacheOptions, optional
        N, group select, renormalization, dense layers, tail, top_p, hot rows, reuse
        (DESIGN.md §3, ``KCacheOptions``' defaults where not given); or give them by name
        (``topn=64, tail="int2", sinks=4, window=60, reuse=0, ...``), not both.

    The rest is :class:`CacheBridge`'s (``inner``, what is not supported).
    """

    def __init__(self, model, max_cache_len=None, options=None, **named_options):
        if options is None:
            options = KCacheOptions.from_dict(named_options)
        elif not isinstance(options, KCacheOptions):
            raise TypeError(f"KCacheCache: options must be a KCacheOptions (or give them by "
                            f"name: topn=...), got {type(options).__name__}")
        elif named_options:
            raise TypeError(f"KCacheCache: give the options as a KCacheOptions or by name, not "
                            f"both (got options= and {', '.join(sorted(named_options))})")
        config = model.config
        if max_cache_len is None:
            max_cache_len = config.max_position_embeddings
            if int_at_least(max_cache_len, LARGE_DEFAULT_CACHE + 1) is not None:
                warnings.warn(f"KCacheCache: max_cache_len defaults to the model's "
                              f"max_position_embeddings, {max_cache_len}: each prefill allocates "
                              f"K on the device and V in host RAM for that many tokens per "
                              f"sequence; pass max_cache_len (the longest prompt plus "
                              f"max_new_tokens) to allocate what the generation uses",
                              stacklevel=2)
        length = int_at_least(max_cache_len, 1)  # any integer type, not a bool nor a float
        if length is None:
            raise ValueError(f"KCacheCache: max_cache_len must be an integer >= 1, got "
                             f"{max_cache_len!r}")
        max_cache_len = length
        super().__init__(model, max_cache_len)
        self.options = options
        self._shape = SimpleNamespace(num_layers=config.num_hidden_layers,
                                      num_heads=config.num_attention_heads,
                                      num_kv_heads=config.num_key_value_heads,
                                      head_dim=head_dim_of(config))
        # what the KCache of each prefill checks (a reuse pool too small for a step, say)
        check_kcache(self._shape, model.device, model.dtype, options, max_cache_len)

    def _make_inner(self, batch, device, dtype):
        """A fresh KCache for the batch (the previous generation's buffers freed first); its
        buffers are ordinary tensors even when the prefill runs under torch.inference_mode, so
        that decode steps outside it can write into them, as into transformers' own caches."""
        self.inner = None
        with torch.inference_mode(False):
            return KCache(self._shape, batch, self.capacity, device, dtype, self.options)


def _attention_dtype(x):
    """The dtype a layer attends in: where autocast is on for ``x``'s device, autocast's (SDPA
    casts its inputs to it, so transformers' Llama attends in it while RoPE leaves K in float32
    and V in the autocast dtype); else ``x``'s."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _prompt_layout(attention_mask, key):
    """Where each sequence's prompt tokens are, from transformers' prefill mask.

    attention_mask: [B or 1, 1, T, T] bool (True: attend) or additive float (0: attend), or None
    (no padding); key [B, Hkv, T, D]. The last query row of a sequence sees all its tokens.
    Returns (order [B, T] long: the token positions, the sequence's own first, in order — None
    without padding; lens [B] int32: tokens per sequence), on key's device.
    """
    b, t = key.shape[0], key.shape[2]
    if attention_mask is None:
        return None, torch.full((b,), t, dtype=torch.int32, device=key.device)
    if attention_mask.dim() != 4 or attention_mask.shape[-1] != t:
        raise ValueError(f"KCache: expected a prefill mask [B, 1, {t}, {t}], got "
                         f"{tuple(attention_mask.shape)}")
    last_row = attention_mask[:, 0, -1, :].expand(b, t)  # [B, T]
    valid = last_row if last_row.dtype == torch.bool else last_row == 0  # [B, T] bool
    order = torch.sort((~valid).to(torch.uint8), dim=-1, stable=True).indices  # [B, T]
    return order, valid.sum(-1, dtype=torch.int32)


def _compact(x, order):
    """x [B, Hkv, T, D] with each sequence's rows gathered to the front in ``order`` [B, T]."""
    if order is None:
        return x
    return x.gather(2, order[:, None, :, None].expand(x.shape))


def kcache_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    """The attention function registered as ``attn_implementation="kcache"``.

    query [B, Hq, T, D], key/value [B, Hkv, S, D], attention_mask as for ``"sdpa"``
    -> (out [B, T, Hq, D], None). Runs the layer through the :class:`CacheBridge` whose update
    returned ``key``; anything else is exact SDPA.
    """
    cache = getattr(_active, "cache", None)
    if cache is not None and cache._pending is not None and cache._pending[1] is key:
        _active.cache = None
        return cache._attend(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    if query.shape[2] == 1 and key.shape[2] > 1:
        warnings.warn("attn_implementation='kcache' is decoding without a KCacheCache, so it "
                      "attends densely; pass past_key_values=KCacheCache(model, ...) to generate",
                      stacklevel=2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def kcache_mask(*args, **kwargs):
    """The attention-mask function registered as ``attn_implementation="kcache"``'s: none for a
    decode step of a :class:`KCacheCache`, whose KCache knows each sequence's prompt and reads no
    decode step's mask (transformers' SDPA mask of a step reads a tensor on the host, whether any
    key is padding, and grows by a key each step: no CUDA graph could hold it); the SDPA mask
    otherwise (a prefill, a model without a KCacheCache)."""
    decode = getattr(_active, "decode_keys", None)  # from the cache's get_mask_sizes just before
    _active.decode_keys = None
    if decode is not None and kwargs.get("config") is decode[0] and kwargs.get("q_length") == 1 \
            and kwargs.get("kv_length") == decode[1]:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, kcache_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kcache_mask)
