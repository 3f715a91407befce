"""Batched generation with per-sequence prompt lengths: greedy or sampled, stop on EOS, streaming.
It builds the cache (above the model and the caches: the model takes the cache it is given)."""
import math
import time
import warnings
from dataclasses import dataclass

import torch

from .caches import make_cache
from .devices import sync
from .integers import as_bool, as_int, as_real, int_at_least
from .model import pad_prompts
from .ops import as_float32


@dataclass
class Generation:
    """What :func:`generate` produced.

    tokens : list of list of int — the new tokens of each sequence (EOS not included)
    texts : list of str, or None without a tokenizer
    prefill_s : float — seconds of the prefill (and first sampled token)
    decode_s : float — seconds of the decode steps
    decode_tokens : int — tokens the decode steps produced (EOS included), summed over sequences
    cache : the cache object used (its ``device_bytes()`` and ``host_bytes()``; with KCache's
        ``reuse`` and ``generate(..., reuse_stats=True)``, its ``reuse_hit_rate()`` and
        ``host_bytes_saved_per_step()`` over the decode steps, which it records
        (``record_mass``) inside ``decode_s``: a few small ops a layer and step more than a run
        without them; ``python -m kcache_ops bench`` times none)
    """
    tokens: list
    texts: list | None
    prefill_s: float
    decode_s: float
    decode_tokens: int
    cache: object

    @property
    def tokens_per_s(self):
        """Decode throughput over the whole batch; NaN where no decode step ran (one new token:
        the prefill's)."""
        if self.decode_tokens == 0 or self.decode_s <= 0:
            return float("nan")
        return self.decode_tokens / self.decode_s


