"""`python -m kcache_ops demo` end to end at a tiny size (a random Llama and tokenizer written by
the test, a stand-in essay text), so the entry point cannot rot."""
import argparse
from types import SimpleNamespace

import pytest
import torch

from kcache_ops.__main__ import main
from kcache_ops.caches import KCacheOptions
from kcache_ops.cli import demo
from model_helpers import save_tiny_hf, save_tiny_tokenizer

# a model whose positions hold the demo's prompt (~270 tokens)
LONG = dict(hidden_size=128, num_attention_heads=2, max_position_embeddings=1024)


def write_model(folder, monkeypatch, **config):
    """A tiny Llama (one KV head of dim 64, as the kcache ops need, and ``config``) and its
    tokenizer in ``folder``; the demo's essay text a short stand-in."""
    save_tiny_hf(folder, num_key_value_heads=1, head_dim=64, **config)
    save_tiny_tokenizer(folder, 96)
    monkeypatch.setattr(demo, "essays_text", lambda: "Start small. Then grow it. " * 40)


def test_demo_runs_both_backends(tmp_path, monkeypatch, capsys):
    write_model(tmp_path, monkeypatch, **LONG)
    assert main(["demo", "--model", str(tmp_path), "--prompt-tokens", "150", "--new-tokens", "5",
                 "--topn", "4", "--dense-layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "kcache: topn=4, group_select=False, renormalize=True, dense_layers=(1,)" in out
    assert "--- dense ---" in out and "--- kcache ---" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("dense ", "kcache "))}
    assert float(rows["kcache"][4]) > 0 and float(rows["dense"][4]) == 0  # host MiB
    assert float(rows["kcache"][2]) > 0  # decode tok/s
    assert "outputs identical" in out or "outputs first differ at new token" in out
    # one new token, the prefill's: no decode step, so no rate (it said 0.00)
    assert main(["demo", "--model", str(tmp_path), "--prompt-tokens", "150", "--new-tokens", "1",
                 "--topn", "4"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("dense ", "kcache "))]
    assert [row[2] for row in rows] == ["-", "-"]


def test_demo_passes_its_flags_on_and_reports_each_run(tmp_path, monkeypatch, capsys):
    """--depth places the pass key, --no-chat leaves out the chat template, the kcache run gets
    the options the flags give (dense none), and each row says whether its own text holds the
    pass key (the dense run's here, not the kcache run's), with its own prefill seconds and
    decode rate; the last line says where the two runs' tokens first differ, and how many each
    has."""
    import dataclasses
    write_model(tmp_path, monkeypatch, **LONG)
    seen = {}
    build_prompt, generate_with_progress = demo.build_prompt, demo.generate_with_progress

    def build(tokenizer, n_tokens, depth, chat):
        seen["depth"], seen["chat"] = depth, chat
        return build_prompt(tokenizer, n_tokens, depth, chat)

    def run(model, tokenizer, prompt, backend, options, new_tokens):
        seen[backend] = options
        result = generate_with_progress(model, tokenizer, prompt, backend, options, new_tokens)
        dense = backend == "dense"
        text = f"the key is {demo.PASSKEY}" if dense else "no idea"
        return dataclasses.replace(result, texts=[text], tokens=[[7, 8, 9] if dense else [7, 5]],
                                   prefill_s=12.5 if dense else 3.25, decode_s=2.0,
                                   decode_tokens=4 if dense else 1)
    monkeypatch.setattr(demo, "build_prompt", build)
    monkeypatch.setattr(demo, "generate_with_progress", run)
    assert main(["demo", "--model", str(tmp_path), "--prompt-tokens", "150", "--new-tokens", "2",
                 "--depth", "0.25", "--no-chat", "--topn", "4", "--dense-layers", "1"]) == 0
    assert seen["depth"] == 0.25 and seen["chat"] is False and seen["dense"] is None
    assert (seen["kcache"].topn, seen["kcache"].dense_layers) == (4, (1,))
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("dense ", "kcache "))}
    assert {backend: row[-1] for backend, row in rows.items()} == {"dense": "found",
                                                                   "kcache": "missed"}
    assert [rows["dense"][1:3], rows["kcache"][1:3]] == [["12.50", "2.00"], ["3.25", "0.50"]]
    assert "outputs first differ at new token 1 (of 3 dense, 2 kcache)" in out


class WordTokenizer:
    """A word a token (each new word the next id), decoded joined by spaces; the chat template
    a -1 before the text; EOS id 0."""
    eos_ids = (0,)

    def __init__(self):
        self.words = {}

    def encode(self, text, add_special=True):
        return [self.words.setdefault(w, len(self.words) + 1) for w in text.split()]

    def decode(self, ids):
        names = {i: w for w, i in self.words.items()}
        return " ".join(names[i] for i in ids)

    def encode_prompt(self, text, chat=True):
        return [-1] * chat + self.encode(text)


