"""KCacheOptions: defaults, validation when built and when a cache is built, labels, the JSON round
trip, the CUDA limit on N matching the C++ constant; the protocol and host traffic of both caches;
the shared command-line flags."""
import argparse
from dataclasses import replace
import pathlib
import re

import numpy as np
import pytest
import torch

from kcache_ops.caches import (MAX_GROUP_SELECT, MAX_REUSE, MAX_TOPN, Cache, KCacheOptions,
                               check_kcache, make_cache)
from kcache_ops.cli.args import add_kcache_arguments, given_kcache_options, kcache_options
from kcache_ops.model import LlamaConfig

CONFIG = LlamaConfig(vocab_size=16, hidden_size=256, intermediate_size=48, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=64)
KERNEL = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "qk_topn_kernel.cuh"


def test_defaults_and_normalization():
    o = KCacheOptions(dense_layers=[2, 0, 2])
    assert (o.topn, o.group_select, o.renormalize, o.dense_layers) == (64, False, True, (0, 2))
    assert o == KCacheOptions(dense_layers=(0, 2)) and hash(o) == hash(KCacheOptions(
        dense_layers=(2, 0)))
    with pytest.raises(AttributeError):
        o.topn = 8  # frozen


def test_integers_of_any_type_are_ints():
    """Counts as NumPy integers or 0-d tensors (computed sizes) are taken and kept as ints, so the
    options equal, hash and print as those given as ints."""
    o = KCacheOptions(topn=np.int64(8), sinks=torch.tensor(2), window=np.int32(6),
                      reuse=np.uint16(64), dense_layers=[np.int64(1), torch.tensor(0)])
    assert o == KCacheOptions(topn=8, sinks=2, window=6, reuse=64, dense_layers=(0, 1))
    assert all(type(getattr(o, name)) is int for name in ("topn", "sinks", "window", "reuse"))
    assert [type(i) for i in o.dense_layers] == [int, int] and o.to_dict()["topn"] == 8
    for bad in (np.bool_(True), torch.tensor(True), np.float64(8.0), torch.tensor([8]),
                torch.tensor(8, device="meta")):  # 1 dim (torch would index by it); no value
        with pytest.raises(ValueError, match="topn must be an integer >= 1"):
            KCacheOptions(topn=bad)


def test_top_p_of_any_real_type_is_a_float():
    """top_p as a NumPy float or integer or a 0-d tensor is taken and kept as a float; a bool,
    a complex, a string, a 1-dim tensor or an int past the float range are refused."""
    for value in (np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5),
                  torch.tensor(0.5).half()):
        o = KCacheOptions(top_p=value)
        assert type(o.top_p) is float and o == KCacheOptions(top_p=0.5)
    assert KCacheOptions(top_p=np.int64(1)).top_p == 1.0
    assert KCacheOptions(top_p=torch.tensor(1)).top_p == 1.0
    for bad in (np.bool_(True), torch.tensor(True), 0.5 + 0j, np.complex64(0.5), "0.5",
                torch.tensor([0.5]), np.array([0.5]), 10 ** 400):
        with pytest.raises(ValueError, match="top_p must be a number in \\(0, 1\\]"):
            KCacheOptions(top_p=bad)


def test_flags_of_any_bool_type_are_bools():
    """group_select and renormalize as a NumPy bool or a 0-d bool tensor are taken and kept as a
    Python bool; an int, a string or a 1-dim tensor is refused."""
    for value in (np.bool_(True), torch.tensor(True), np.array(True)):
        o = KCacheOptions(group_select=value, renormalize=value)
        assert o.group_select is True and o.renormalize is True
        assert o == KCacheOptions(group_select=True)
    for bad in (1, np.int64(0), "True", torch.tensor([True]), torch.tensor(True, device="meta")):
        with pytest.raises(ValueError, match="group_select must be a bool"):
            KCacheOptions(group_select=bad)


