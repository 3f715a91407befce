"""Which KCache configurations the evaluation runs: the curated default grid of issue 12 (the
paper-literal setting, the tail terms at a small V budget, a few controls), ordered most telling
first so that a run cut short keeps the results that matter; or, from the command line, the product
of given N values, tails and variants."""
from itertools import product

from ..caches import KCacheOptions
from .runner import Config

# KCache as the paper states it: top 64 per head, a softmax over them, nothing for the rest
PAPER_LITERAL = KCacheOptions.paper_literal()

# the hot rows the grid tries: the first 4 positions (the attention sinks) and the last 60
HOT = dict(sinks=4, window=60)


def default_grid():
    """The default configurations (12 + dense), most telling first: the paper-literal N=64; the
    2-bit tail with and without hot rows at N=64 and N=8; the 4-bit tail at N=8; the mean tail;
    hot rows without a tail; group selection and the adaptive budget (top_p) on the 2-bit tail
    with hot rows; a wider window at N=8; the old way to accuracy (N=256, no tail)."""
    p = Config.kcache  # each named by what it changes from the paper's KCache
    return [Config("kcache", PAPER_LITERAL),
            p(tail="int2", **HOT), p(tail="int2"),
            p(topn=8, tail="int2", **HOT), p(topn=8, tail="int2"), p(topn=8, tail="int4"),
            p(tail="mean"), p(**HOT),
            p(tail="int2", group_select=True, **HOT), p(tail="int2", top_p=0.9, **HOT),
            p(topn=8, tail="int2", sinks=4, window=124),
            p(topn=256)]


def quick_grid():
    """The --quick smoke run's configurations: N=16 without a tail and with the 2-bit tail."""
    return [Config.kcache(topn=16, tail="none"), Config.kcache(topn=16, tail="int2")]


def product_grid(topns, tails=("none",), group_select=(False,), dense_layers=((),)):
    """Every KCache configuration of the given values (:meth:`Config.kcache`: the other options
    as the paper has them), those that change fewest options from the defaults first and the
    default N first among them (:meth:`KCacheOptions.distance`)."""
    configs = dict.fromkeys(Config.kcache(topn=n, tail=t, group_select=g, dense_layers=d)
                            for n, t, g, d in product(topns, tails, group_select, dense_layers))
    return sorted(configs, key=lambda c: c.options.distance())  # ties: in the product's order


def display_name(config):
    """The configuration's name in reports: :attr:`Config.name`, with "(paper-literal)" after
    :data:`PAPER_LITERAL`."""
    return config.name + (" (paper-literal)" if config.options == PAPER_LITERAL else "")