def test_build_prompt_takes_the_tokens_asked_for(monkeypatch):
    """build_prompt: --prompt-tokens tokens of the essay text exactly, with the depth, pass key
    and chat asked for, also where a token is more than 8 characters (the first cut of the text
    holds too few: the whole text is encoded) and where the text has just that many; one more is
    refused, naming the most."""
    words = [f"Sentence{i:06d}." for i in range(300)]  # 15 characters a token
    monkeypatch.setattr(demo, "essays_text", lambda: " ".join(words))
    seen = []
    monkeypatch.setattr(demo.needle, "prompt", lambda tokenizer, ids, depth, key, chat:
                        seen.append((tokenizer.decode(ids), depth, key, chat)) or [1])
    tokenizer = WordTokenizer()
    for n, chat in ((100, True), (300, False)):
        assert demo.build_prompt(tokenizer, n, 0.3, chat) == [1]
        assert seen[-1] == (" ".join(words[:n]), 0.3, demo.PASSKEY, chat)
    with pytest.raises(ValueError, match=r"--prompt-tokens must be at most 300 \(.*got 301$"):
        demo.build_prompt(tokenizer, 301, 0.3, True)


def test_each_run_generates_the_new_tokens_asked_for_until_eos(monkeypatch):
    """generate_with_progress: one greedy run of the prompt, the new tokens asked for, with the
    backend and options given, stopping at the tokenizer's EOS ids."""
    calls = []
    monkeypatch.setattr(demo, "generate", lambda *args, **kwargs: calls.append((args, kwargs))
                        or "generated")
    tokenizer, options = WordTokenizer(), KCacheOptions(topn=4)
    model = SimpleNamespace(layers=torch.nn.ModuleList([torch.nn.Identity()]))  # for the bar
    assert demo.generate_with_progress(model, tokenizer, [5, 6], "kcache", options, 7) == \
        "generated"
    (args, kwargs), = calls
    assert args == (model, [[5, 6]], 7)
    assert {k: kwargs[k] for k in ("backend", "options", "eos_ids", "tokenizer")} == {
        "backend": "kcache", "options": options, "eos_ids": (0,), "tokenizer": tokenizer}
    assert kwargs.get("temperature", 0.0) == 0.0 and kwargs.get("top_k") is None


def test_demo_defaults_are_the_ones_its_help_gives():
    """2000 prompt tokens, the pass key at half depth, 48 new tokens, the chat template; --help
    gives each number."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.prompt_tokens, args.depth, args.new_tokens, args.chat) == (2000, 0.5, 48, True)
    for flag, value in (("--prompt-tokens", 2000), ("--depth", 0.5), ("--new-tokens", 48)):
        assert f"default: {value}" in parser._option_string_actions[flag].help, flag


def test_first_difference():
    """The first new token where two runs differ; where one run is a prefix of the other, where
    the shorter one ended; None for the same tokens."""
    assert demo.first_difference([1, 3, 4], [1, 2, 4]) == 1
    assert demo.first_difference([1, 2, 3], [1, 2]) == 2
    assert demo.first_difference([1, 2], [1, 2]) is None


def test_demo_refuses_options_the_model_cannot_take_before_it_runs(tmp_path, monkeypatch, capsys):
    """--dense-layers past the model's 2 layers is one error line before the dense run (it came
    after it)."""
    write_model(tmp_path, monkeypatch)
    assert main(["demo", "--model", str(tmp_path), "--prompt-tokens", "150",
                 "--dense-layers", "5"]) == 2
    captured = capsys.readouterr()
    assert "dense_layers [5] out of range" in captured.err.splitlines()[-1]
    assert "--- dense ---" not in captured.out


def test_demo_refuses_a_reuse_pool_too_small_before_the_dense_run(tmp_path, monkeypatch, capsys):
    """--reuse below a step's rows (N x the GQA group) is one error line before the dense run
    (the check needs the capacity, so it came when the kcache run built its cache, after the
    whole dense run)."""
    write_model(tmp_path, monkeypatch, max_position_embeddings=1024)
    ran, run = [], demo.generate_with_progress
    monkeypatch.setattr(demo, "generate_with_progress",
                        lambda *args: ran.append(args[3]) or run(*args))
    assert main(["demo", "--model", str(tmp_path), "--prompt-tokens", "150", "--new-tokens", "3",
                 "--topn", "4", "--reuse", "2"]) == 2
    assert "reuse must hold the rows of a whole step" in capsys.readouterr().err.splitlines()[-1]
    assert ran == []


def test_demo_refuses_more_prompt_tokens_than_the_text_has(tmp_path, monkeypatch, capsys):
    """--prompt-tokens past the essay text's tokens is one error line naming the most it can be
    (the prompt was cut to the text without a word, and a 300K request ran a 154K prefill)."""
    write_model(tmp_path, monkeypatch)
    ran = []
    monkeypatch.setattr(demo, "generate_with_progress", lambda *args: ran.append(args[3]))
    assert main(["demo", "--model", str(tmp_path), "--prompt-tokens", "100000"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "--prompt-tokens must be at most" in err and "got 100000" in err
    assert ran == []


def test_a_flag_is_not_taken_by_its_prefix(capsys):
    """`demo --prompt x` is an unknown flag, not --prompt-tokens x (whose error named a flag the
    user never typed)."""
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--prompt", "hello"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --prompt hello" in capsys.readouterr().err