@pytest.mark.parametrize("options, message", [
    ({"topn": 0}, "topn must be an integer >= 1, got 0"),
    ({"topn": True}, "topn must be an integer >= 1, got True"),
    ({"group_select": 1}, "group_select must be a bool, got 1"),
    ({"dense_layers": ("0",)}, "dense_layers must be integers"),
    ({"dense_layers": 5}, "dense_layers must be a sequence of layer indices, got 5"),
    ({"tail": "int3"}, "tail must be one of none, mean, int2, int4, got 'int3'"),
    ({"top_p": 0}, "top_p must be a number in \\(0, 1\\] \\(as a float32\\), got 0"),
    ({"top_p": 1.5}, "top_p must be a number in \\(0, 1\\] \\(as a float32\\), got 1.5"),
    ({"top_p": 1e-46}, "top_p must be a number in \\(0, 1\\] \\(as a float32\\), got 1e-46"),
    ({"top_p": True}, "top_p must be a number in"),
    ({"tail": "int2", "renormalize": False}, "renormalize=False drops the mass outside the top N"),
    ({"reuse": -1}, "reuse must be an integer >= 0, got -1"),
    ({"reuse": True}, "reuse must be an integer >= 0, got True"),
    ({"reuse": 1.5}, "reuse must be an integer >= 0, got 1.5"),
    ({"tail": "mean", "sinks": 0, "window": 0, "reuse": 2},
     "mean tail is formed in sparse_attn_v over host V .* reuse=2"),
])
def test_bad_values_fail_when_built(options, message):
    with pytest.raises(ValueError, match=message):
        KCacheOptions(**options)


def test_model_dependent_checks_fail_when_the_cache_is_built():
    with pytest.raises(ValueError, match=r"dense_layers \[3\] out of range .* 3 layers"):
        make_cache("kcache", CONFIG, 1, 8, "cpu", torch.float32, KCacheOptions(dense_layers=(3,)))
    big = replace(KCacheOptions.paper_literal(), topn=MAX_TOPN + 1)
    big.check(CONFIG.num_layers, "cpu", (MAX_TOPN + 1, 0))  # the CPU path has no limit on N
    big.check(CONFIG.num_layers, "cuda")  # without a step: the capacity decides N
    with pytest.raises(ValueError, match=f"at most {MAX_TOPN} on CUDA, got {MAX_TOPN + 1}"):
        big.check(CONFIG.num_layers, "cuda", (MAX_TOPN + 1, 0))
    pool = KCacheOptions(reuse=MAX_REUSE + 1)
    pool.check(CONFIG.num_layers, "cpu", (64, MAX_REUSE + 1))  # nor on the reuse pool
    with pytest.raises(ValueError, match=f"reuse must be at most {MAX_REUSE} on CUDA, got "
                                         f"{MAX_REUSE + 1}"):
        pool.check(CONFIG.num_layers, "cuda", (64, MAX_REUSE + 1))


