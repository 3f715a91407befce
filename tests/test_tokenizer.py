"""The tokenizer on its own: GGUF token types (CONTROL tokens dropped from decoded text,
USER_DEFINED ones kept as text), and chat templates rendered as transformers renders them, with
clear errors naming the template's file when jinja2 rejects one."""
import json
import re
from datetime import datetime

import pytest
import tokenizers
import torch

gguf = pytest.importorskip("gguf")  # requirements.txt has it; a lent GPU machine may not

from kcache_ops.model import CheckpointError, Tokenizer
from kcache_ops.model.gguf_loader import open_gguf
from model_helpers import save_tiny_tokenizer


def write_tokenizer_gguf(path, tokens, types, chat_template=None):
    """A GGUF file holding only a byte-level BPE tokenizer over ``tokens`` of GGUF token
    ``types``, with the one merge "a b" (``tokens`` hold "a", "b" and "ab"), EOS 0, as
    llama.cpp's converter writes one. Returns the path."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["a b"])
    w.add_eos_token_id(0)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def folder_with_template(path, template):
    """A Hugging Face tokenizer folder whose tokenizer_config.json holds ``template``."""
    save_tiny_tokenizer(path, 96)
    config = path / "tokenizer_config.json"
    settings = json.loads(config.read_text(encoding="utf-8"))
    config.write_text(json.dumps({**settings, "chat_template": template}), encoding="utf-8")
    return path


def test_chat_template_eos_token_is_the_tokenizers(tmp_path):
    """``eos_token`` in a template is tokenizer_config.json's, as transformers renders it, where
    config.json's end ids (given first to from_folder) name another token (it was theirs: Llama
    3.1 Instruct's config.json lists <|end_of_text|> first, its tokenizer <|eot_id|>); generation
    still ends at both."""
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    folder = folder_with_template(tmp_path, "{{ messages[0]['content'] }}{{ eos_token }}")
    tok = Tokenizer.from_folder(str(folder), eos_ids=(0,))  # 0: <|endoftext|>
    theirs = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert tok.render_chat("hi") == theirs == "hi<|im_end|>"
    assert tok.eos_ids == (2, 0)


def test_gguf_user_defined_tokens_are_text(tmp_path):
    """GGUF USER_DEFINED tokens (what llama.cpp's converter writes for a Hugging Face added token
    with special=false, such as <think>) are taken whole and stay in decoded text, as llama.cpp
    renders them; CONTROL tokens are taken whole and dropped."""
    tokens = ["<|endoftext|>", "<think>", "</think>", "a", "b", "\u0120", "ab"]
    path = write_tokenizer_gguf(tmp_path / "t.gguf", tokens, [3, 4, 4, 1, 1, 1, 1])
    tok = Tokenizer.from_gguf(open_gguf(str(path)))
    ids = tok.encode("<think>ab</think> b<|endoftext|>")
    assert ids == [1, 6, 2, 5, 4, 0]
    assert tok.decode(ids) == "<think>ab</think> b"


def test_decode_takes_integers_of_any_type(tmp_path):
    """decode takes ids of any integer type (a tensor's, NumPy's), drops ids past the vocabulary
    (the rows an embedding is padded with, which sampling may draw; 10**12 overflowed in the
    tokenizers library) and refuses by name a negative id (an OverflowError) or one that is not
    an integer."""
    import numpy as np
    tokens = ["<|endoftext|>", "a", "b", "ab"]
    tok = Tokenizer.from_gguf(open_gguf(str(write_tokenizer_gguf(tmp_path / "t.gguf", tokens,
                                                                 [3, 1, 1, 1]))))
    assert tok.decode(torch.tensor([1, 2, 0])) == tok.decode(np.array([1, 2])) == "ab"
    assert tok.decode([1, 4, 10**12, 2]) == "ab"
    with pytest.raises(ValueError, match="token ids must be >= 0, got -1"):
        tok.decode([1, -1])
    for bad in (1.0, "a", True):
        with pytest.raises(TypeError, match="token ids must be integers, got"):
            tok.decode([bad])


def test_decode_past_missing_and_twice_spelled_ids(tmp_path):
    """decode keeps every id up to the largest of the vocabulary where ids are missing (a
    tokenizer.json's gap) or a text has two ids (a GGUF vocabulary's): get_vocab_size, which
    counts texts, cut them off before."""
    gap = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1, "\u0120": 3, "d": 6},
                                                     merges=[]))
    gap.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    gap.decoder = tokenizers.decoders.ByteLevel()
    tok = Tokenizer(gap, None, (), None)
    assert tok.encode("ab d") == [0, 1, 3, 6] and tok.decode([0, 1, 3, 6]) == "ab d"
    twice = write_tokenizer_gguf(tmp_path / "t.gguf", ["<|endoftext|>", "a", "b", "ab", "a", "c"],
                                 [3, 1, 1, 1, 1, 1])
    tok = Tokenizer.from_gguf(open_gguf(str(twice)))
    assert tok.encode("c") == [5] and tok.decode([5]) == "c"


def test_chat_template_file_over_tokenizer_config(tmp_path):
    """A folder with a chat template both in chat_template.jinja and in tokenizer_config.json
    renders the .jinja file's, as transformers does (it rendered the config's)."""
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    folder = folder_with_template(tmp_path, "config: {{ messages[0]['content'] }}")
    (folder / "chat_template.jinja").write_text("file: {{ messages[0]['content'] }}",
                                                encoding="utf-8")
    theirs = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_folder(str(folder)).render_chat("hi") == theirs == "file: hi"


def test_text_files_not_utf8_name_the_file(tmp_path):
    """A chat_template.jinja or special_tokens_map.json that is not UTF-8 (saved as Latin-1, say)
    is a CheckpointError naming the file (the .jinja file's was a bare UnicodeDecodeError)."""
    folder = folder_with_template(tmp_path, None)
    jinja = folder / "chat_template.jinja"
    jinja.write_bytes("{# café #}{{ messages[0]['content'] }}".encode("latin-1"))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(jinja))} is not UTF-8 text"):
        Tokenizer.from_folder(str(folder))
    jinja.unlink()
    tokens_map = folder / "special_tokens_map.json"
    tokens_map.write_bytes('{"eos_token": "é"}'.encode("latin-1"))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tokens_map))} is not valid JSON"):
        Tokenizer.from_folder(str(folder))


