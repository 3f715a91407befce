"""The options of KCache, defined once: their defaults, their validation, their labels in reports,
their JSON form and (through :mod:`kcache_ops.cli.args`) their command-line flags.

A new option is one more field of :class:`KCacheOptions`: its default, a ``help`` line (the flag's
help) and a ``short`` name (its part of a label) in the field's metadata, and its check in
``__post_init__`` (or in :meth:`KCacheOptions.check` where it depends on the model or device). The
flag, the label, the JSON round trip and the eval grid's ordering follow from the field.
"""
from dataclasses import dataclass, field, fields

import torch

from ..integers import as_bool, as_int, as_real, int_at_least
from ..ops import MAX_GROUP_SELECT, MAX_REUSE, MAX_TOPN, as_float32  # the CUDA ops' limits

# the tail terms: none, the mean V of the rows not read, or a 2- / 4-bit copy of V on the device
TAILS = ("none", "mean", "int2", "int4")


@dataclass(frozen=True)
class KCacheOptions:
    """How KCache selects and weights the V rows of a decode step (DESIGN.md §3).

    The defaults are the setting the accuracy evaluation recommends (issue 12; measured in
    bench/results/REPORT.md): the top 64 cold rows per head with the 2-bit tail, the adaptive
    budget at 0.9 and 4 sinks + 60 recent positions on the device. :meth:`paper_literal` is
    KCache as the paper states it (top 64, a softmax over them, nothing else).

    topn : int >= 1 (on CUDA, a step's N = min(topn, capacity) <= MAX_TOPN)
        ``N``, the V rows each decode step reads per head (per KV head with ``group_select``).
    group_select : bool
        One index set per KV head, chosen by the attention mass of its whole GQA group.
    renormalize : bool
        True: the weights of a step sum to 1 — with ``tail="none"`` a softmax over the top N; with
        a tail the top N get their exact full-softmax weights and the tail carries the rest.
        False (``tail="none"`` only): the full-softmax weights of the top N, the rest dropped.
    dense_layers : tuple of int, sorted, no repeats
        Layers that keep K and V on the device and attend exactly (any iterable is accepted and
        normalized; the range is checked against the model by :meth:`check`).
    tail : str, one of :data:`TAILS`
        The attention mass of the rows not read from host RAM, accounted for on the device:
        ``"none"`` (the paper), ``"mean"`` (their mean V, from a running sum of V per KV head) or
        ``"int2"`` / ``"int4"`` (each with its exact weight, over a 2- or 4-bit copy of V kept on
        the device beside K).
    top_p : float in (0, 1]
        An adaptive budget: per head only the shortest prefix of the N selected rows (in their
        order) whose full-softmax mass reaches ``top_p`` is read from host RAM; the rest become
        padding (and go to the tail, if any). 1 reads all N. The prefix counts the selected
        rows' mass only, not the hot rows'.
    sinks, window : int >= 0
        Hot rows: V of the first ``sinks`` and the last ``window`` positions of each sequence stays
        on the device as well, attended exactly every step; the top N are chosen among the other
        positions (N host rows per head stay N). A cache keeps at most its capacity of them per
        sequence (every position hot: :meth:`hot_split`). Not with ``tail="mean"``.
    reuse : int >= 0
        Cross-step reuse: each KCache layer keeps the V rows it read last in a pool of ``reuse``
        rows per sequence and KV head in device memory, and a step reads from host RAM only the
        rows the pool does not hold (reuse.py); the output is the same, the host reads fewer. 0:
        off; else at least the rows of one step (N = min(``topn``, capacity), times the GQA
        group without ``group_select``: checked when the cache is built); on CUDA at most
        :data:`MAX_REUSE` slots. A cache keeps at most max(capacity, those rows) slots
        (:func:`~.reuse.pool_slots`). Not with ``tail="mean"``.
    """
    topn: int = field(default=64, metadata={
        "short": "N", "help": "V rows read per head and decode step"})
    group_select: bool = field(default=False, metadata={
        "short": "gs", "help": "one index set per KV head (GQA group)"})
    renormalize: bool = field(default=True, metadata={
        "short": "rn", "help": "full-softmax weights, the mass outside the top N dropped (with "
                              "--tail none)"})
    dense_layers: tuple = field(default=(), metadata={
        "short": "dl", "help": "comma-separated layers that keep V on the device, e.g. 0,1"})
    tail: str = field(default="int2", metadata={
        "short": "tail", "choices": TAILS,
        "help": "the mass of the rows not read: none, mean, int2 or int4"})
    top_p: float = field(default=0.9, metadata={
        "short": "p", "flag": "--attn-top-p",  # --top-p is the sampling option of generate
        "help": "read per head only the top rows whose attention mass reaches this"})
    sinks: int = field(default=4, metadata={
        "short": "sinks", "help": "V of the first this many positions also kept on the device"})
    window: int = field(default=60, metadata={
        "short": "win", "help": "V of the last this many positions also kept on the device"})
    reuse: int = field(default=0, metadata={
        "short": "reuse", "help": "keep the V rows read last in a pool of this many rows per "
                                  "KV head on the device; read only the others from host RAM"})

    def __post_init__(self):
        self._set_integer("topn", 1)
        for name in ("group_select", "renormalize"):  # any bool type, kept as a Python bool
            flag = as_bool(getattr(self, name))
            if flag is None:
                raise ValueError(f"KCache: {name} must be a bool, got {getattr(self, name)!r}")
            object.__setattr__(self, name, flag)
        if self.tail not in TAILS:
            raise ValueError(f"KCache: tail must be one of {', '.join(TAILS)}, got {self.tail!r}")
        if self.tail != "none" and not self.renormalize:
            raise ValueError(f"KCache: renormalize=False drops the mass outside the top N, which "
                             f"tail={self.tail!r} accounts for (the default tail is 'int2'); use "
                             f"it with tail='none'")
        top_p = as_real(self.top_p)
        if top_p is None or not 0 < as_float32(top_p) <= 1:
            raise ValueError(f"KCache: top_p must be a number in (0, 1] (as a float32), got "
                             f"{self.top_p!r}")
        object.__setattr__(self, "top_p", top_p)
        for name in ("sinks", "window", "reuse"):
            self._set_integer(name, 0)
        if self.tail == "mean" and self.hot_rows:
            raise ValueError(f"KCache: the mean tail takes the mean of every row not read from "
                             f"host RAM, hot rows included; use sinks/window with tail none, int2 "
                             f"or int4, or the mean tail with sinks=0 and window=0 (got "
                             f"sinks={self.sinks}, window={self.window})")
        if self.tail == "mean" and self.reuse:
            raise ValueError(f"KCache: the mean tail is formed in sparse_attn_v over host V "
                             f"(its sequence lengths index it), which a step with reuse does "
                             f"not read; use reuse with tail none, int2 or int4, or the mean "
                             f"tail with reuse=0 (got reuse={self.reuse})")
        try:
            layers = tuple(self.dense_layers)
        except TypeError:  # a bare int, say
            raise ValueError(f"KCache: dense_layers must be a sequence of layer indices, got "
                             f"{self.dense_layers!r}") from None
        indices = [as_int(i) for i in layers]
        if None in indices:
            raise ValueError(f"KCache: dense_layers must be integers, got {layers!r}")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(indices))))

    def _set_integer(self, name, least):
        """Option ``name`` as an int: an integer of any type (a NumPy one, a 0-d tensor) >=
        ``least``, else ValueError."""
        value = getattr(self, name)
        n = int_at_least(value, least)
        if n is None:
            raise ValueError(f"KCache: {name} must be an integer >= {least}, got {value!r}")
        object.__setattr__(self, name, n)

    def check(self, num_layers, device, step=None):
        """Raise ValueError where the options do not fit a model of ``num_layers`` layers on
        ``device``: a dense layer out of range, and given ``step``, (N, pool slots) of a cache of
        known capacity (:meth:`step_topn`, :func:`~.reuse.pool_slots`), either above the
        CUDA limits (:data:`MAX_TOPN`, :data:`MAX_REUSE`) on a CUDA device. Without ``step``
        those wait for the capacity: ``topn`` and ``reuse`` above them serve a shorter cache."""
        outside = [i for i in self.dense_layers if not 0 <= i < num_layers]
        if outside:
            raise ValueError(f"KCache: dense_layers {outside} out of range for a model of "
                             f"{num_layers} layers (0..{num_layers - 1})")
        if step is None or torch.device(device).type != "cuda":
            return
        n, slots = step
        if n > MAX_TOPN:
            raise ValueError(f"KCache: topn must be at most {MAX_TOPN} on CUDA, got {self.topn} "
                             f"(a step's N, min(topn, capacity), is {n})")
        if slots > MAX_REUSE:
            raise ValueError(f"KCache: reuse must be at most {MAX_REUSE} on CUDA, got "
                             f"{self.reuse} (the pool's slots, at this capacity: {slots})")

    @property
    def hot_rows(self):
        """Rows per sequence and KV head whose V stays on the device: ``sinks + window``."""
        return self.sinks + self.window

    def step_topn(self, capacity):
        """N of a decode step in a cache of ``capacity`` tokens: ``min(topn, capacity)`` (no
        sequence holds more keys, so a larger ``topn`` would read nothing more)."""
        return min(self.topn, capacity)

    def hot_split(self, capacity):
        """(sinks, window) a cache of ``capacity`` tokens keeps per sequence: the sinks first,
        and no more than the capacity together (then every position is hot)."""
        sinks = min(self.sinks, capacity)
        return sinks, min(self.window, capacity - sinks)

    @classmethod
    def paper_literal(cls, **changes):
        """KCache as the paper states it, whatever the defaults: the top 64 rows per head, a
        softmax over them, nothing for the rest (no tail, no dense layer, no adaptive budget, no
        hot rows); then ``changes``, options by name (as :meth:`from_dict` takes them)."""
        paper = dict(topn=64, group_select=False, renormalize=True, dense_layers=(), tail="none",
                     top_p=1.0, sinks=0, window=0, reuse=0)
        return cls.from_dict({**paper, **changes})

    @property
    def variant(self):
        """The options other than N that differ from the paper's (:meth:`paper_literal`), as a
        label: "paper" or e.g. "gs, tail=int2"."""
        return ", ".join(self._parts()[1:]) or "paper"

    @property
    def label(self):
        """A short label: N, and every option that differs from the paper's
        (:meth:`paper_literal`, whatever the defaults), e.g. "N=64 tail=int2 sinks=4 win=60"."""
        return " ".join(self._parts())

    def _parts(self):
        parts, paper = [], self.paper_literal()
        for f in fields(self):
            value, short = getattr(self, f.name), f.metadata["short"]
            if f.name == "topn":
                parts.append(f"{short}={value}")
            elif value == getattr(paper, f.name):
                continue
            elif isinstance(value, bool):
                parts.append(short if value else f"{short}=0")
            elif isinstance(value, tuple):
                parts.append(f"{short}={','.join(map(str, value))}")
            else:
                parts.append(f"{short}={value}")
        return parts

    def summary(self):
        """Every option as ``name=value``, e.g. "topn=64, group_select=False, ...": for people."""
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    def to_dict(self):
        """The options as a JSON-ready dict (``dense_layers`` a list)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self)}

    @classmethod
    def from_dict(cls, options):
        """The inverse of :meth:`to_dict` (also takes keyword options given by name); an unknown
        name raises TypeError listing the options."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"KCache: unknown option(s) {', '.join(unknown)}; the options are "
                            f"{', '.join(names)}")
        return cls(**options)

    def distance(self):
        """How far from the defaults: (options other than N changed, N changed, N), the order in
        which the eval grid runs its configurations (the most telling first)."""
        default = type(self)()
        changed = sum(getattr(self, f.name) != f.default for f in fields(self) if f.name != "topn")
        return changed, self.topn != default.topn, self.topn