def test_cuda_limits_bound_a_step_where_the_capacity_is_known():
    """With the capacity, the CUDA limits bound what a cache runs: a step's N = min(topn,
    capacity) and the pool's slots (at most max(capacity, a step's entries)); topn or reuse above
    them is fine on a shorter cache (checked without a GPU: the check is on the device type)."""
    big = replace(KCacheOptions.paper_literal(), topn=MAX_TOPN + 1)
    check_kcache(CONFIG, "cuda", torch.float32, big, MAX_TOPN)
    with pytest.raises(ValueError, match=rf"topn must be at most {MAX_TOPN} on CUDA, got "
                                         rf"{MAX_TOPN + 1} \(a step's N, min\(topn, capacity\), "
                                         rf"is {MAX_TOPN + 1}\)"):
        check_kcache(CONFIG, "cuda", torch.float32, big, 10**5)
    pool = KCacheOptions(reuse=10**5)
    check_kcache(CONFIG, "cuda", torch.float32, pool, MAX_REUSE)
    with pytest.raises(ValueError, match=rf"reuse must be at most {MAX_REUSE} on CUDA, got "
                                         rf"100000 \(the pool's slots, at this capacity: "
                                         rf"{MAX_REUSE + 1}\)"):
        check_kcache(CONFIG, "cuda", torch.float32, pool, MAX_REUSE + 1)
    check_kcache(CONFIG, "cuda", torch.float32, big)  # without the capacity: left to the cache
    check_kcache(CONFIG, "cuda", torch.float32, pool)
    step = replace(pool, topn=MAX_REUSE // 2 + 1)  # G = 2: a step reads more than the pool holds
    with pytest.raises(ValueError, match=rf"reuse on CUDA holds at most {MAX_REUSE} rows per KV "
                                         rf"head, fewer than a step's {MAX_REUSE + 2} \(N x the "
                                         rf"GQA group"):
        check_kcache(CONFIG, "cuda", torch.float32, step, 10**4)
    check_kcache(CONFIG, "cuda", torch.float32, replace(step, group_select=True, reuse=MAX_REUSE),
                 10**4)


@pytest.mark.parametrize("device", ["meta", torch.device("meta")])
def test_a_device_without_the_ops_is_refused(device):
    with pytest.raises(ValueError, match=rf"KCache: device must be a CPU or CUDA device \(where "
                                         rf"the kcache ops run\), got meta"):
        make_cache("kcache", CONFIG, 1, 8, device, torch.float32)


def test_max_topn_is_the_kernel_constant():
    text = KERNEL.read_text(encoding="utf-8")
    value = re.search(r"constexpr int kMaxTopN = (\d+);", text).group(1)
    assert MAX_TOPN == int(value)


def test_max_group_select_is_the_kernel_constant():
    text = KERNEL.read_text(encoding="utf-8")
    value = re.search(r"constexpr int kMaxGroupSelect = (\d+);", text).group(1)
    assert MAX_GROUP_SELECT == int(value)


def test_group_select_on_cuda_takes_at_most_max_group_select_heads_per_kv_head():
    """Checked where the cache is built, not at its first decode step (checked without a GPU:
    the check is on the device type)."""
    wide = replace(CONFIG, num_heads=2 * (MAX_GROUP_SELECT + 1), num_kv_heads=2)
    options = KCacheOptions(group_select=True)
    check_kcache(wide, "cpu", torch.float32, options)  # the CPU path has no limit
    check_kcache(wide, "cuda", torch.float32, replace(options, group_select=False))
    check_kcache(replace(wide, num_heads=2 * MAX_GROUP_SELECT), "cuda", torch.float32, options)
    with pytest.raises(ValueError, match=rf"group_select on CUDA ranks at most {MAX_GROUP_SELECT} "
                                         rf"query heads per KV head together, got "
                                         rf"{MAX_GROUP_SELECT + 1}"):
        check_kcache(wide, "cuda", torch.float32, options)


def test_max_reuse_is_the_kernel_constant():
    """The reuse kernel holds MAX_REUSE slots, and as many entries (a pool holds a step)."""
    text = (KERNEL.parent / "reuse_rows_kernel.cuh").read_text(encoding="utf-8")
    for name in ("kReuseMaxSlots", "kReuseMaxEntries"):
        assert MAX_REUSE == int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))


def test_labels_and_json():
    """Labels name what differs from the paper's KCache, whatever the defaults."""
    paper = KCacheOptions.paper_literal()
    o = replace(paper, topn=16, group_select=True, renormalize=False, dense_layers=(1, 0))
    assert o.label == "N=16 gs rn=0 dl=0,1" and o.variant == "gs, rn=0, dl=0,1"
    assert paper.label == "N=64" and replace(paper, topn=8).variant == "paper"
    assert replace(paper, tail="int2", sinks=4, window=60).label == "N=64 tail=int2 sinks=4 win=60"
    assert replace(paper, reuse=4).label == "N=64 reuse=4"
    assert o.to_dict() == {"topn": 16, "group_select": True, "renormalize": False,
                           "dense_layers": [0, 1], "tail": "none", "top_p": 1.0, "sinks": 0,
                           "window": 0, "reuse": 0}
    assert KCacheOptions.from_dict(o.to_dict()) == o
    with pytest.raises(TypeError, match="unknown option.* top_n; the options are topn"):
        KCacheOptions.from_dict({"top_n": 4})


