"""The accuracy evaluation's machinery at small sizes: KCache with N >= the sequence length equals
dense through the decode path (perplexity, agreement), with and without a tail; the measures'
arithmetic, the grids, the needle's phrasings, the recommendation rule; and a short run of the
whole suite on the real default model (needle included)."""
import argparse
import json
import math
import os
import re
import warnings
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch

from kcache_ops.__main__ import main
from kcache_ops.cli import eval as eval_cli
from kcache_ops.caches import KCacheOptions
from kcache_ops.data import essays_text
from kcache_ops.eval import agreement, needle, perplexity, recommend
from kcache_ops.eval import report as eval_report
from kcache_ops.eval import suite
from kcache_ops.eval.grid import (PAPER_LITERAL, default_grid, display_name, product_grid,
                                  quick_grid)
from kcache_ops.eval.runner import Config, fork, prefill_snapshot, step_through
from kcache_ops.eval.suite import Settings, build_groups, evaluate, line, save_json
from kcache_ops.model import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=64)
PREFILL, STEPS = 448, 64  # 512 tokens per row


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Llama(TINY).eval()
    ids = torch.randint(0, TINY.vocab_size, (3 * (PREFILL + STEPS + 1),)).tolist()
    prompts, first, targets = perplexity.windows(ids, 3, PREFILL, STEPS)
    return model, prefill_snapshot(model, prompts), first, targets


def eval_parser():
    """The `eval` command's argument parser."""
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    return parser


def run(model, snapshot, config, first, forced):
    cache = fork(model, snapshot, config, forced.shape[1])
    return step_through(model, cache, first, forced)  # argmax, logprob [B, S]


def test_decode_path_perplexity_matches_full_forward(tiny):
    model, snapshot, first, targets = tiny
    _, logprob = run(model, snapshot, Config.dense(), first, targets)  # [3, S]
    tokens = torch.cat([snapshot.tokens, first[:, None], targets], 1)  # [3, P + S + 1]
    with torch.inference_mode():
        full = torch.log_softmax(model.forward(tokens), -1)  # [3, P + S + 1, V]
    expected = full[:, PREFILL:-1].gather(-1, targets[..., None])[..., 0]  # [3, S]
    torch.testing.assert_close(logprob, expected, atol=1e-4, rtol=1e-4)


def test_perplexity_windows_and_summary_by_hand():
    """Each window's prefill, the token fed at step 0 and the tokens the steps must predict (the
    next ones, not the one just fed); the perplexity of the mean NLL per token, windows alike;
    Δppl of a worse result above 0."""
    prompts, first, targets = perplexity.windows(list(range(20)), 2, 3, 4)
    assert prompts == [[0, 1, 2], [8, 9, 10]] and first.tolist() == [3, 11]
    assert targets.tolist() == [[4, 5, 6, 7], [12, 13, 14, 15]]
    prompts, first, _ = perplexity.windows(list(range(20)), 2, 3, 4, offset=2)
    assert prompts == [[2, 3, 4], [10, 11, 12]] and first.tolist() == [5, 13]
    s = perplexity.summarize(torch.tensor([[-1.0, -1.0, -1.0], [-3.0, -3.0, -3.0]]))
    assert s["nll"] == pytest.approx(2.0) and s["ppl"] == pytest.approx(math.e ** 2)
    assert s["ppl_rows"] == pytest.approx([math.e, math.e ** 3])
    assert perplexity.delta({"ppl": 11.0}, {"ppl": 10.0}) == pytest.approx(10.0)


def test_kcache_with_n_at_least_length_equals_dense_perplexity(tiny):
    model, snapshot, first, targets = tiny
    _, dense = run(model, snapshot, Config.dense(), first, targets)
    _, exact = run(model, snapshot, Config.kcache(topn=PREFILL + STEPS), first, targets)
    _, sparse = run(model, snapshot, Config.kcache(topn=4), first, targets)
    torch.testing.assert_close(exact, dense, atol=1e-4, rtol=1e-4)
    d = perplexity.summarize(dense)
    assert perplexity.delta(perplexity.summarize(exact), d) == pytest.approx(0.0, abs=1e-3)
    assert abs(perplexity.delta(perplexity.summarize(sparse), d)) > 1e-3  # the measure sees N


@pytest.mark.parametrize("config", [Config.kcache(topn=1024),
                                    Config.kcache(topn=1024, group_select=True),
                                    Config.kcache(topn=1024, renormalize=False),
                                    Config.kcache(topn=1024, dense_layers=(0, 1)),
                                    Config.kcache(topn=1024, tail="mean"),
                                    Config.kcache(topn=1024, tail="int2"),
                                    Config.kcache(topn=1024, tail="int4", group_select=True)],
                         ids=lambda c: c.name)
def test_agreement_is_complete_at_n_at_least_length(tiny, config):
    model, snapshot, first, _ = tiny
    greedy = torch.full((first.shape[0], STEPS), -1)
    reference, _ = run(model, snapshot, Config.dense(), first, greedy)  # [3, S]
    argmax, _ = run(model, snapshot, config, first, reference)
    a = agreement.summarize(argmax, reference)
    assert a["match_rate"] == 1.0 and a["first_divergence"] == STEPS


def test_agreement_arithmetic():
    ref = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    got = torch.tensor([[1, 2, 9, 4], [1, 2, 3, 4]])
    a = agreement.summarize(got, ref)
    assert a["first_divergence_rows"] == [2, 4] and a["match_rate"] == 7 / 8
    assert a["first_divergence"] == 3.0  # the mean over rows


def test_step_through_feeds_the_forced_token_and_scores_it():
    """A forced token is fed and scored, token 0 too (an ordinary token in many vocabularies:
    "!" in Llama 3's); -1 feeds the argmax. The model here always puts token 1 first."""
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])  # [B, V]
    fed = []

    def decode(token, cache):
        fed.append(token.tolist())
        return logits
    model = SimpleNamespace(device=torch.device("cpu"), decode=decode)
    argmax, logprob = step_through(model, None, torch.tensor([2, 2]),
                                   torch.tensor([[0, 2], [-1, -1]]))  # [B, S]
    assert fed == [[2, 2], [0, 1]] and argmax.tolist() == [[1, 1], [1, 1]]
    want = torch.log_softmax(logits[0], -1)  # [V]
    torch.testing.assert_close(logprob, torch.stack([want[[0, 2]], want[[1, 1]]]))


def test_needle_answer_and_score():
    """The first number of the answer, matched exactly (a longer number holding the key is
    wrong)."""
    assert needle.answer("The pass key is 71432.") == "71432"
    assert needle.answer("The pass key is 71432. Remember it, 2 times.") == "71432"
    assert needle.answer("no idea") == ""

    class Tok:
        def decode(self, ids):
            return "".join(map(str, ids))
    s = needle.score(Tok(), [[7, 1, 4, 3, 2], [1, 2], [7, 1, 4, 3, 2, 9]], ["71432", "99", "71432"])
    assert s["correct"] == [True, False, False] and s["accuracy"] == pytest.approx(1 / 3)