@pytest.mark.parametrize("settings", [
    {"bos_token": None, "eos_token": None},
    {"bos_token": "<|endoftext|>"},
    {"bos_token": None, "eos_token": None, "added_tokens_decoder": {"0": {
        "content": "<|endoftext|>", "special": True, "lstrip": False, "rstrip": False,
        "normalized": False, "single_word": False}}},
], ids=["only_in_map", "in_both", "config_with_added_tokens_decoder"])
def test_special_tokens_map(tmp_path, settings):
    """BOS and EOS of special_tokens_map.json (older saves) are taken as transformers takes them:
    where tokenizer_config.json has no added_tokens_decoder, over that file's (they were
    ignored: no BOS in the template, EOS from config.json only); else not at all."""
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    folder = folder_with_template(tmp_path, "{{ bos_token }}|{{ messages[0]['content'] }}|"
                                            "{{ eos_token }}")
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text(encoding="utf-8")), **settings}),
                      encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>"}),
        encoding="utf-8")
    theirs = AutoTokenizer.from_pretrained(str(folder))
    ours = Tokenizer.from_folder(str(folder))
    chat = [{"role": "user", "content": "hi"}]
    assert ours.render_chat("hi") == theirs.apply_chat_template(chat, tokenize=False)
    assert ours.bos_id == theirs.bos_token_id
    assert ours.eos_ids == tuple(i for i in [theirs.eos_token_id] if i is not None)