def test_both_caches_follow_the_protocol_and_report_host_traffic():
    dense = make_cache("dense", CONFIG, 2, 8, "cpu", torch.float32)
    kc = make_cache("kcache", CONFIG, 2, 8, "cpu", torch.bfloat16,
                    KCacheOptions(topn=4, dense_layers=(1,)))
    gs = make_cache("kcache", CONFIG, 2, 8, "cpu", torch.bfloat16,
                    KCacheOptions(topn=4, group_select=True))
    assert isinstance(dense, Cache) and isinstance(kc, Cache)
    assert dense.host_bytes_read_per_step() == 0
    # 2 KCache layers x 2 sequences x (4 query heads x 4 rows read + 2 rows written) x 64 x 2 B
    assert kc.host_bytes_read_per_step() == 2 * 2 * (4 * 4 + 2) * 64 * 2
    assert gs.host_bytes_read_per_step() == 3 * 2 * (2 * 4 + 2) * 64 * 2


@pytest.mark.parametrize("capacity", [16, 64])
def test_device_bytes_read_per_step_are_the_rows_attended(capacity):
    """What a decode step reads of device memory at 10 tokens, counted by hand (3 layers,
    2 sequences, 2 KV heads, D 64): K and V of the 10 positions, not the capacity allocated;
    KCache's K, its dense layers' V, its tail (the low-bit copy of the positions not hot: D·bits/8
    code bytes and a bfloat16 scale and min per row, or the float32 V sum) and every hot slot."""
    def read(backend, dtype=torch.bfloat16, **options):
        return make_cache(backend, CONFIG, 2, capacity, "cpu", dtype,
                          KCacheOptions(**options) if backend == "kcache" else None
                          ).device_bytes_read_per_step(10)
    rows = 2 * 2 * 10  # (sequence, KV head, position) of one layer
    assert read("dense", torch.float32) == 3 * 2 * rows * 64 * 4  # K and V
    paper = dict(tail="none", top_p=1.0, sinks=0, window=0)
    assert read("kcache", **paper) == 3 * rows * 128
    assert read("kcache", **paper, dense_layers=(1,)) == 4 * rows * 128  # and one layer's V
    assert read("kcache", **{**paper, "tail": "mean"}) == 3 * rows * 128 + 3 * 2 * 2 * 64 * 4
    hot = 3 * 2 * 2 * 5 * 128  # 2 sinks + 3 window slots of each layer
    cold = 2 * 2 * (10 - 5)  # (sequence, KV head, position) of one layer, not hot
    for tail, code in (("int2", 16), ("int4", 32)):
        assert read("kcache", tail=tail, sinks=2, window=3) == (3 * rows * 128 + hot
                                                                + 3 * cold * (code + 4))
    assert read("kcache", tail="int2", sinks=2, window=3, dense_layers=(0, 2)) == (
        5 * rows * 128 + hot // 3 + cold * (16 + 4))  # K of 3 layers, V of 2


def test_device_bytes_read_per_step_with_reuse_count_the_pooled_rows():
    """With reuse a step also reads its N rows per query head (per KV head with group select)
    from the pool: the approximate count the docstring states."""
    for group_select, heads in ((False, 4), (True, 2)):
        options = KCacheOptions(topn=4, tail="none", top_p=1.0, sinks=0, window=0, reuse=16,
                                group_select=group_select)
        cache = make_cache("kcache", CONFIG, 2, 16, "cpu", torch.bfloat16, options)
        assert cache.device_bytes_read_per_step(10) == 3 * 2 * (2 * 10 + heads * 4) * 128


def test_byte_counts_refuse_counts_out_of_range():
    """The byte counts' arguments are counts: a negative or fractional number of tokens, more
    than the capacity, or rows outside [0, N] are refused by name (-3 rows gave -10240 bytes,
    'a' a TypeError from inside); a measured mean of rows may be fractional."""
    dense = make_cache("dense", CONFIG, 2, 8, "cpu", torch.float32)
    kc = make_cache("kcache", CONFIG, 2, 8, "cpu", torch.bfloat16, KCacheOptions(topn=4))
    for cache, owner in ((dense, "DenseCache"), (kc, "KCache")):
        for tokens in (-5, 9, 2.5, "a", None):
            with pytest.raises(ValueError, match=rf"{owner}: tokens must be an integer in "
                                                 rf"\[0, 8\], got {re.escape(repr(tokens))}"):
                cache.device_bytes_read_per_step(tokens)
        assert cache.device_bytes_read_per_step(np.int64(8)) == cache.device_bytes_read_per_step(8)
    for rows in (-3, 5, "a", True):
        with pytest.raises(ValueError, match=r"KCache: rows must be a number in \[0, 4\] \(rows "
                                             r"read per head and step\), got "
                                             + re.escape(repr(rows))):
            kc.host_bytes_read_per_step(rows)
    assert kc.host_bytes_read_per_step(2.5) == 3 * 2 * (4 * 2.5 + 2) * 64 * 2


def parse(argv):
    parser = argparse.ArgumentParser()
    add_kcache_arguments(parser)
    return parser.parse_args(argv)


def test_flags_follow_the_fields():
    args = parse(["--topn", "8", "--group-select", "--no-renormalize", "--dense-layers", "1,0",
                  "--tail", "none"])
    assert kcache_options(args) == replace(KCacheOptions(), topn=8, group_select=True,
                                           renormalize=False, dense_layers=(0, 1), tail="none")
    assert given_kcache_options(parse([])) == {} and kcache_options(parse([])) == KCacheOptions()
    # an empty list is none (a list a script built that came out empty)
    assert kcache_options(parse(["--dense-layers", "1", "--dense-layers", ""])).dense_layers == ()
    with pytest.raises(SystemExit, match="topn must be an integer >= 1, got 0"):
        kcache_options(parse(["--topn", "0"]))


@pytest.mark.parametrize("argv, message", [
    (["--no-renormalize"], "KCache: --no-renormalize drops the mass outside the top N, which "
                           "--tail int2 accounts for (the default tail is 'int2'); use it with "
                           "--tail none"),
    (["--tail", "mean"], "or the mean tail with --sinks 0 and --window 0 (got --sinks 4, "
                         "--window 60)")])
def test_a_combination_refused_is_said_in_flags(argv, message):
    """A combination of options refused on the command line is said in the flags that set them
    (it said renormalize=False, tail='none', sinks=0: the options' names in Python)."""
    with pytest.raises(SystemExit) as e:
        kcache_options(parse(argv))
    assert message in str(e.value)


def test_paper_literal_is_one_flag_away(capsys):
    """--paper-literal gives KCache as the paper states it whatever the defaults; other KCache
    flags given with it change it. A value no option takes is refused: a tail by the parser (its
    choices), the rest when the options are made."""
    paper = KCacheOptions.paper_literal()
    assert (paper.topn, paper.renormalize, paper.tail, paper.top_p) == (64, True, "none", 1.0)
    assert kcache_options(parse(["--paper-literal"])) == paper
    assert kcache_options(parse(["--paper-literal", "--topn", "32"])) == replace(paper, topn=32)
    with pytest.raises(SystemExit, match="topn must be an integer >= 1, got 0"):
        kcache_options(parse(["--paper-literal", "--topn", "0"]))
    with pytest.raises(SystemExit):
        parse(["--paper-literal", "--tail", "int3"])
    assert "--tail: invalid choice: 'int3'" in capsys.readouterr().err


def test_a_field_with_its_own_flag():
    """top_p's flag is --attn-top-p (generate's --top-p samples): parsed into top_p, and named
    as typed among the flags given."""
    from kcache_ops.cli.args import given_kcache_flags
    args = parse(["--attn-top-p", "0.9", "--tail", "int2", "--paper-literal"])
    assert kcache_options(args) == replace(KCacheOptions.paper_literal(), top_p=0.9, tail="int2")
    assert given_kcache_flags(args) == ["--tail", "--attn-top-p", "--paper-literal"]


def test_reuse_flag():
    assert kcache_options(parse(["--reuse", "4"])) == replace(KCacheOptions(), reuse=4)
    with pytest.raises(SystemExit, match="reuse must be an integer >= 0, got -1"):
        kcache_options(parse(["--reuse", "-1"]))


def test_hot_rows_flags():
    args = parse(["--sinks", "4", "--window", "60", "--tail", "int2"])
    assert kcache_options(args) == replace(KCacheOptions(), sinks=4, window=60, tail="int2")
    with pytest.raises(SystemExit, match="the mean tail takes the mean of every row not read"):
        kcache_options(parse(["--window", "8", "--tail", "mean"]))
