"""A compact reference Llama decoder (also Qwen2: the same with a bias on Q, K and V).

Shapes: B batch, T tokens, E hidden size, F MLP size, V vocabulary, Hq query heads, Hkv KV heads,
D head dim. The attention of each layer goes through the cache the caller passes in, any object of
the protocol of kcache_ops/caches/protocol.py (the model imports no cache; callers build one with
``kcache_ops.caches.make_cache``), so the same weights run with the ``dense`` KV cache or with
KCache. Module names follow Hugging Face's (minus its ``model.`` prefix), so a Hugging Face state
dict loads as it is.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..integers import is_integer_dtype
from .config import LlamaConfig
from .errors import CheckpointError
from .rope import apply_rope, inv_frequencies, rope_cos_sin

# the dtypes the decoder runs in (its matmuls, SDPA); float64 with the dense cache only
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_dtype(owner, dtype):
    """Refuses a ``dtype`` the decoder does not run in (ValueError naming ``owner``): checked
    before the weights are read, not by load_state_dict after reading every tensor."""
    if dtype not in DTYPES:
        names = ", ".join(str(d) for d in DTYPES)
        raise ValueError(f"{owner}: dtype must be one of {names}, got {dtype!r}")


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, normalised in float32 and cast back to the dtype of ``x``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))                          # [E]

    def forward(self, x):                                                    # [..., E]
        xf = x.float()                                                       # [..., E]
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., E]
        return self.weight * xf.type_as(x)                                   # [..., E]


class Attention(nn.Module):
    """Q/K/V projections, RoPE, attention by a callable, output projection."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.hq, self.hkv, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.hq * self.d, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.hkv * self.d, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.hkv * self.d, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.hq * self.d, c.hidden_size, bias=c.output_bias)

    def forward(self, x, cos, sin, attend):
        """x [B, T, E]; cos, sin [B, 1, T, D]; ``attend(q, k, v)`` maps q [B, Hq, T, D] and
        k, v [B, Hkv, T, D] to [B, Hq, T, D]. Returns [B, T, E]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.hq, self.d).transpose(1, 2)      # [B, Hq, T, D]
        k = self.k_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)     # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)     # [B, Hkv, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)             # shapes as above
        out = attend(q, k, v)                                               # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.hq * self.d))  # [B, T, E]


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):                                                    # [B, T, E]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [B, T, E]


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, attend):                                  # x [B, T, E]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)  # [B, T, E]
        return x + self.mlp(self.post_attention_layernorm(x))               # [B, T, E]


class Llama(nn.Module):
    """The decoder: embeddings, ``num_layers`` blocks, final norm, LM head (tied or not).

    Runs a full sequence without a cache (:meth:`forward`), or a prompt into a cache
    (:meth:`prefill`) followed by one token per step (:meth:`decode`). The device and dtype are
    those of the weights.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))

    @classmethod
    def from_weights(cls, config: LlamaConfig, weights, device, dtype) -> "Llama":
        """A model whose parameters are ``weights`` (name -> Tensor, names as in this module),
        each moved to ``device`` and ``dtype`` as it arrives; every parameter must be given. In
        eval mode, its parameters frozen (``requires_grad`` False); ``dtype`` one of
        :data:`DTYPES`."""
        check_dtype("Llama.from_weights", dtype)
        with torch.device("meta"):
            model = cls(config)
        expected = dict(model.state_dict())
        state = {}
        for name, tensor in weights:
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint")
            if name in state:  # in two shards, say: which would win is no choice to make
                raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint")
            if not tensor.dtype.is_floating_point:  # integer weights cast to floats are garbage
                raise CheckpointError(f"tensor {name!r} is {tensor.dtype}, not a floating-point "
                                      f"type (a quantized format this loader does not read?)")
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the "
                                      f"config implies {tuple(expected[name].shape)}")
            state[name] = tensor.to(device=device, dtype=dtype)
            if not torch.isfinite(state[name]).all():  # a corrupt file of the right size
                raise CheckpointError(f"tensor {name!r} holds non-finite values (a corrupt "
                                      f"checkpoint, or one that overflows {dtype})")
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors, "
                                  f"e.g. {missing[:3]}")
        model.load_state_dict(state, assign=True)
        # inference only: called outside no_grad, a decode loop would otherwise grow an autograd
        # graph through the cache, step after step
        return model.eval().requires_grad_(False)

    @property
    def device(self):
        """Where the weights are, and so where the model runs."""
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        """The weights' dtype (logits are returned in float32 regardless)."""
        return self.embed_tokens.weight.dtype

    def _inv_frequencies(self):
        """inv_frequencies [D / 2] on the model's device, computed once (at the first prefill):
        a decode step then copies nothing from the host (a GGUF's rope_freq_factors list would be
        a host-to-device copy, a synchronisation, on every step)."""
        freq = getattr(self, "_inv_freq", None)
        if freq is None or freq.device != self.device:
            freq = self._inv_freq = inv_frequencies(self.config, self.device)
        return freq

    def _run(self, tokens, positions, attend_layer):
        """tokens, positions [B, T] long; ``attend_layer(i, q, k, v)`` is layer i's attention.
        Returns the final hidden states [B, T, E], normalised."""
        cos, sin = rope_cos_sin(positions, self._inv_frequencies())  # [B, 1, T, D]
        x = self.embed_tokens(tokens)                                        # [B, T, E]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, lambda q, k, v, i=i: attend_layer(i, q, k, v))  # [B, T, E]
        return self.norm(x)                                                  # [B, T, E]

    def _logits(self, h):
        """h [..., E] -> logits [..., V] in float32."""
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight  # [V, E]
        return float32_logits(h, head)

    def forward(self, tokens):
        """Causal full-sequence forward, no cache (the parity reference).

        tokens [B, T] long -> logits [B, T, V] float32.
        """
        b, t = tokens.shape
        positions = torch.arange(t, device=self.device).expand(b, t)         # [B, T]

        def causal(i, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self._logits(self._run(tokens, positions, causal))

    def prefill(self, tokens, lens, cache, all_logits=False):
        """Run right-padded prompts into an empty cache.

        Parameters
        ----------
        tokens : Tensor [B, T] int64 or int32 on the model's device, right-padded (the pad values
            are don't-care)
        lens : Tensor [B] of an integer dtype (int32 is what the cache keeps), prompt lengths,
            1 <= lens[b] <= T (0 <= lens[b] with ``all_logits``)
        cache : an empty cache of the protocol of kcache_ops.caches.protocol, for ``B``
            sequences of at least ``T`` tokens
        all_logits : bool

        Their shapes, dtypes and devices are checked (ValueError naming the argument), and the
        values of tokens and lens (this reads them on the host, as a decode step never does).

        Returns
        -------
        logits : Tensor [B, V] float32 at each prompt's last token, or [B, T, V] if ``all_logits``
        (rows past ``lens[b]`` are don't-care).
        """
        batch = _cache_batch("prefill", cache)
        _check_tensor("prefill", "tokens", tokens, [batch, "T"], self.device,
                      "a right-padded prompt per sequence of the cache")
        _check_tensor("prefill", "lens", lens, [batch], None, "the prompt lengths", dtypes=None)
        b, t = tokens.shape
        if t == 0 and not all_logits:
            raise ValueError("prefill: tokens of T = 0 give no token to predict from; give each "
                             "prompt at least one token (or all_logits=True)")
        if lens.numel():  # checked before the cast to int32, which would wrap 2^32 + 3 to 3
            shortest, longest = (int(x) for x in torch.aminmax(lens))  # read at prefill only
            if longest > t or shortest < (0 if all_logits else 1):
                raise ValueError(f"prefill: lens must be in [{0 if all_logits else 1}, {t}] (every "
                                 f"prompt within the T = {t} tokens given"
                                 f"{'' if all_logits else ', with a token to predict from'}), "
                                 f"got lens {lens.tolist()}")
        lens = lens.to(device=self.device, dtype=torch.int32)                # [B]
        positions = torch.arange(t, device=self.device).expand(b, t)         # [B, T]
        pads = positions >= lens[:, None]                                    # [B, T]
        vocab, ids = self.config.vocab_size, tokens[~pads]                   # ids [sum(lens)]
        if ids.numel():
            low, high = (int(x) for x in torch.aminmax(ids))  # one pass, read at prefill only
            if not 0 <= low <= high < vocab:
                raise ValueError(f"prefill: token ids must be in [0, {vocab}) (the vocabulary), "
                                 f"got ids from {low} to {high} within the prompts' lengths")
        # the pads as a valid id: they are don't-care (a -1 pad too), and the embedding reads them
        tokens = tokens.masked_fill(pads, 0)                                 # [B, T]
        h = self._run(tokens, positions, lambda i, q, k, v: cache.prefill(i, q, k, v, lens))
        cache.finish_prefill(lens)
        if all_logits:
            return self._logits(h)                                           # [B, T, V]
        last = h[torch.arange(b, device=self.device), lens.long() - 1]       # [B, E]
        return self._logits(last)                                            # [B, V]

    def decode(self, tokens, cache):
        """One new token per sequence, at its own position ``cache.seq_lens[b]``.

        tokens [B] int64 or int32 -> logits [B, V] float32. Their shape, dtype and device are
        checked, not their ids: that would read them on the host, which a decode step never does
        (on CUDA it would wait on the device). An id outside the vocabulary fails in the
        embedding (an IndexError on the CPU, a device-side assert on CUDA).
        """
        _check_tensor("decode", "tokens", tokens, [_cache_batch("decode", cache)], self.device,
                      "one per sequence of the cache")
        positions = cache.seq_lens.long()[:, None]                           # [B, 1]

        def attend(i, q, k, v):  # q [B, Hq, 1, D], k and v [B, Hkv, 1, D] -> [B, Hq, 1, D]
            return cache.decode(i, q[:, :, 0], k[:, :, 0], v[:, :, 0])[:, :, None]
        h = self._run(tokens[:, None], positions, attend)                    # [B, 1, E]
        cache.finish_decode()
        return self._logits(h[:, 0])                                         # [B, V]


# head rows upcast at a time by float32_logits on the CPU: 1024 x E float32 stays in L2
_CPU_HEAD_SLICE = 1024


def float32_logits(h, head):
    """h [..., E], head [V, E] of one dtype -> logits h · headᵀ [..., V] in float32, summed and
    written in float32 from 16-bit operands too: rounded to bfloat16, a logit near 30 would be a
    multiple of 0.125, noise in the log-probabilities and ties in the argmax that the evaluation
    would count as KCache's."""
    if h.dtype not in (torch.float16, torch.bfloat16):
        return F.linear(h, head).float()
    rows = h.reshape(-1, h.shape[-1])                                        # [M, E]
    if torch.is_grad_enabled() and (h.requires_grad or head.requires_grad):
        # [M, V] whole in float32: mm's out= and out_dtype= have no gradient
        out = F.linear(rows.float(), head.float())
    elif h.is_cuda:  # cuBLAS takes 16-bit operands to a float32 result
        out = torch.mm(rows, head.t(), out_dtype=torch.float32)              # [M, V]
    else:  # the CPU has no such mm: the head in float32, a slice at a time (whole, it would
        # be a [V, E] float32 copy per call, 9x slower than the 16-bit product at SmolLM2's)
        out = rows.new_empty(rows.shape[0], head.shape[0], dtype=torch.float32)  # [M, V]
        rows = rows.float()
        for i in range(0, head.shape[0], _CPU_HEAD_SLICE):
            part = head[i:i + _CPU_HEAD_SLICE].float()                       # [<=slice, E]
            torch.mm(rows, part.t(), out=out[:, i:i + _CPU_HEAD_SLICE])
    return out.view(*h.shape[:-1], head.shape[0])


def _cache_batch(method, cache):
    """The batch B of ``cache``, the length of its seq_lens [B] (ValueError naming ``method``
    when it has none: no cache)."""
    seq_lens = getattr(cache, "seq_lens", None)
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dim() != 1:
        raise ValueError(f"{method}: cache must be a cache of the protocol of "
                         f"kcache_ops.caches.protocol (make_cache builds one), got "
                         f"{type(cache).__name__}")
    return seq_lens.shape[0]


def _check_tensor(method, name, x, shape, device, meaning, dtypes=(torch.int32, torch.int64)):
    """Refuses (ValueError naming ``method`` and ``name``) an ``x`` that is not a tensor of
    ``shape`` (sizes; a name where any size goes), of one of ``dtypes`` (None: any integer
    dtype), on ``device`` (None: any); ``meaning`` says what it holds. Its shape, dtype and device
    only, never its values: reading one on the host would make a decode step wait on the device."""
    ok = isinstance(x, torch.Tensor)
    if ok:
        ok = ((is_integer_dtype(x.dtype) if dtypes is None else x.dtype in dtypes)
              and x.dim() == len(shape)
              and all(isinstance(n, str) or n == size for n, size in zip(shape, x.shape))
              and (device is None or x.device == device))
    if not ok:
        dims = ", ".join(str(n) for n in shape)
        kinds = ("integer" if dtypes is None
                 else " or ".join(str(d).removeprefix("torch.") for d in dtypes))
        where = "" if device is None else f" on {device}"
        raise ValueError(f"{method}: {name} must be a [{dims}] {kinds} tensor{where} ({meaning}), "
                         f"got {_describe(x)}")


def _describe(x):
    """What an argument is, for an error: a tensor's shape, dtype and device, else its repr."""
    if isinstance(x, torch.Tensor):
        return f"shape {list(x.shape)}, {x.dtype} on {x.device}"
    return repr(x)


def pad_prompts(prompts):
    """The input of :meth:`Llama.prefill` from B token-id lists: tokens [B, T] long right-padded
    with 0 (T the longest prompt), lens [B] int32, both on the CPU (whatever torch's default
    device)."""
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device="cpu")  # [B, T]
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.as_tensor(p, device="cpu")  # a list, an array or a tensor of ids
    return tokens, torch.tensor([len(p) for p in prompts], dtype=torch.int32, device="cpu")  # [B]