@pytest.mark.parametrize("template, problem", [
    ("{% for m in messages %}{{ m['content'] }", "does not parse: line 1: unexpected '}'"),
    ("{{ messages[0]['content'].nosuch() }}", "fails: 'str object' has no attribute 'nosuch'"),
    ("{{ raise_exception('no system message') }}", "fails: no system message"),
    ("{{ 1 // 0 }}", "fails: integer division or modulo by zero"),
    (5, "must be a string, got int"),
    ("{% for m in messages %}{% generation %}{% break %}{% endgeneration %}{% endfor %}",
     "does not compile: 'break' outside loop"),  # as transformers: no loop's in a call block
], ids=["syntax", "undefined", "raise_exception", "division", "not_a_string", "break"])
def test_chat_template_errors_name_the_file(tmp_path, template, problem):
    """A chat template jinja2 rejects gives a CheckpointError (one `error:` line in the CLI)
    naming the file it comes from and what is wrong."""
    tok = Tokenizer.from_folder(str(folder_with_template(tmp_path, template)))
    with pytest.raises(CheckpointError) as e:
        tok.render_chat("hi")
    assert str(e.value) == (f"the chat template in {tmp_path / 'tokenizer_config.json'} "
                            f"{problem}")


def test_gguf_chat_template_error_names_the_file(tmp_path):
    """The error of a GGUF file's chat template names the file and its key."""
    path = write_tokenizer_gguf(tmp_path / "t.gguf", ["<|endoftext|>", "a", "b", "ab"],
                                [3, 1, 1, 1], chat_template="{% if %}")
    where = re.escape(f"{path} (tokenizer.chat_template)")
    with pytest.raises(CheckpointError, match=f"the chat template in {where} does not parse"):
        Tokenizer.from_gguf(open_gguf(str(path))).render_chat("hi")


def test_chat_template_sees_what_transformers_passes(tmp_path):
    """A plain chat renders as transformers' apply_chat_template renders it: ``tools`` and
    ``documents`` are none (not undefined), a special token the model lacks is undefined (not
    ""), {% break %} (jinja2's loop controls) works, and so do transformers' ``tojson`` (no HTML
    escapes), ``strftime_now`` and ``{% generation %}`` (its body written, its ``set`` kept in)."""
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    template = ("{% if tools is not none %}[TOOLS]{% endif %}"
                "{% if documents is not none %}[DOCUMENTS]{% endif %}"
                "{% if eos_token is defined %}[EOS]{% endif %}"
                "{% set x = '' %}{% for m in messages %}{% generation %}{% set x = '?' %}"
                "{{ m['content'] }}{% endgeneration %}{{ x }}{% break %}!{% endfor %}"
                "{{ {'a': '<é>'} | tojson }}{{ strftime_now('%Y') }}"
                "{% if add_generation_prompt %}{{ bos_token }}{% endif %}")
    folder = folder_with_template(tmp_path, template)
    config = folder / "tokenizer_config.json"
    settings = json.loads(config.read_text(encoding="utf-8"))
    config.write_text(json.dumps({**settings, "eos_token": None}), encoding="utf-8")
    theirs = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ours = Tokenizer.from_folder(str(folder)).render_chat("hi")
    assert ours == theirs == f'hi{{"a": "<é>"}}{datetime.now():%Y}<|im_start|>'



