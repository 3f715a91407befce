"""The machinery every accuracy measure shares: prefill a batch of prompts once (dense, full
attention), fork that K/V into one cache per configuration, and step through teacher-forced or
greedy decode steps.

The prefill is the same for every backend (KCache attends with the full K and V in prefill), so
forking its K/V is exact and saves re-running a long prefill for each configuration.
"""
from dataclasses import dataclass, field

import torch

from ..caches import KCacheOptions, make_cache
from ..model import pad_prompts


@dataclass(frozen=True)
class Config:
    """One attention configuration: ``backend`` "dense" (``options`` None), or "kcache" with its
    ``options``."""
    backend: str
    options: KCacheOptions | None

    def __post_init__(self):
        if (self.backend == "dense") != (self.options is None):
            raise ValueError(f"Config: backend {self.backend!r} with options {self.options}: "
                             "dense takes none, kcache needs them")

    @classmethod
    def dense(cls):
        """The dense baseline."""
        return cls("dense", None)

    @classmethod
    def kcache(cls, **options):
        """KCache with ``options`` by name (KCacheOptions' fields), the rest as the paper has them
        (:meth:`KCacheOptions.paper_literal`, whatever the defaults): a configuration is named by
        what it changes from the paper's KCache, as its label is."""
        return cls("kcache", KCacheOptions.paper_literal(**options))

    @classmethod
    def from_dict(cls, d):
        """The inverse of :meth:`to_dict` (after a JSON round trip)."""
        if d["backend"] == "dense":
            return cls.dense()
        return cls(d["backend"], KCacheOptions.from_dict(
            {k: v for k, v in d.items() if k != "backend"}))

    def to_dict(self):
        """{"backend", and the KCache options} for JSON."""
        return {"backend": self.backend, **(self.options.to_dict() if self.options else {})}

    @property
    def name(self):
        """A short label, e.g. ``kcache N=64 gs rn=0 dl=0,1`` or ``dense``."""
        return "dense" if self.options is None else f"kcache {self.options.label}"


@dataclass
class Snapshot:
    """A batch of prompts after one dense prefill.

    tokens : Tensor [B, T] long, right-padded; lens : Tensor [B] int32
    k, v : list (one per layer) of Tensor [B, Hkv, T, D] — the cached keys and values
    logits : Tensor [B, V] float32 at each prompt's last token
    """
    tokens: torch.Tensor
    lens: torch.Tensor
    k: list = field(repr=False)
    v: list = field(repr=False)
    logits: torch.Tensor = field(repr=False)


@torch.inference_mode()
def prefill_snapshot(model, prompts):
    """Prefill ``prompts`` (list of token-id lists) once with the dense backend -> Snapshot."""
    tokens, lens = pad_prompts(prompts)  # [B, T], [B]
    tokens, lens = tokens.to(model.device), lens.to(model.device)
    cache = make_cache("dense", model.config, tokens.shape[0], tokens.shape[1], model.device,
                       model.dtype)
    logits = model.prefill(tokens, lens, cache)  # [B, V]
    return Snapshot(tokens, lens, cache.k, cache.v, logits)


@torch.inference_mode()
def fork(model, snapshot, config, steps, record_mass=False):
    """A fresh cache of ``config`` holding the snapshot's prompts, with room for ``steps`` more
    tokens per sequence; ``record_mass`` switches on KCache's attention-mass record."""
    batch, length = snapshot.tokens.shape
    cache = make_cache(config.backend, model.config, batch, length + steps, model.device,
                       model.dtype, config.options)
    for layer, (k, v) in enumerate(zip(snapshot.k, snapshot.v)):
        cache.store_prompt(layer, k, v, snapshot.lens)  # k, v [B, Hkv, T, D]
    cache.finish_prefill(snapshot.lens)
    if record_mass and config.backend == "kcache":
        cache.record_mass = True
    return cache


@torch.inference_mode()
def step_through(model, cache, first, forced, progress=None):
    """Decode ``S = forced.shape[1]`` steps, feeding each sequence its forced token, or its own
    argmax where ``forced`` is -1 (greedy).

    Parameters
    ----------
    first : Tensor [B] long — the token fed at step 0 (the one after the prompt)
    forced : Tensor [B, S] long — the token fed after step t is ``forced[:, t]`` (or the argmax)
    progress : tqdm, optional — advanced by one per step

    Returns
    -------
    argmax : Tensor [B, S] long — the model's top-1 token after each fed token
    logprob : Tensor [B, S] float32 — log-probability of the token fed next (forced or argmax)
    """
    forced = forced.to(model.device)  # [B, S]
    token = first.to(model.device)  # [B]
    argmax, logprob = [], []
    for t in range(forced.shape[1]):
        logits = model.decode(token, cache)  # [B, V] float32
        top = logits.argmax(-1)  # [B]
        token = torch.where(forced[:, t] >= 0, forced[:, t], top)  # [B]
        logp = torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]  # [B]
        argmax.append(top)
        logprob.append(logp)
        if progress is not None:
            progress.update(1)
    return torch.stack(argmax, 1).cpu(), torch.stack(logprob, 1).cpu()  # [B, S] each