def test_default_grid():
    """The curated grid: the paper-literal setting first, every other configuration named by
    what it changes from it (so a change of the defaults leaves the grid alone)."""
    configs = default_grid()
    options = [c.options for c in configs]
    assert len(configs) == 12 and len(set(configs)) == 12
    assert options[0] == PAPER_LITERAL and display_name(configs[0]).endswith("(paper-literal)")
    hot = dict(sinks=4, window=60)
    assert options[1:3] == [replace(PAPER_LITERAL, tail="int2", **hot),
                            replace(PAPER_LITERAL, tail="int2")]
    assert {o.topn for o in options if o.tail == "int2"} == {8, 64}
    assert replace(PAPER_LITERAL, topn=8, tail="int4") in options
    assert replace(PAPER_LITERAL, **hot) in options  # hot rows without a tail
    assert any(o.top_p < 1 for o in options) and any(o.group_select for o in options)
    assert replace(PAPER_LITERAL, topn=256) in options
    assert all(o.renormalize and not o.dense_layers for o in options)


def test_product_grid_order_and_size():
    configs = product_grid((16, 64), ("none", "int2"), (False, True), ((), (0,)))
    assert len(configs) == 16 and len(set(configs)) == 16
    assert configs[0].options == replace(PAPER_LITERAL, topn=64, tail=KCacheOptions().tail)
    last = configs[-1].options
    assert last.group_select and last.dense_layers and last.tail != KCacheOptions().tail


def test_tails_flag():
    parser = eval_parser()
    args = parser.parse_args(["--topn", "8,64", "--tails", "none,int2"])
    assert [c.options for c in eval_cli.configs(args)] == \
        [c.options for c in product_grid((8, 64), ("none", "int2"))]
    assert eval_cli.configs(parser.parse_args([])) == default_grid()
    with pytest.raises(SystemExit):
        parser.parse_args(["--tails", "int3"])


def test_an_empty_tails_flag_is_refused(capsys):
    """--tails of no tail (",") is refused, as --dense-layers of no layer: it would parse to ()
    and run the curated grid instead of the product asked for."""
    parser = eval_parser()
    assert eval_cli.tail_list(" int2, none ,") == ("int2", "none")
    with pytest.raises(SystemExit):
        parser.parse_args(["--tails", ","])
    assert "argument --tails: expected comma-separated values of none" in capsys.readouterr().err


