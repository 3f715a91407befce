"""The machinery every accuracy measure shares: prefill a batch of prompts once (dense, full
attention), fork that K/V into one cache per configuration, and step through teacher-forced or
greedy decode steps.

The prefill is the same for every backend (KCache attends with the full K and V in prefill), so
forking its K/V is exact and saves re-running a long prefill for each of the ~40 configurations.
"""
from dataclasses import dataclass, field
from itertools import product

import torch


@dataclass(frozen=True)
class Config:
    """One attention configuration: ``backend`` "dense", or "kcache" with its options."""
    backend: str = "kcache"
    topn: int = 64
    group_select: bool = False
    renormalize: bool = True
    dense_layers: tuple = ()

    @classmethod
    def from_dict(cls, d):
        """The inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        return cls(**{**d, "dense_layers": tuple(d["dense_layers"])})

    @property
    def name(self):
        """A short label, e.g. ``kcache N=64 gs rn=0 dl=0,1`` or ``dense``."""
        if self.backend == "dense":
            return "dense"
        parts = [f"kcache N={self.topn}"]
        parts += ["gs"] if self.group_select else []
        parts += ["rn=0"] if not self.renormalize else []
        parts += [f"dl={','.join(map(str, self.dense_layers))}"] if self.dense_layers else []
        return " ".join(parts)

    @property
    def options(self):
        """Keyword options of ``Llama.new_cache`` for this configuration."""
        if self.backend == "dense":
            return {}
        return dict(topn=self.topn, group_select=self.group_select,
                    renormalize=self.renormalize, dense_layers=self.dense_layers)


def grid(topns, group_select=(False, True), renormalize=(True, False), dense_layers=((),)):
    """Every KCache configuration of the given values, the paper-literal defaults first.

    Ordered so that a run cut short has the most telling results: the configurations that
    change fewest options from (N=64, no group select, renormalize, no dense layers) come first,
    and among them N=64 first.
    """
    configs = [Config(topn=n, group_select=g, renormalize=r, dense_layers=tuple(d))
               for n, g, r, d in product(topns, group_select, renormalize, dense_layers)]

    def distance(c):
        return (c.group_select + (not c.renormalize) + bool(c.dense_layers), c.topn != 64,
                c.topn)
    return sorted(configs, key=distance)


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


def pad_batch(prompts):
    """list of B token-id lists -> tokens [B, T] long right-padded with 0, lens [B] int32."""
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)  # [B, T]
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    return tokens, torch.tensor([len(p) for p in prompts], dtype=torch.int32)  # [B]


@torch.inference_mode()
def prefill_snapshot(model, prompts):
    """Prefill ``prompts`` (list of token-id lists) once with the dense backend -> Snapshot."""
    tokens, lens = pad_batch(prompts)  # [B, T], [B]
    tokens, lens = tokens.to(model.device), lens.to(model.device)
    cache = model.new_cache("dense", tokens.shape[0], tokens.shape[1])
    logits = model.prefill(tokens, lens, cache)  # [B, V]
    return Snapshot(tokens, lens, cache.k, cache.v, logits)


@torch.inference_mode()
def fork(model, snapshot, config, steps, record_mass=False):
    """A fresh cache of ``config`` holding the snapshot's prompts, with room for ``steps`` more
    tokens per sequence; ``record_mass`` switches on KCache's attention-mass record."""
    batch, length = snapshot.tokens.shape
    cache = model.new_cache(config.backend, batch, length + steps, **config.options)
    for layer, (k, v) in enumerate(zip(snapshot.k, snapshot.v)):
        cache.store_prompt(layer, k, v)  # k, v [B, Hkv, T, D]
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