def test_text_the_tokenizer_cannot_encode_is_a_value_error(tmp_path):
    """A WordLevel tokenizer without its unknown token meets a word it lacks: a ValueError
    naming the model (the library raised a bare Exception, a traceback from the CLI). Its folder
    loads: the probe of a panicking post-processor encodes no word."""
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    tok = tokenizers.Tokenizer(WordLevel({"hi": 0, "there": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_folder(str(tmp_path)).encode("hi there") == [0, 1]
    tokenizer = Tokenizer(tok, None, (), None)
    assert tokenizer.encode("hi there") == [0, 1]
    with pytest.raises(ValueError, match=r"Tokenizer.encode: the tokenizer \(WordLevel model\) "
                                         r"cannot encode this text: .*Missing \[UNK\] token"):
        tokenizer.encode("hi bob")


def test_a_chat_template_writing_bos_gives_one_bos():
    """A chat prompt is the rendered template encoded without the post-processor's BOS: a
    template that writes ``{{ bos_token }}`` itself (Llama 3's does) gives BOS once, not twice;
    a plain prompt still gets the post-processor's."""
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    tok = tokenizers.Tokenizer(WordLevel({"<s>": 0, "hi": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(["<s>"])
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = Tokenizer(tok, 0, (), "{{ bos_token }}{{ messages[0]['content'] }}")
    assert tokenizer.render_chat("hi") == "<s>hi"
    assert tokenizer.encode_prompt("hi", chat=True) == [0, 1]
    assert tokenizer.encode_prompt("hi", chat=False) == [0, 1]


def edit_tokenizer_json(folder, **changes):
    """Set top-level keys of ``folder``'s tokenizer.json."""
    path = folder / "tokenizer.json"
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **changes}),
                    encoding="utf-8")


def test_a_saved_truncation_or_padding_cuts_no_prompt(tmp_path):
    """A tokenizer.json saved with truncation and padding settings (some saves keep them) encodes
    a prompt whole and unpadded, as transformers' tokenizer does unless a call asks for them (it
    was cut to 8 tokens, or padded to 8 with id 0, without a word)."""
    save_tiny_tokenizer(tmp_path, 96)
    before = Tokenizer.from_folder(str(tmp_path))
    plain, short = before.encode("the needle is 4817 and the cat sat"), before.encode("hi")
    edit_tokenizer_json(tmp_path, truncation={"direction": "Right", "max_length": 8,
                                              "strategy": "LongestFirst", "stride": 0},
                        padding={"strategy": {"Fixed": 8}, "direction": "Right",
                                 "pad_to_multiple_of": None, "pad_id": 0, "pad_type_id": 0,
                                 "pad_token": "<|endoftext|>"})
    tokenizer = Tokenizer.from_folder(str(tmp_path))
    assert len(plain) > 8 and len(short) < 8
    assert tokenizer.encode("the needle is 4817 and the cat sat") == plain
    assert tokenizer.encode("hi") == short


def test_a_tokenizer_that_panics_is_refused_at_load(tmp_path):
    """A post-processor naming a special token its map lacks makes the tokenizers library panic
    at every encode (pyo3's PanicException, a BaseException an ``except Exception`` misses: a
    traceback from the CLI): loading the folder is a CheckpointError naming tokenizer.json, and
    an encode through a tokenizer built around it a ValueError."""
    save_tiny_tokenizer(tmp_path, 96)
    edit_tokenizer_json(tmp_path, post_processor={
        "type": "TemplateProcessing", "pair": [], "special_tokens": {},
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}]})
    path = tmp_path / "tokenizer.json"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: cannot read the "
                                              f"tokenizer \\(no entry found for key\\)$"):
        Tokenizer.from_folder(str(tmp_path))
    tokenizer = Tokenizer(tokenizers.Tokenizer.from_file(str(path)), None, (), None)
    with pytest.raises(ValueError, match=r"Tokenizer.encode: the tokenizer \(BPE model\) cannot "
                                         r"encode this text: no entry found for key"):
        tokenizer.encode("hi")


def test_an_eos_token_the_vocabulary_lacks_warns(tmp_path):
    """tokenizer_config.json naming an eos_token that is no token of the vocabulary warns, naming
    the file and the text (it was dropped without a word: generation ran to max_new_tokens)."""
    save_tiny_tokenizer(tmp_path, 96)
    config = tmp_path / "tokenizer_config.json"
    settings = json.loads(config.read_text(encoding="utf-8"))
    config.write_text(json.dumps({**settings, "eos_token": "</s>"}), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"tokenizer_config.json: eos_token '</s>' is not a token "
                                         r"of the vocabulary; it is left out"):
        tok = Tokenizer.from_folder(str(tmp_path), eos_ids=())
    assert tok.eos_ids == ()


