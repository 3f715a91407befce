"""Which KCache configurations the evaluation runs: the curated default grid of issue 12 (the
paper-literal setting, the tail terms at a small V budget, a few controls), ordered most telling
first so that a run cut short keeps the results that matter; or, from the command line, the product
of given N values, tails and variants."""
from itertools import product

from ..caches import KCacheOptions
from .runner import Config

# KCache as the paper states it: top 64 per head, a softmax over them, nothing for the rest
PAPER_LITERAL = KCacheOptions.paper_literal()


def default_grid():
    """The default configurations (15 + dense), most telling first: the paper-literal N=64, the
    three tails at N=64, the 2-bit tail at smaller budgets, the 4-bit tail at N=8, group selection
    with the 2-bit tail, the mean tail with layer 0 dense, the old way to accuracy (a larger N
    without a tail, N=128 with the mean tail), and the adaptive budget (top_p) on the 2-bit
    tail."""
    kc = Config.kcache
    return [Config("kcache", PAPER_LITERAL),
            kc(topn=64, tail="int2"), kc(topn=64, tail="mean"), kc(topn=64, tail="int4"),
            kc(topn=8, tail="int2"), kc(topn=16, tail="int2"), kc(topn=32, tail="int2"),
            kc(topn=8, tail="int4"),
            kc(topn=64, tail="int2", group_select=True), kc(topn=8, tail="int2", group_select=True),
            kc(topn=64, tail="mean", dense_layers=(0,)),
            kc(topn=256, tail="none"), kc(topn=128, tail="mean"),
            kc(topn=64, tail="int2", top_p=0.9), kc(topn=64, tail="int2", top_p=0.5)]


def quick_grid():
    """The --quick smoke run's configurations: N=16 without a tail and with the 2-bit tail."""
    return [Config.kcache(topn=16, tail="none"), Config.kcache(topn=16, tail="int2")]


def product_grid(topns, tails=("none",), group_select=(False,), dense_layers=((),)):
    """Every KCache configuration of the given values (renormalized), those that change fewest
    options from the defaults first and the default N first among them
    (:meth:`KCacheOptions.distance`)."""
    options = [KCacheOptions(topn=n, tail=t, group_select=g, dense_layers=d)
               for n, t, g, d in product(topns, tails, group_select, dense_layers)]
    return [Config("kcache", o) for o in sorted(set(options), key=KCacheOptions.distance)]


def display_name(config):
    """The configuration's name in reports: :attr:`Config.name`, with "(paper-literal)" after
    :data:`PAPER_LITERAL`."""
    return config.name + (" (paper-literal)" if config.options == PAPER_LITERAL else "")