class TextStream:
    """Incremental detokenization of one sequence: each pushed token returns the text it
    completes ("" while a multi-byte character is still partial); :meth:`flush` returns what is
    held back at the end, so the pieces add up to the decoded tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.prefix = 0  # ids[prefix:read] is the text already emitted, kept for context
        self.read = 0

    def _texts(self):
        """(the text emitted last, kept for context; it and what followed it)."""
        return (self.tokenizer.decode(self.ids[self.prefix:self.read]),
                self.tokenizer.decode(self.ids[self.prefix:]))

    def push(self, token: int) -> str:
        self.ids.append(token)
        before, text = self._texts()
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """The text held back after the last token pushed: a character left partial (shown as
        U+FFFD, as the decoded text has it) or a real U+FFFD at the end; "" if none."""
        before, text = self._texts()
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


def _sampling_args(temperature, top_p, top_k):
    """(temperature, top_p, top_k) as :func:`sample` draws with them: a float >= 0 that is finite
    in float32, a float in (0, 1], and None or an int >= 1, each given as a number of any type
    (kcache_ops.integers); else ValueError naming the argument."""
    t = as_real(temperature)
    # NaN fails; an infinite temperature (1e39 is one in float32) would send the tokens top_k
    # leaves out to -inf / inf = NaN
    if t is None or not 0 <= t or as_float32(t) == math.inf:
        raise ValueError(f"temperature must be a number >= 0, finite as a float32, got "
                         f"{temperature!r}")
    p = as_real(top_p)
    if p is None or not 0 < p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    k = None if top_k is None else int_at_least(top_k, 1)
    if top_k is not None and k is None:
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    return t, p, k


def sample(logits, temperature=0.0, top_p=1.0, generator=None, top_k=None):
    """Next token of each sequence.

    logits [B, V] float32 -> [B] long: the argmax if ``temperature`` is 0, else a draw from
    ``softmax(logits / temperature)`` over the ``top_k`` most likely tokens (None: all), then
    restricted to the smallest set of tokens whose probability reaches ``top_p`` (nucleus
    sampling), with ``generator`` for reproducibility. A temperature that is 0 in float32 is
    greedy. ValueError for logits that are not a [B, V] floating-point tensor with V >= 1, a
    temperature < 0 or infinite in float32, a top_p outside (0, 1] or a top_k < 1, and, where
    it draws, for a NaN among the logits (one host sync: on CUDA torch.multinomial would meet it
    as a device-side assert, which ends the process's use of the GPU).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] == 0 \
            or not logits.is_floating_point():
        got = (f"shape {list(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor)
               else type(logits).__name__)
        raise ValueError(f"logits must be a [B, V] floating-point tensor with V >= 1, got {got}")
    args = _sampling_args(temperature, top_p, top_k)
    if as_float32(args[0]) != 0:
        nan_rows = logits.isnan().any(-1).nonzero()[:, 0].tolist()  # the host sync
        if nan_rows:
            raise ValueError(f"logits of row(s) {nan_rows} hold NaN: no distribution to draw "
                             f"from")
    return _draw(logits, *args, generator)


def _draw(logits, temperature, top_p, top_k, generator):
    """:func:`sample` on arguments :func:`_sampling_args` has checked (generate checks them once,
    not at every step)."""
    if as_float32(temperature) == 0:
        return logits.argmax(-1)
    # a row with a +inf logit (float16's overflow) draws among its +inf only (inf - inf would be
    # NaN), a row of -inf is uniform; -inf elsewhere stays banned (no NaN comes here: sample
    # refuses it, generate draws such a row from zeros)
    inf = float("inf")
    top = logits == inf                                                     # [B, V]
    logits = logits.masked_fill(top.any(-1, keepdim=True) & (logits < inf), -inf)
    logits = logits.masked_fill(top | (logits == -inf).all(-1, keepdim=True), 0.0)  # [B, V]
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                    # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th stay
    # the largest logit at 0 first: a tiny temperature sends the others to -inf, never to +inf
    # (inf - inf would be NaN), and so tends to the argmax
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature,
                          dim=-1)                                           # [B, V]
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)              # [B, V] each
        # drop a token when the tokens ranked above it already reach top_p; the first stays, even
        # for a top_p that is 0 in float32
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p                     # [B, V]
        drop[:, 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        pick = torch.multinomial(sorted_p, 1, generator=generator)          # [B, 1] rank
        return order.gather(-1, pick)[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, backend="dense", options=None,
             temperature=0.0, top_p=1.0, seed=None, eos_ids=None, tokenizer=None, on_text=None,
             top_k=None, on_token=None, reuse_stats=False):
    """Generate up to ``max_new_tokens`` for each prompt, all prompts in one batch.

    Parameters
    ----------
    model : Llama
    prompts : list of list of int, or a [B, T] integer tensor
        Token ids of each prompt (lengths may differ; they are right-padded into [B, T]); any
        iterable of id lists.
    max_new_tokens : int
    backend, options
        The attention backend, and a KCacheOptions for ``"kcache"`` (None: the defaults); see
        :func:`kcache_ops.caches.make_cache`.
    temperature, top_p, top_k, seed
        Sampling (temperature 0: greedy; top_k None: every token), checked as :func:`sample`
        checks them; ``seed`` (None, or an integer in [-2^63, 2^64)) seeds a generator on the
        model's device.
    eos_ids : iterable of int, or one int, optional
        A sequence stops after sampling one of these. None (default): the tokenizer's
        ``eos_ids`` where one is given, else none (``()``: never stop early).
    tokenizer : Tokenizer, optional
        Needed for ``texts`` and ``on_text``; its ``eos_ids`` are the default ``eos_ids``.
    on_text : callable(index, text), optional
        Streaming: called with each sequence's new text as it is generated.
    on_token : callable(index, token), optional
        Called with each new token of sequence ``index`` as it is sampled (EOS not included),
        before its text: one call per token, as a progress bar counts them (a text piece may hold
        several tokens, or none while a character is incomplete).
    reuse_stats : bool
        With ``backend="kcache"`` and ``options.reuse > 0`` only: record what the reuse pool
        found (``cache.record_mass``: ``cache.reuse_hit_rate()``,
        ``cache.host_bytes_saved_per_step()``, and the attention mass), whose small ops run
        inside the timed ``decode_s``. Default False: the decode steps record nothing.

    Returns
    -------
    Generation
    """
    count = int_at_least(max_new_tokens, 1)
    if count is None:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_new_tokens = count
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:  # [B, T]: B prompts of T ids
        prompts = prompts.tolist()
    elif not isinstance(prompts, (str, bytes, torch.Tensor)) and hasattr(prompts, "__iter__"):
        prompts = list(prompts)  # a generator is read once
    if not isinstance(prompts, list) or not all(
            hasattr(p, "__len__") and not isinstance(p, (str, bytes)) for p in prompts):
        got = (f"list of {[type(p).__name__ for p in prompts][:3]}" if isinstance(prompts, list)
               else f"a {prompts.dim()}-D tensor" if isinstance(prompts, torch.Tensor)
               else type(prompts).__name__)  # not iterated: an int, None, a 0-d tensor
        raise ValueError(f"prompts must be a list of token id lists (one per prompt), got {got}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"need at least one prompt and no empty one, got token counts "
                         f"{[len(p) for p in prompts]}")
    vocab = model.config.vocab_size
    bad = [t for p in prompts for t in p if as_int(t) is None or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab}) (the model's "
                         f"vocabulary), got {bad[:5]}")
    if eos_ids is None:
        eos_ids = tokenizer.eos_ids if tokenizer is not None else ()
    if as_int(eos_ids) is not None:  # one id
        eos_ids = [eos_ids]
    elif not hasattr(eos_ids, "__iter__"):
        raise ValueError(f"eos_ids must be token ids (an iterable, or one id), got {eos_ids!r}")
    eos_ids = list(eos_ids)  # read once: a generator's ids stay for the error below
    eos = {as_int(t) for t in eos_ids}
    if None in eos or not all(0 <= t < vocab for t in eos):
        raise ValueError(f"eos_ids must be token ids in [0, {vocab}), got {eos_ids[:5]}")
    temperature, top_p, top_k = _sampling_args(temperature, top_p, top_k)
    number = None if seed is None else as_int(seed)
    if seed is not None and (number is None or not -(1 << 63) <= number < 1 << 64):
        raise ValueError(f"seed must be None or an integer in [-2^63, 2^64) (what "
                         f"torch.Generator.manual_seed takes), got {seed!r}")
    seed = number
    flag = as_bool(reuse_stats)
    if flag is None:
        raise ValueError(f"reuse_stats must be a bool, got {reuse_stats!r}")
    reuse_stats = flag
    if reuse_stats and (backend != "kcache" or not getattr(options, "reuse", 0)):
        raise ValueError(f"reuse_stats needs backend='kcache' with options.reuse > 0, got "
                         f"backend={backend!r}, options.reuse="
                         f"{getattr(options, 'reuse', None)!r}")
    for name, callback in (("on_text", on_text), ("on_token", on_token)):
        if callback is not None and not callable(callback):
            raise ValueError(f"{name} must be None or a callable (index, value), got "
                             f"{callback!r}")
    if on_text is not None and tokenizer is None:
        raise ValueError("streaming (on_text) needs the tokenizer")
    device = model.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    tokens, lens = pad_prompts(prompts)                                     # [B, T], [B]
    batch, longest = tokens.shape
    trained = model.config.max_position_embeddings
    if longest + max_new_tokens - 1 > trained:  # the last new token is sampled, never run
        warnings.warn(f"generate: prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                      f"runs past the {trained} positions the model was trained on; the text "
                      f"beyond them may degrade", stacklevel=3)  # past no_grad's wrapper
    try:
        cache = make_cache(backend, model.config, batch, longest + max_new_tokens, device,
                           model.dtype, options)
    except MemoryError as e:  # its capacity, in the terms the caller gave
        raise MemoryError(f"generate: {e} (the capacity is the longest prompt, {longest} tokens, "
                          f"+ max_new_tokens, {max_new_tokens})") from e
    if reuse_stats:  # what reuse found, for the caller (checked above: a KCache with reuse)
        cache.record_mass = True
    streams = [TextStream(tokenizer) for _ in prompts] if on_text else None

    start = time.perf_counter()
    logits = model.prefill(tokens.to(device), lens.to(device), cache)      # [B, V]
    out, done = [[] for _ in prompts], [False] * batch
    decode_start, decode_tokens = None, 0
    for step in range(max_new_tokens):
        # a row with a NaN logit (the model overflowed in its dtype) is drawn from zeros (any
        # token, never a NaN distribution) and found at the step's one host sync
        nan = logits.isnan().any(-1)                                        # [B]
        nxt = _draw(logits.masked_fill(nan[:, None], 0.0), temperature, top_p, top_k,
                    generator)                                              # [B]
        picked = torch.stack([nxt, nan.to(nxt.dtype)], 1).tolist()  # the one host sync of a step
        for b, (t, bad) in enumerate(picked):
            if done[b]:
                continue
            if bad:
                raise ValueError(f"generate: sequence {b}'s logits at new token {step} are NaN "
                                 f"(a value overflowed in {model.dtype}; float32 or bfloat16 "
                                 f"have a wider range)")
            decode_tokens += step > 0
            done[b] = t in eos
            if not done[b]:
                out[b].append(t)
                if on_token is not None:
                    on_token(b, t)
                piece = streams[b].push(t) if streams else ""
                if piece:
                    on_text(b, piece)
        if step == 0:
            decode_start = time.perf_counter()
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model.decode(nxt, cache)                                   # [B, V]
    for b, stream in enumerate(streams or ()):  # what a partial character held back
        piece = stream.flush()
        if piece:
            on_text(b, piece)
    sync(device)
    end = time.perf_counter()
    texts = [tokenizer.decode(o) for o in out] if tokenizer is not None else None
    return Generation(out, texts, decode_start - start, end - decode_start, decode_tokens, cache)
