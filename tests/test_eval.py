"""The accuracy evaluation's machinery at small sizes: KCache with N >= the sequence length equals
dense through the decode path (perplexity, agreement), the measures' arithmetic, and a short run of
the whole suite on the real default model (needle included)."""
import argparse
import json
import math

import pytest
import torch

from kcache_ops.cli import eval as eval_cli
from kcache_ops.eval import agreement, needle, perplexity
from kcache_ops.eval.runner import Config, fork, grid, prefill_snapshot, step_through
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
                                    Config.kcache(topn=1024, dense_layers=(0, 1))],
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


def test_needle_answer_and_score():
    assert needle.answer("The pass key is 71432.") == "71432"
    assert needle.answer("no idea") == ""

    class Tok:
        def decode(self, ids):
            return "".join(map(str, ids))
    s = needle.score(Tok(), [[7, 1, 4, 3, 2], [1, 2]], ["71432", "99"])
    assert s["correct"] == [True, False] and s["accuracy"] == 0.5


def test_grid_order_and_size():
    configs = grid((16, 32, 64, 128, 256), dense_layers=((), (0, 1)))
    assert len(configs) == 40 and len(set(configs)) == 40
    assert configs[0] == Config.kcache(topn=64)
    assert configs[-1].options.group_select and not configs[-1].options.renormalize and \
        configs[-1].options.dense_layers


def test_suite_on_the_default_model(tmp_path):
    """The whole command at --quick sizes, one KCache configuration with N above every length:
    it must equal dense on every measure, and the report must be written."""
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    eval_cli.run(parser.parse_args(["--quick", "--topn", "1024", "--defaults-only", "--out",
                                    str(tmp_path)]))
    data = json.loads((tmp_path / "eval.json").read_text())
    dense, kc = data["results"]
    assert kc["long"]["agreement"]["match_rate"] == 1.0
    assert math.isclose(kc["long"]["perplexity"]["ppl"], dense["long"]["perplexity"]["ppl"],
                        rel_tol=1e-4)
    needles = [k for k in dense if k.startswith("needle-")]
    assert needles and all(kc[k]["answers"] == dense[k]["answers"] for k in needles)
    assert any(any(dense[k]["correct"]) for k in needles)  # the model does find the key
    assert all(m == pytest.approx(1.0, abs=1e-5) for m in kc["mass"]["long"])
    text = (tmp_path / "REPORT.md").read_text()
    assert "kcache N=1024" in text and (tmp_path / "eval_accuracy.png").is_file()