def test_an_empty_dense_layers_flag_is_refused(capsys):
    """--dense-layers of no layer (",", "") is refused: it parsed to () and, false, let the
    default grid run (47 minutes) instead of the product asked for."""
    parser = eval_parser()
    assert eval_cli.configs(parser.parse_args(["--dense-layers", "0,2"]))[-1].options \
        .dense_layers == (0, 2)
    for text, message in ((",", "expected comma-separated integers, got ','"),
                          ("", "expected comma-separated layer indices, at least one")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--dense-layers", text])
        assert message in capsys.readouterr().err


class FakeTokenizer:
    """Characters as token ids; the chat template is the text itself."""
    def decode(self, ids):
        return "".join(map(chr, ids))

    def encode_prompt(self, text, chat=True):
        return [ord(ch) for ch in text]


class ByteTokenizer(FakeTokenizer):
    """Characters as token ids below 256, for the essays."""
    def encode(self, text, add_special=True):
        return [min(ord(ch), 255) for ch in text]

    eos_ids = ()


def test_eval_past_the_trained_positions_warns():
    """A group whose prompts and steps run past the model's trained positions is run, with a
    warning naming it (as generate warns); the groups within them give none."""
    torch.manual_seed(0)
    model = Llama(replace(TINY, max_position_embeddings=128)).eval()
    s = Settings(ppl_rows=1, agree_rows=1, prefill=16, steps=2, long_rows=1, long_prefill=120,
                 long_steps=9, needle_lengths=(40,), needle_depths=(0.5,),
                 needle_phrasings=("vault",), answer_steps=2)
    with pytest.warns(UserWarning) as record:
        results = evaluate(model, ByteTokenizer(), s, [], lambda results: None,
                           log=lambda line: None)
    assert [str(w.message) for w in record] == [
        "eval: the long group's prompts and steps reach 129 positions, past the 128 the model "
        "was trained on; its measures there say little"]
    assert len(results) == 1 and "long" in results[0]


def test_options_only_a_capacity_refuses_fail_before_the_dense_run():
    """A reuse pool smaller than a step's rows at a group's capacity (N = min(topn, capacity))
    is refused before dense runs (the command's own check has no capacity)."""
    s = Settings(ppl_rows=1, agree_rows=1, prefill=16, steps=2, long_rows=1, long_prefill=40,
                 long_steps=2, needle_lengths=(40,), needle_depths=(0.5,),
                 needle_phrasings=("vault",), answer_steps=2)
    runs = []
    config = Config("kcache", KCacheOptions(topn=16, reuse=20))  # 16 x G 2 rows at >= 16 tokens
    with pytest.raises(ValueError, match="reuse must hold the rows of a whole step, at least 32"):
        evaluate(Llama(TINY).eval(), ByteTokenizer(), s, [config], runs.append,
                 log=runs.append)
    assert runs == []


def test_costs_of_all_dense_layers_and_of_reuse():
    """A KCache whose every layer is dense reads no host rows (the mean over no layer was NaN,
    and the report's plot failed on it); with reuse the host bytes are counted as without it
    (every head's rows and the new token's), less the share the pools held, and with every
    position hot as without reuse (not 0 · NaN)."""
    from kcache_ops.eval.summary import costs
    torch.manual_seed(0)
    model = Llama(TINY).eval()
    prompts = [list(torch.randint(0, 256, (60,)).tolist()), list(range(40))]
    snapshot = prefill_snapshot(model, prompts)
    forced = torch.randint(0, 256, (2, 6))

    def run(**options):
        config = Config.kcache(topn=8, **options)
        cache = fork(model, snapshot, config, forced.shape[1], record_mass=True)
        step_through(model, cache, forced[:, 0], forced)
        return cache, costs(cache, TINY, config)

    _, dense = run(dense_layers=range(TINY.num_layers))
    assert dense["host_rows"] == 0 and dense["host_bytes_per_step"] == 0
    _, plain = run()
    cache, reused = run(reuse=16)
    assert reused["host_rows"] == plain["host_rows"] == 8
    written = cache.host_bytes_read_per_step(0) / 2  # per sequence: the new token's rows
    found = float(cache.reuse_hit_rate()[list(cache.v_host)].mean())
    assert 0 < found < 1
    assert reused["host_bytes_per_step"] == pytest.approx(
        written + (plain["host_bytes_per_step"] - written) * (1 - found))
    # every position hot: no row read, none found (0 / 0), the new token's rows written
    _, hot = run(window=80)
    _, hot_reused = run(window=80, reuse=16)
    assert hot_reused["host_rows"] == 0 and hot_reused["host_bytes_per_step"] == written == \
        hot["host_bytes_per_step"]


def test_text_too_short_names_the_flags_that_ask_for_it():
    """Sizes the essay text cannot hold are refused before any prefill with what each part needs
    and its flags (the error named a perplexity window's width, not the flags that set it)."""
    tok = ByteTokenizer()
    have = len(tok.encode(essays_text(), add_special=False))
    s = Settings(ppl_rows=1, agree_rows=1, prefill=have // 2, steps=9, long_rows=1,
                 long_prefill=10, long_steps=9, needle_lengths=(100,))
    short = 2 * (have // 2 + 10)
    with pytest.raises(ValueError) as error:
        build_groups(tok, s)
    assert str(error.value) == (
        f"eval needs {short + 20 + 100} tokens of essay text, the text has {have}: {short} for "
        "the short windows ((--ppl-rows + --agree-rows) x (--prefill + --steps + 1)), 20 for the "
        "long ones (--long-rows x (--long-prefill + --long-steps + 1)), 100 for the longest "
        "needle haystack (--needle-lengths)")


def test_groups_take_their_own_text_and_sizes(monkeypatch):
    """build_groups: the short windows from the text's start (the agreement rows greedy, -1), the
    long ones right after them, the needle haystacks after those (from one start, no token of
    the windows), each of its length and in the phrasings and key seed asked; each group's rows
    and steps as the settings ask. Text of exactly the tokens needed is enough, one fewer (for
    the longest haystack) is refused."""
    s = Settings(ppl_rows=2, agree_rows=1, prefill=8, steps=3, long_rows=2, long_prefill=12,
                 long_steps=4, needle_lengths=(30, 60), needle_depths=(0.5,),
                 needle_phrasings=("vault",), answer_steps=5, seed=7)
    short, long = 3 * 12, 2 * 17
    # letters alone: no ". " in the haystack, so each needle goes at its very start
    ids = torch.randint(ord("a"), ord("z") + 1, (short + long + 60,)).tolist()
    text = "".join(map(chr, ids))
    monkeypatch.setattr(suite, "essays_text", lambda: text)
    groups = build_groups(ByteTokenizer(), s)
    assert [g["name"] for g in groups] == ["short", "long", "needle-30", "needle-60"]
    g = groups[0]
    assert g["prompts"] == [ids[r * 12: r * 12 + 8] for r in range(3)] and g["ppl_rows"] == 2
    assert g["first"].tolist() == [ids[r * 12 + 8] for r in range(3)]
    assert g["forced"].tolist() == [ids[9: 12], ids[21: 24], [-1] * 3]
    g = groups[1]
    assert g["prompts"] == [ids[short + r * 17: short + r * 17 + 12] for r in range(2)]
    assert g["first"].tolist() == [ids[short + 12], ids[short + 29]] and g["ppl_rows"] == 2
    assert g["forced"].tolist() == [ids[short + 13: short + 17], ids[short + 30: short + 34]]
    sentence, question = needle.PHRASINGS["vault"]
    for g, length in zip(groups[2:], (30, 60)):
        assert g["first"] is None and g["phrasing"] == ["vault"] and "ppl_rows" not in g
        assert g["forced"].tolist() == [[-1] * 5]
        assert g["keys"] == needle.prompts(FakeTokenizer(), ids, length, (0.5,), 7,
                                            phrasings=("vault",))[1]
        assert ByteTokenizer().decode(g["prompts"][0]) == (
            sentence.format(key=g["keys"][0]) + text[short + long: short + long + length]
            + "\n\n" + question)
    monkeypatch.setattr(suite, "essays_text", lambda: text[:-1])
    with pytest.raises(ValueError, match=f"^eval needs {short + long + 60} tokens of essay text, "
                                         f"the text has {short + long + 59}: "):
        build_groups(ByteTokenizer(), s)


def test_run_group_scores_each_kind_of_group(monkeypatch):
    """run_group on stand-in decode steps: perplexity over the perplexity rows only; dense's
    greedy rows kept, and another configuration fed them and scored on agreement with them; a
    group of perplexity rows alone has neither; a needle answer starts with the prefill's argmax
    and runs to the first end token (not past it) or to its last step; KCache's attention mass
    recorded, each cache forked with room for the steps."""
    calls, steps = [], []  # steps: what each step_through returns, in turn
    mass = torch.rand(3).tolist()

    def fork(model, snapshot, config, steps, record_mass=False):
        calls.append((steps, record_mass))
        return SimpleNamespace(attention_mass=lambda: torch.tensor(mass))

    def step_through(model, cache, first, forced, progress=None):
        calls.append((first.tolist(), forced.tolist()))
        return steps.pop(0)
    monkeypatch.setattr(suite, "fork", fork)
    monkeypatch.setattr(suite, "step_through", step_through)
    tok, kcache = ByteTokenizer(), Config.kcache(topn=8)
    forced = torch.randint(0, 50, (3, 4))  # [B, S]
    forced[2] = -1
    group = {"name": "short", "prompts": [[1]] * 3, "first": torch.randint(0, 50, (3,)),
             "forced": forced, "ppl_rows": 2}
    argmax, logprob = torch.randint(0, 50, (3, 4)), -torch.rand(3, 4)
    steps.append((argmax, logprob))
    dense, _ = suite.run_group(None, tok, group, None, Config.dense(), None, None)
    assert dense == {"perplexity": perplexity.summarize(logprob[:2]),
                     "greedy": argmax[2:].tolist()}
    assert calls == [(4, True), (group["first"].tolist(), forced.tolist())]
    mine, logprob = argmax.clone(), -torch.rand(3, 4)
    mine[2, 2] += 1  # diverges from dense at step 2
    steps.append((mine, logprob))
    calls.clear()
    out, _ = suite.run_group(None, tok, group, None, kcache, {"short": dense}, None)
    assert out == {"mass": mass, "perplexity": perplexity.summarize(logprob[:2]),
                   "agreement": agreement.summarize(mine[2:], argmax[2:])}
    assert out["agreement"]["first_divergence_rows"] == [2]
    assert calls[1][1] == forced[:2].tolist() + argmax[2:].tolist()  # fed dense's tokens
    steps.append((argmax[:2], logprob[:2]))
    long = {"name": "long", "prompts": [[1]] * 2, "first": group["first"][:2],
            "forced": forced[:2], "ppl_rows": 2}
    out, _ = suite.run_group(None, tok, long, None, kcache, {"short": dense}, None)
    assert out == {"mass": mass, "perplexity": perplexity.summarize(logprob[:2])}

    tok.eos_ids = (ord("|"),)
    logits = torch.rand(3, 128)  # the prefill's: its argmax is each answer's first token
    logits[[0, 1, 2], [ord("1"), ord("x"), ord("4")]] = 2.0
    steps.append((torch.tensor([list(map(ord, row)) for row in ("2345", "|7yz", "2|99")]),
                  torch.zeros(3, 4)))
    phrasing = ["vault", "vault", "pass key"]
    group = {"name": "needle-9", "prompts": [[1]] * 3, "first": None,
             "forced": torch.full((3, 4), -1), "keys": ["12345", "7", "42"], "phrasing": phrasing}
    calls.clear()
    out, _ = suite.run_group(None, tok, group, SimpleNamespace(logits=logits), kcache, dense,
                             None)
    assert out == {"mass": mass, "correct": [True, False, True], "answers": ["12345", "", "42"],
                   "accuracy": 2 / 3, "phrasing": phrasing}
    assert calls == [(4, True), ([ord("1"), ord("x"), ord("4")], [[-1] * 4] * 3)]


def test_evaluate_saves_and_logs_each_configuration_as_it_finishes():
    """evaluate: dense, then each configuration; after each, the results so far are saved (a run
    cut short keeps what finished) and its line logged; each result's seconds measured, its
    attention mass apart from the groups' measures; a group that reaches exactly the trained
    positions runs without a warning."""
    s = Settings(ppl_rows=1, agree_rows=1, prefill=16, steps=2, long_rows=1, long_prefill=40,
                 long_steps=2, needle_lengths=(40,), needle_depths=(0.5,),
                 needle_phrasings=("vault",), answer_steps=2)
    tok = ByteTokenizer()
    longest = max(max(map(len, g["prompts"])) + g["forced"].shape[1] for g in build_groups(tok, s))
    model = Llama(replace(TINY, max_position_embeddings=longest)).eval()
    saved, logged = [], []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        results = evaluate(model, tok, s, [Config.kcache(topn=8)],
                           lambda results: saved.append(list(results)), log=logged.append)
    assert not [w for w in record if str(w.message).startswith("eval:")]
    assert [len(r) for r in saved] == [1, 2] and saved[-1] == results
    assert logged == [line(r) for r in results]
    dense, kc = results
    assert dense["config"] == Config.dense().to_dict() and dense["mass"] == {}
    assert kc["config"] == Config.kcache(topn=8).to_dict()
    assert list(kc["mass"]) == ["short", "long", "needle-40"]
    assert all(r["seconds"] > 0 and "mass" not in r["long"] for r in results)


def test_line_of_a_result_by_hand():
    """The printed line of a configuration: its name, Δppl of each context under its own label,
    needle hits of the total, agreement in percent (dense has none), host rows and KiB per
    step, device KiB per token and its ratio to dense, seconds."""
    summary = {"dppl": {"short": 1.5, "long": -0.25}, "needle": 5, "needle_total": 6,
               "host_rows": 12.5, "host_bytes_per_step": 3072.0,
               "device_bytes_per_token": 2560.0, "device_ratio": 0.5, "device_ratio_bf16": 0.75}
    result = {"config": Config.kcache(topn=8, tail="int2").to_dict(), "summary": summary,
              "short": {"agreement": {"match_rate": 0.875}}, "seconds": 7.0}
    assert line(result).split() == [
        "kcache", "N=8", "tail=int2", "Δppl", "short", "+1.50%", "long", "-0.25%", "needle",
        "5/6", "agree", "87.5%", "host", "12.5", "rows", "3.0", "KiB/step", "device", "2.5",
        "KiB/token", "(0.50x", "dense)", "7.0s"]
    dense = {**result, "config": Config.dense().to_dict(), "short": {}}
    assert line(dense).split()[:10] == ["dense", "Δppl", "short", "+1.50%", "long", "-0.25%",
                                        "needle", "5/6", "host", "12.5"]


def test_save_json_keeps_what_the_report_reads(tmp_path):
    """save_json writes the settings, the machine, the command, the planned configurations, the
    recommendation and the results as given (the report reads each back)."""
    s = Settings(ppl_rows=3, needle_lengths=(40, 80))
    info = {"cpu": "c", "cores": 2, "model": "/models/m", "model_name": "m"}
    results = [{"config": Config.dense().to_dict(), "seconds": 1.5}]
    planned = [Config.kcache(topn=8), Config.kcache(topn=8, tail="int2")]
    rec = {"name": "kcache N=8", "meets_all": False}
    save_json(str(tmp_path / "eval.json"), s, info, results, "eval --topn 8", planned, rec)
    assert json.loads((tmp_path / "eval.json").read_text(encoding="utf-8")) == {
        "settings": json.loads(json.dumps(asdict(s))), "machine": info,
        "command": "eval --topn 8", "planned": [c.to_dict() for c in planned],
        "recommended": rec, "results": results}


def test_default_settings_are_those_the_help_states():
    """Without size flags the evaluation runs the sizes --help gives as the defaults."""
    parser = eval_parser()
    s = eval_cli.settings(parser.parse_args([]))
    stated = {a.option_strings[0]: a.dest for a in parser._actions
              if a.help and "(default " in a.help and hasattr(s, a.dest)}
    assert len(stated) == 9
    for flag, dest in stated.items():
        value = re.search(r"\(default ([\d,]+)\)", parser._option_string_actions[flag].help)[1]
        assert getattr(s, dest) == getattr(parser.parse_args([flag, value]), dest), flag


def test_config_pairs_backend_and_options():
    """Config: dense takes no options and KCache needs them (a ValueError naming both); each
    comes back from its JSON dict."""
    for backend, options in (("dense", KCacheOptions()), ("kcache", None)):
        with pytest.raises(ValueError, match=f"^Config: backend '{backend}' with options"):
            Config(backend, options)
    for config in (Config.dense(), Config.kcache(topn=8, tail="int2", dense_layers=(0,))):
        assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_needle_phrasings():
    ids = [ord(ch) for ch in "Some essay text. " * 40]
    depths = (0.1, 0.5, 0.9)
    prompts, keys, phrasings = needle.prompts(FakeTokenizer(), ids, 400, depths, seed=3)
    assert len(needle.PHRASINGS) >= 3 and len(prompts) == len(keys) == 3 * len(needle.PHRASINGS)
    assert phrasings == [p for p in needle.PHRASINGS for _ in depths]
    for p, key, name in zip(prompts, keys, phrasings):
        sentence, question = needle.PHRASINGS[name]
        text = FakeTokenizer().decode(p)
        assert sentence.format(key=key) in text and text.endswith(question)
        assert len(key) == 5 and needle.answer(sentence.format(key=key)) == key
    first = FakeTokenizer().decode(prompts[0]).index(keys[0])
    last = FakeTokenizer().decode(prompts[2]).index(keys[2])
    assert first < 100 < 300 < last  # depth 0.1 near the start, 0.9 near the end
    # from an offset: that part of the text, not its start (which perplexity reads)
    ids = [ord(ch) for ch in "Qq. " * 100 + "Zz. " * 100]
    prompts, _, _ = needle.prompts(FakeTokenizer(), ids, 400, depths, seed=3, offset=400)
    assert all("Zz. " * 10 in FakeTokenizer().decode(p) and "Q" not in FakeTokenizer().decode(p)
               for p in prompts)


def test_summary_of_a_result_against_dense_by_hand():
    """summary.summarize on made-up results: Δppl is the result's perplexity against dense's (a
    higher perplexity, a positive Δ), needle hits tallied by length and by phrasing, the device
    ratio the result's bytes over dense's."""
    from kcache_ops.eval import summary

    def result(ppl_short, ppl_long, correct, device_bytes):
        costs = {"host_rows": 0.0, "host_bytes_per_step": 0.0,
                 "device_bytes_per_token": device_bytes,
                 "device_bytes_per_token_bf16": device_bytes / 2}
        return {"short": {"perplexity": {"ppl": ppl_short}},
                "long": {"perplexity": {"ppl": ppl_long}},
                "needle-8000": {"correct": correct[1], "phrasing": ["vault", "pass key"]},
                "needle-1024": {"correct": correct[0], "phrasing": ["vault", "pass key"]},
                "costs": costs}

    dense = result(10.0, 10.0, ([True, True], [True, True]), 400.0)
    got = summary.summarize(result(11.0, 12.0, ([True, False], [False, False]), 100.0), dense)
    assert got["dppl"] == pytest.approx({"short": 10.0, "long": 20.0})
    assert got["ppl"] == {"short": 11.0, "long": 12.0}
    assert got["needle_by_length"] == {"1024": 1, "8000": 0}
    assert got["needle_by_phrasing"] == {"vault": 1, "pass key": 0}
    assert (got["needle"], got["needle_total"]) == (1, 4)
    assert got["device_ratio"] == got["device_ratio_bf16"] == pytest.approx(0.25)


def fake_result(topn, dppl_short, dppl_long, needle_by_length, device_ratio, tail="none"):
    """A result with only what the recommendation reads (its summary and config)."""
    return {"config": Config.kcache(topn=topn, tail=tail).to_dict() if topn else
            Config.dense().to_dict(),
            "summary": {"host_rows": topn, "host_bytes_per_step": 1000.0 * topn,
                        "device_bytes_per_token": 100.0 * device_ratio,
                        "device_ratio": device_ratio, "device_ratio_bf16": device_ratio,
                        "dppl": {"short": dppl_short, "long": dppl_long},
                        "needle": sum(needle_by_length.values()), "needle_total": 6,
                        "needle_by_length": needle_by_length, "needle_by_phrasing": {}}}


def test_recommendation_rule():
    dense = fake_result(0, 0.0, 0.0, {"1024": 3, "8000": 2}, 1.0)
    paper = fake_result(64, 12.0, 18.0, {"1024": 3, "8000": 1}, 0.5)
    int2_64 = fake_result(64, 0.1, -0.2, {"1024": 3, "8000": 2}, 0.58, "int2")
    int2_32 = fake_result(32, -0.25, 0.2, {"1024": 3, "8000": 3}, 0.58, "int2")
    int2_8 = fake_result(8, 0.4, 0.6, {"1024": 3, "8000": 2}, 0.58, "int2")
    n256 = fake_result(256, 0.1, 0.1, {"1024": 3, "8000": 2}, 0.5)
    int4_8 = fake_result(8, 0.0, 0.1, {"1024": 3, "8000": 2}, 0.64, "int4")
    rec = recommend.recommend([dense, paper, int2_64, int2_32, int2_8, int4_8, n256])
    assert rec["meets_all"] and rec["config"] == int2_32["config"] and not rec["misses"]
    assert rec["numbers"]["host_rows"] == 32
    small = rec["small_budget"]
    # the verdict is on the configuration within the memory target: 0.6% > 0.5% at long
    assert small["config"] == int2_8["config"] and not small["met"] and small["fits_memory"]
    over = small["over_memory"]  # the 4-bit copy at 0.64x dense comes closer
    assert over["config"] == int4_8["config"] and over["within"] and not over["fits_memory"]
    assert recommend.small_budget([dense, int2_8])["over_memory"] is None
    # over the memory target at the same worst |Δ ppl| (0.6 either way) is no closer: unnamed
    int4_tie = fake_result(8, -0.6, 0.1, {"1024": 3, "8000": 2}, 0.64, "int4")
    assert recommend.small_budget([dense, int2_8, int4_tie])["over_memory"] is None
    # within 0.5% at both contexts (0.45% at long, which misses the 0.3% of the full targets)
    int2_8_within = fake_result(8, 0.4, 0.45, {"1024": 3, "8000": 2}, 0.58, "int2")
    assert recommend.small_budget([dense, int2_8_within])["met"]
    # none at <= 8 rows fits the memory target: within 0.5% is not meeting the target
    alone = recommend.small_budget([dense, int4_8])
    assert alone["within"] and not alone["fits_memory"] and not alone["met"]
    report_line = "\n".join(eval_report.recommendation({**rec, "small_budget": alone}))
    assert "fits the memory target), Δ ppl" in report_line and "MISSES it" in report_line
    rec = recommend.recommend([dense, paper, int2_8, n256])
    assert not rec["meets_all"] and rec["config"] == n256["config"]
    assert rec["misses"] == [recommend.TARGETS["host_rows"]]
    # fewer targets missed comes before the perplexity excess: one missed by 0.2 points (long)
    # beats two missed (host rows, needle) with none
    long_off = fake_result(64, 0.1, 0.5, {"1024": 3, "8000": 2}, 0.58, "int2")
    n128 = fake_result(128, 0.1, 0.1, {"1024": 3, "8000": 1}, 0.5)
    rec = recommend.recommend([dense, long_off, n128])
    assert rec["config"] == long_off["config"]
    assert rec["misses"] == [recommend.TARGETS["dppl_long"]]
    # each target holds at its bound: 64 rows, 0.6x dense, |Δ ppl| 0.3% at either sign
    at_bounds = fake_result(64, 0.3, -0.3, {"1024": 3, "8000": 2}, 0.6, "int2")
    assert all(recommend.assess(at_bounds["summary"], dense["summary"]).values())
    assert recommend.recommend([dense]) is None


def test_suite_on_the_default_model(tmp_path):
    """The whole command at --quick sizes, one KCache configuration with N above every length:
    it must equal dense on every measure, and the report must be written. On the CPU in float32
    where a GPU is there too (the command's default there is bfloat16 on CUDA, where dense and
    KCache attention, two kernels, round apart)."""
    parser = eval_parser()
    eval_cli.run(parser.parse_args(["--quick", "--topn", "1024", "--device", "cpu", "--out",
                                    str(tmp_path)]))
    data = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    dense, kc = data["results"]
    assert kc["short"]["agreement"]["match_rate"] == 1.0
    for context in ("short", "long"):
        assert math.isclose(kc[context]["perplexity"]["ppl"], dense[context]["perplexity"]["ppl"],
                            rel_tol=1e-4)
        assert kc["summary"]["dppl"][context] == pytest.approx(0.0, abs=1e-2)
    assert dense["summary"]["host_rows"] == 0 and dense["summary"]["host_bytes_per_step"] == 0
    # N is above every length: each step reads every valid row, measured over the long group
    s = data["settings"]
    steps = range(s["long_steps"])
    assert kc["summary"]["host_rows"] == sum(s["long_prefill"] + t + 1 for t in steps) / len(steps)
    assert kc["summary"]["host_bytes_per_step"] > 0
    assert kc["summary"]["device_ratio"] == pytest.approx(0.5)  # K only, V in host RAM
    assert kc["summary"]["device_ratio_bf16"] == pytest.approx(0.5)
    assert sum(kc["summary"]["needle_by_phrasing"].values()) == kc["summary"]["needle"]
    assert set(dense["summary"]["needle_by_phrasing"]) == set(needle.PHRASINGS)
    assert data["recommended"]["config"] == kc["config"]
    assert data["planned"] == [kc["config"]]
    needles = [k for k in dense if k.startswith("needle-")]
    assert needles and all(kc[k]["answers"] == dense[k]["answers"] for k in needles)
    assert any(any(dense[k]["correct"]) for k in needles)  # the model does find the key
    assert all(m == pytest.approx(1.0, abs=1e-5) for m in kc["mass"]["long"])
    text = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert "kcache N=1024" in text and "Recommended setting" in text
    assert all((tmp_path / f"eval_{p}.png").is_file() for p in ("accuracy", "budget", "mass"))


@pytest.mark.parametrize("preset", [[], ["--quick"], ["--gpu-sizes"]])
def test_each_preset_fits_the_essay_text(preset):
    """Every window and haystack of each size preset comes from the essay text with the default
    model's tokenizer (--gpu-sizes asked for 169,824 of its 154,028 tokens: it stopped at once)."""
    from kcache_ops.model.gguf_loader import open_gguf
    from kcache_ops.model.load import default_model_path
    from kcache_ops.model.tokenizer import Tokenizer
    parser = eval_parser()
    s = eval_cli.settings(parser.parse_args(preset))
    groups = build_groups(Tokenizer.from_gguf(open_gguf(default_model_path())), s)
    assert [len(g["prompts"]) for g in groups[:2]] == [s.ppl_rows + s.agree_rows, s.long_rows]
    if preset == ["--gpu-sizes"]:  # the sizes its help states
        assert (s.ppl_rows, s.prefill, s.steps) == (16, 4096, 512)
        assert (s.long_rows, s.long_prefill, s.long_steps) == (8, 6144, 256)


def test_the_memory_target_holds_in_bfloat16_too():
    """A copy that fits 0.6x dense against float32 K (the CPU run) but not against bfloat16 K (a
    GPU) misses the device-memory target."""
    dense = fake_result(0, 0.0, 0.0, {"1024": 3}, 1.0)
    light = fake_result(64, 0.1, 0.1, {"1024": 3}, 0.57, tail="int4")
    light["summary"]["device_ratio_bf16"] = 0.64
    assert recommend.assess(light["summary"], dense["summary"])["device_ratio"] is False
    light["summary"]["device_ratio_bf16"] = 0.58
    assert recommend.assess(light["summary"], dense["summary"])["device_ratio"] is True


def test_options_summary_compares_each_option_with_the_configuration_without_it():
    """The report judges a tail, hot rows and top_p each against the same configuration without
    that option; where that did not run, a tail is shown against the paper-literal N=64 in its
    configuration's line but not counted (that differs in more than the tail)."""
    from kcache_ops.eval.report import options_summary

    def result(options, short, long, rows=64.0):
        def ppl(dppl, spread):  # dense's ppl 10 in each of two windows, this one's around it
            value = 10 * (1 + dppl / 100)
            return {"perplexity": {"ppl": value, "ppl_rows": [value - spread, value + spread]}}
        return {"config": Config("kcache", options).to_dict(), "mass": {},
                "short": ppl(short, 0.0), "long": ppl(long, 0.01 * rows),
                "summary": {"dppl": {"short": short, "long": long}, "needle": 3, "needle_total": 4,
                            "host_rows": rows, "device_ratio": 0.5}}

    hot = replace(PAPER_LITERAL, tail="int2", sinks=4, window=60)
    results = [{"summary": {}}, result(PAPER_LITERAL, 9.0, 9.0),
               result(replace(PAPER_LITERAL, sinks=4, window=60), 5.0, 1.0),
               result(replace(PAPER_LITERAL, tail="int2"), 0.4, 0.1),
               result(hot, 0.2, 0.2), result(replace(hot, top_p=0.9), 0.3, 0.1, rows=40.5)]
    text = "\n".join(options_summary(results))
    assert "* **hot rows**, against the same configuration without it: closer to dense in 2 of " \
           "2 at the short context (2 beyond twice the standard error), 1 of 2 at the long " \
           "context (1 beyond twice the standard error)." in text
    assert "* **tail=int2**, against the same configuration without it: closer to dense in 2 of " \
           "2 at the short context" in text  # not the top_p one: no run without its tail
    assert "its tail against kcache N=64 (paper-literal) (the same without its tail did not " \
           "run; this one differs in more, and is not counted above)" in text
    # top_p's long-context gain (-0.10% ±2.35) is within the noise of its windows
    assert "* **top_p**" in text and "0 of 1 at the short context (0 beyond twice the standard " \
        "error), 1 of 1 at the long context (0 beyond twice the standard error)." in text
    assert "40.5 host rows" in text
    # the change from the paper-literal run (ppl 10.9) to its hot rows (10.5) over their windows
    assert "its hot rows against kcache N=64 (paper-literal) (Δ ppl +9.00% / +9.00%, needle 3/4, " \
           "64.0 host rows): closer to dense at the short context and the long context; " \
           "perplexity -3.67% ±0.00 / -7.34% ±0.43 from it." in text


def test_report_only_of_a_folder_without_results(tmp_path, capsys):
    """`eval --report-only --out DIR`: a DIR that does not exist is an error line, and is not made
    (a mistyped --out made it and wrote a report of nothing, exit 0); one without results gets
    the report of what has not run, and a line says it held no results."""
    out = tmp_path / "new" / "folder"
    assert main(["eval", "--report-only", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: --out {out} does not exist: --report-only rewrites "
                                       f"the report in the folder an eval or bench run wrote\n")
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)
    assert main(["eval", "--report-only", "--out", str(out)]) == 0
    text = (out / "REPORT.md").read_text(encoding="utf-8")
    assert "Not run yet: `python -m kcache_ops eval`." in text
    assert "has not run yet; on a GPU:" in text
    assert f"# {out} holds no results (no .json file): the report says that nothing has run; " \
           "--out names the folder an eval or bench run wrote" in capsys.readouterr().err


def test_report_only_quick_reads_the_smoke_folder(tmp_path, capsys, monkeypatch):
    """`eval --report-only --quick` rewrites the report of the quick run's folder (the smoke
    folder), not the committed results'."""
    from kcache_ops import results as results_module
    smoke, committed = tmp_path / "smoke", tmp_path / "results"
    monkeypatch.setattr(results_module, "SMOKE_DIR", str(smoke))
    monkeypatch.setattr(results_module, "RESULTS_DIR", str(committed))
    assert main(["eval", "--report-only", "--quick"]) == 2
    assert capsys.readouterr().err.startswith(f"error: the results folder {smoke} does not exist")


def test_flags_reach_the_settings_and_the_grid():
    """--answer-steps sets the needle answers' length; --group-select adds group selection to
    the grid of the --topn given, beside per-head selection."""
    parser = eval_parser()
    args = parser.parse_args(["--answer-steps", "5", "--topn", "8", "--group-select"])
    assert eval_cli.settings(args).answer_steps == 5
    assert [(c.options.topn, c.options.group_select) for c in eval_cli.configs(args)] == [
        (8, False), (8, True)]


def test_every_size_flag_wins_over_its_preset():
    """Each size flag sets its own size, with or without a preset; the rest are the preset's."""
    parser = eval_parser()
    sizes = {"ppl_rows": 3, "agree_rows": 4, "prefill": 50, "steps": 6, "long_rows": 7,
             "long_prefill": 80, "long_steps": 9, "answer_steps": 10}
    flags = [x for name, value in sizes.items() for x in (f"--{name.replace('_', '-')}",
                                                          str(value))]
    for preset in ([], ["--quick"], ["--gpu-sizes"]):
        s = eval_cli.settings(parser.parse_args([*preset, *flags, "--needle-lengths", "30,40"]))
        assert {name: getattr(s, name) for name in sizes} == sizes, preset
        assert s.needle_lengths == (30, 40), preset
        assert s.needle_depths == eval_cli.settings(parser.parse_args(preset)).needle_depths


@pytest.mark.parametrize("flags, grid", [
    (["--topn", "8,16"], [Config.kcache(topn=8), Config.kcache(topn=16)]),
    (["--tails", "int2"], [Config.kcache(topn=64, tail="int2")]),
    (["--group-select"], product_grid((64,), ("none",), (False, True))),
    (["--dense-layers", "0,2"], product_grid((64,), ("none",), (False,), ((), (0, 2)))),
    (["--quick"], quick_grid()),
    (["--quick", "--topn", "8"], [Config.kcache(topn=8)]),
])
def test_any_product_flag_alone_runs_the_product(flags, grid):
    """--topn alone runs the product at its Ns; --tails, --group-select or --dense-layers alone
    at N = 64 (each configuration without and with the dense layers), not the curated grid;
    --quick its own grid unless a product flag is given."""
    parser = eval_parser()
    assert eval_cli.configs(parser.parse_args(flags)) == grid


def test_report_only_refuses_the_options_of_a_measurement(tmp_path, capsys):
    """--report-only measures nothing: a measurement's option given with it is an error line
    naming it (it was silently ignored), and no folder is made."""
    out = tmp_path / "out"
    assert main(["eval", "--report-only", "--out", str(out), "--topn", "8", "--group-select",
                 "--engine", "transformers"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: --report-only rewrites the report from the JSON in --out and measures nothing; "
        "--engine, --topn, --group-select would have no effect")
    assert not out.exists()


def mass_result(marker, **options):
    """A result of the KCache configuration of ``options`` whose 'long' mass is [marker]."""
    return {"config": Config("kcache", replace(PAPER_LITERAL, **options)).to_dict(),
            "mass": {"long": [marker]}}


def test_mass_curves_leave_out_hot_rows():
    """The mass plot's curve of a selection comes from a configuration without hot rows (with
    them KCache records only the cold rows' mass), a top_p cut or dense layers, whatever the
    grid's order."""
    from kcache_ops.eval import mass
    results = [mass_result(0.1, topn=8, sinks=4, window=60),
               mass_result(0.2, topn=8, dense_layers=(0,)), mass_result(0.25, topn=8, top_p=0.9),
               mass_result(0.3, topn=8, tail="int2"), mass_result(0.4, topn=8),
               mass_result(0.45, topn=16, tail="int4"),
               mass_result(0.5, topn=64, group_select=True, tail="int2", sinks=4, window=60)]
    curves = mass.selections(results)
    # N=8: the run without a tail, though the int2 one came first (a tail changes the later
    # layers' queries, so their top N); N=16: only a tail ran, and its label says so
    assert {k: r["mass"] for k, r in curves.items()} == {(8, False): {"long": [0.4]},
                                                         (16, False): {"long": [0.45]}}
    assert [mass.label(k, r) for k, r in sorted(curves.items())] == ["N=8", "N=16, tail int4"]


def test_mass_curves_apart_by_group_select():
    """Group selection is a curve of its own ("group" in its label), a window without sinks is
    hot rows too (left out), and of two runs of one selection without a tail the first is kept."""
    from kcache_ops.eval import mass
    marks = torch.rand(4).tolist()
    results = [mass_result(marks[0], topn=8, window=torch.randint(1, 65, ()).item()),
               mass_result(marks[1], topn=8), mass_result(marks[2], topn=8, renormalize=False),
               mass_result(marks[3], topn=8, group_select=True)]
    curves = mass.selections(results)
    assert {k: r["mass"]["long"] for k, r in curves.items()} == {(8, False): [marks[1]],
                                                                 (8, True): [marks[3]]}
    assert [mass.label(k, r) for k, r in sorted(curves.items())] == ["N=8", "N=8 group"]


def test_quick_grid_and_product_grid_defaults():
    """--quick runs N=16 without and with the 2-bit tail; the default grid has the mean tail; a
    product runs each configuration once (--tails int2,int2 as one int2), without a tail unless
    asked."""
    assert quick_grid() == [Config.kcache(topn=16), Config.kcache(topn=16, tail="int2")]
    assert replace(PAPER_LITERAL, tail="mean") in [c.options for c in default_grid()]
    assert product_grid((64, 8), ("int2", "int2")) == [Config.kcache(tail="int2"),
                                                       Config.kcache(topn=8, tail="int2")]
    assert product_grid((8,)) == [Config.kcache(topn=8)]


def test_delta_se_and_the_report_noise():
    """Δ ppl's standard error from the windows paired with dense's, in the table and in the
    recommendation's verdict on the target; the agreement column lists each prompt's first
    mismatch."""
    from kcache_ops.eval.report import eval_section, recommendation
    dense_ppl = {"ppl": 10.0, "ppl_rows": [10.0, 10.0, 10.0]}
    ppl = {"ppl": 10.01, "ppl_rows": [10.0, 10.1, 9.93]}  # per window 0, +1, -0.7 %
    se = perplexity.delta_se(ppl, dense_ppl)
    assert abs(se - 0.4933) < 1e-3  # sample std 0.854, over sqrt 3
    assert perplexity.delta_se({"ppl_rows": [1.0]}, {"ppl_rows": [1.0]}) is None
    assert perplexity.delta_se({"ppl_rows": [1.0, 2.0]}, {"ppl_rows": [1.0] * 3}) is None
    # Student's t at 97.5% for 2, 5, 11, 15, 30, 31, 49 and 999 degrees of freedom
    for windows, t in ((3, 4.303), (6, 2.571), (12, 2.201), (16, 2.131), (31, 2.042),
                       (32, 2.0395), (50, 2.0096), (1000, 1.9623)):
        assert abs(perplexity.t_975(windows) - t) < 2e-4, (windows, perplexity.t_975(windows))
    dense, kc = (fake_result(0, 0.0, 0.0, {"1024": 3}, 1.0),
                 fake_result(64, 0.1, 0.1, {"1024": 3}, 0.5, "int2"))
    for r, p, agreement in ((dense, dense_ppl, None),
                            (kc, ppl, {"match_rate": 0.99, "first_divergence_rows": [47, 256]})):
        r.update(short={"perplexity": p, **({"agreement": agreement} if agreement else {})},
                 long={"perplexity": p}, seconds=1.0)
        r["summary"].update(ppl={"short": p["ppl"], "long": p["ppl"]}, needle_total=3,
                            needle_by_phrasing={"pass key": 3})
    rec = recommend.recommend([dense, kc])
    text = "\n".join(recommendation(rec, [dense, kc]))
    assert "meets every target" in text and "±0.49 / ±0.49 points" in text
    assert "the far end of its 95% interval (Student's t over the windows) is 2.22% / 2.22%" in text
    assert "so the 0.3% target is not established beyond the noise" in text
    data = {"settings": {"ppl_rows": 3, "prefill": 8, "steps": 256, "long_rows": 3,
                         "long_prefill": 16, "long_steps": 4, "agree_rows": 2,
                         "needle_phrasings": ["pass key"], "needle_depths": [0.5],
                         "needle_lengths": [1024], "answer_steps": 4},
            "machine": {"cpu": "c", "cores": 2, "torch": "t", "device": "cpu",
                        "model": "/models/my-model/ via transformers",
                        "model_name": "my-model via transformers"},
            "command": "eval", "results": [dense, kc], "planned": [],
            "recommended": rec}
    lines = eval_section(data)
    assert lines[0] == "## Accuracy (my-model via transformers)"  # not always SmolLM2
    table = "\n".join(lines)
    assert "| +0.10% ±0.49 | +0.10% ±0.49 |" in table and "99.0% (47, never)" in table
    assert any(line.startswith("* needle: a random 5-digit key") for line in lines)
    # tight at the short context (+0.1% in every window), wide at the long: the long context's
    # noise alone leaves the target not established
    kc["short"]["perplexity"] = {"ppl": 10.01, "ppl_rows": [10.01] * 3}
    text = "\n".join(recommendation(rec, [dense, kc]))
    assert "±0.00 / ±0.49 points" in text and "is 0.10% / 2.22%" in text
    assert "so the 0.3% target is not established beyond the noise" in text


@pytest.mark.parametrize("head_dim, flags, message", [
    (64, ["--dense-layers", "7"], "dense_layers [7] out of range"),
    (16, [], "KCache: head_dim must be 64 or 128, got 16")])
def test_cli_options_the_model_cannot_take_fail_before_any_run(tmp_path, capsys, head_dim, flags,
                                                               message):
    """--dense-layers past the model's layers, or a head dim the ops do not take, is an error
    line before dense and the first configuration run (it came after them), and nothing is
    written."""
    from model_helpers import save_tiny_hf, save_tiny_tokenizer
    save_tiny_hf(tmp_path, num_key_value_heads=2, head_dim=head_dim)  # 2 layers
    save_tiny_tokenizer(tmp_path, 96)
    out = tmp_path / "out"
    argv = ["eval", "--quick", "--model", str(tmp_path), *flags, "--out", str(out)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
    assert not (out / "eval.json").exists()


def test_report_only_refuses_json_it_did_not_write(tmp_path, capsys):
    """An eval.json that is not JSON, or lacks what the report reads, is one error line naming
    the file or the folder, not a traceback."""
    for text, message in (("{", f"{tmp_path / 'eval.json'} is not valid JSON"),
                          ('{"results": [1, 2]}', f"{tmp_path / 'eval.json'} lacks settings, "
                                                  "machine, command: it is not a file this "
                                                  "version of kcache_ops writes")):
        (tmp_path / "eval.json").write_text(text, encoding="utf-8")
        assert main(["eval", "--report-only", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and "Traceback" not in err


def test_out_that_cannot_be_written_fails_before_any_run(tmp_path, capsys):
    """A --out that cannot be made (under a file) is refused before any model loads (it was
    found only when the results were saved, after the whole dense run); a new one is made."""
    (tmp_path / "file").write_text("", encoding="utf-8")
    bad = tmp_path / "file" / "results"
    for argv in (["eval", "--quick"], ["bench", "--small"]):
        assert main([*argv, "--out", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {bad} cannot be written to (Not a directory)")
    made = tmp_path / "new" / "folder"
    from kcache_ops.results import prepare_out_dir
    assert prepare_out_dir(str(made), True) == str(made) and made.is_dir()


def test_a_folder_no_file_can_be_made_in_is_refused(monkeypatch):
    """A folder that is there but takes no file (/proc here, as a read-only mount would) is
    refused too, not only one that cannot be made; without --out the message names the results
    folder, not a flag the user never gave."""
    from kcache_ops import results
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this machine")
    with pytest.raises(ValueError, match=r"^--out /proc cannot be written to \(.+\); choose "
                                         r"another folder with --out$"):
        results.prepare_out_dir("/proc", True)
    monkeypatch.setattr(results, "SMOKE_DIR", "/proc")
    with pytest.raises(ValueError, match=r"^the results folder /proc cannot be written to"):
        results.prepare_out_dir(None, True)


def test_out_that_is_a_file_fails_before_any_run(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("", encoding="utf-8")
    for argv in (["eval", "--quick"], ["bench", "--small"]):
        assert main([*argv, "--out", str(taken)]) == 2
        assert capsys.readouterr().err == f"error: --out must be a folder (made where missing), " \
                                          f"got the file {taken}\n"


@pytest.mark.parametrize("engine", ["kcache_ops", "transformers"])
def test_the_run_names_its_model_and_prints_the_recommendation(tmp_path, monkeypatch, capsys,
                                                               engine):
    """eval.json's machine names the model by its folder (given with a trailing slash) and
    the engine that ran it, and the last lines say whether the recommended setting meets every
    target or what the closest one misses (the model and the suite stubbed: the command's own
    part)."""
    if engine == "transformers":
        loader = pytest.importorskip("kcache_ops.integrations.transformers_engine")
        name = "load_transformers_model"
    else:
        loader, name = eval_cli, "load_model"
    model = SimpleNamespace(config=TINY, device=torch.device("cpu"), dtype=torch.float32)
    monkeypatch.setattr(loader, name, lambda *args: (model, None))
    monkeypatch.setattr(eval_cli, "evaluate", lambda *args: args[-1]([]) or [])
    saved = []
    monkeypatch.setattr(eval_cli, "save_json", lambda path, s, info, *rest: saved.append(info))
    recommended = {}  # what recommend returns, set before each run
    monkeypatch.setattr(eval_cli.recommend, "recommend", lambda results: recommended)
    parser = eval_parser()
    folder = tmp_path / "my-model"
    args = ["--model", f"{folder}/", "--engine", engine, "--topn", "8", "--out", str(tmp_path)]
    for rec, verdict in (
            ({"name": "kcache N=8", "meets_all": True}, "kcache N=8 (meets every target)"),
            ({"name": "kcache N=16", "meets_all": False, "misses": ["needle", "ppl"]},
             "kcache N=16 (no configuration meets every target; this one is the closest, "
             "missing: needle; ppl)")):
        recommended.clear()
        recommended.update(rec)
        eval_cli.run(parser.parse_args(args))
        assert f"# recommended: {verdict}\n" in capsys.readouterr().out
    via = " via transformers" if engine == "transformers" else ""
    assert {(info["model"], info["model_name"]) for info in saved} == {
        (f"{folder}/{via}", f"my-model{via}")}