def test_chat_template_lines_render_as_in_transformers(tmp_path):
    """A template laid out on lines, as shipped ones are, renders as transformers renders it: a
    block tag drops its line break (trim_blocks) and the indent before it (lstrip_blocks); the
    prompt's tokens depend on every space and line break."""
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    template = ("{% for m in messages %}\n    {% if m['role'] == 'user' %}\n"
                "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n"
                "<|im_start|>assistant\n{% endif %}")
    folder = folder_with_template(tmp_path, template)
    theirs = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ours = Tokenizer.from_folder(str(folder)).render_chat("hi")
    assert ours == theirs == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", ours


@pytest.mark.parametrize("template, attribute", [
    ("{{ messages.append(messages[0]) }}", "'append' of 'list'"),
    ("{{ ''.__class__.__mro__ }}", "'__class__' of 'str'")], ids=["mutates", "internals"])
def test_chat_template_runs_in_the_sandbox(tmp_path, template, attribute):
    """A chat template comes with a downloaded checkpoint: it runs in jinja2's immutable sandbox,
    as in transformers, so one that changes the messages or reaches Python's internals is a
    CheckpointError naming the file, not code run on the user's machine."""
    tok = Tokenizer.from_folder(str(folder_with_template(tmp_path, template)))
    with pytest.raises(CheckpointError, match=f"^the chat template in .*tokenizer_config.json "
                                              f"fails: access to attribute {attribute} object "
                                              f"is unsafe"):
        tok.render_chat("hi")


def test_template_helpers_take_their_arguments(tmp_path):
    """``tojson`` takes transformers' indent, sort_keys and separators, and ``strftime_now`` its
    format (Llama 3.1 asks for "%d %b %Y"): the arguments were not all passed on."""
    folder = folder_with_template(tmp_path, "{{ {'b': [1], 'a': 'é'} | tojson(indent=1, "
                                            "sort_keys=true, separators=[',', ':']) }}|"
                                            "{{ strftime_now('x%%y') }}")
    want = json.dumps({"b": [1], "a": "é"}, ensure_ascii=False, indent=1, sort_keys=True,
                      separators=(",", ":"))
    assert Tokenizer.from_folder(str(folder)).render_chat("hi") == want + "|x%y"


def test_a_plain_prompt_leaves_the_chat_template_out(tmp_path):
    """encode_prompt(chat=False) is the text alone (with BOS where wanted), even where the model
    has a template; chat=True renders it, and without a template is plain text too, while
    render_chat says the model has none."""
    folder = folder_with_template(tmp_path, "<|im_start|>user\n{{ messages[0]['content'] }}"
                                            "<|im_end|>\n<|im_start|>assistant\n")
    tok = Tokenizer.from_folder(str(folder))
    words = ["the", "cat", "sat", "on", "a", "mat"]
    text = " ".join(words[i] for i in torch.randint(len(words), (6,)).tolist())
    chat = tok.encode(tok.render_chat(text), add_special=False)
    assert tok.encode_prompt(text, chat=False) == tok.encode(text) != chat
    assert tok.encode_prompt(text, chat=True) == chat
    tok.chat_template = None
    assert tok.encode_prompt(text, chat=True) == tok.encode(text)
    with pytest.raises(ValueError, match="^this model has no chat template$"):
        tok.render_chat(text)


def test_named_chat_templates_take_the_default(tmp_path):
    """tokenizer_config.json's list of named templates renders the one named "default", as
    transformers does for a plain chat, wherever it is in the list."""
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    folder = folder_with_template(tmp_path, [
        {"name": "tool_use", "template": "tools: {{ messages[0]['content'] }}"},
        {"name": "default", "template": "default: {{ messages[0]['content'] }}"}])
    theirs = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_folder(str(folder)).render_chat("hi") == theirs == "default: hi"


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_in_the_tokenizers_library_stays_one(error):
    """Ctrl-C (or SystemExit) while the tokenizers library encodes is raised as it is: only the
    library's failures become a ValueError (an interrupt was a "cannot encode" error)."""
    class Interrupted:  # stands in for a tokenizers.Tokenizer
        model = None

        def get_vocab(self, with_added_tokens):
            return {"a": 0}

        def encode(self, text, add_special_tokens):
            raise error()
    with pytest.raises(error):
        Tokenizer(Interrupted(), None, (), None).encode("a")
