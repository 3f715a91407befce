"""The tokenizer: ``tokenizers`` from a tokenizer.json, or a byte-level BPE rebuilt from a GGUF
file's vocabulary and merges; plus the model's chat template, rendered with jinja2."""
import contextlib
import json
import os
import warnings
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from ..integers import as_int
from .errors import CheckpointError, UnsupportedModelError, naming, read_json_object, read_text

# GGUF token types of added tokens, never split: CONTROL tokens are special (dropped from decoded
# text); USER_DEFINED ones (a Hugging Face added token with special=false) are text, as in llama.cpp
CONTROL, USER_DEFINED = 3, 4
# The splits of Llama 3 (digits in runs of up to three) and Qwen2 (digits one by one): text is cut
# into these pieces before the byte mapping, and no merge crosses a cut. Contractions in any case,
# letters with at most one non-letter in front, punctuation runs with their line breaks, spaces
# apart from the word after them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2_split(digits_apart=False):
    """GPT-2's split (the byte mapping's own regex), digits one by one before it if asked."""
    return ([pre_tokenizers.Digits(individual_digits=True)] if digits_apart else []) + [
        pre_tokenizers.ByteLevel(add_prefix_space=False)]


def _regex_split(pattern):
    """The pieces of ``pattern``, then the byte mapping without GPT-2's regex."""
    return [pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]


# Special tokens that end a chat turn, by their text (Llama 3, ChatML, Phi-3, Gemma)
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
# Splits whose pieces that are tokens are taken whole (Llama 3's tokenizer.json: ignore_merges)
WHOLE_PIECE_SPLITS = ("llama-bpe",)
# GGUF pre-tokenizer name (``tokenizer.ggml.pre``, as llama.cpp's converter writes it) -> the
# pre-tokenizers of its split, the byte mapping last
GGUF_PRE_TOKENIZERS = {
    "gpt2": _gpt2_split,
    "gpt-2": _gpt2_split,  # what llama.cpp's converter writes for GPT-2's own split
    "smollm": lambda: _gpt2_split(digits_apart=True),
    "llama-bpe": lambda: _regex_split(LLAMA3_SPLIT),  # Llama 3 and 3.x
    "qwen2": lambda: _regex_split(QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _regex_split(QWEN2_SPLIT),  # DeepSeek-R1's Qwen2 distills
}


@contextlib.contextmanager
def _library_calls(error):
    """Around calls into the tokenizers library: its failure ``e``, a bare Exception or a Rust
    panic (pyo3's PanicException, a BaseException that an ``except Exception`` lets through),
    raised as ``error(e)``; a KeyboardInterrupt or SystemExit as it is."""
    try:
        yield
    except BaseException as e:
        if not (isinstance(e, Exception) or type(e).__name__ == "PanicException"):
            raise
        raise error(e) from e


def _kind(value):
    """A GGUF value of the wrong kind, for an error: its type, and its value where short."""
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def _raise_exception(message):
    """What a chat template calls to refuse its input (as transformers defines it)."""
    raise jinja2.TemplateError(message)


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``, which marks the assistant's text
    for training masks: rendering a prompt writes its body as it is, as a call block's body (its
    own scope; a ``{% break %}`` in it is no loop's)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """The ``tojson`` filter of chat templates, as transformers defines it: plain JSON (jinja2's
    own escapes <, >, & and ' for HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format):
    """Today's date as a chat template asks for it (Llama 3.1's system turn states it)."""
    return datetime.now().strftime(format)


class Tokenizer:
    """Text <-> token ids, the special ids, and the chat template.

    Parameters
    ----------
    tok : tokenizers.Tokenizer
        Adds the BOS token itself (its post-processor) where the model wants one.
    bos_id : int or None
    eos_ids : tuple of int
        Tokens that end a generation; the first is the chat template's ``eos_token``
        (:attr:`template_eos_id`).
    chat_template : str or None
        A jinja2 template over ``messages``, as Hugging Face and GGUF files ship them.
    template_source : str
        Where the chat template comes from (a file, a GGUF key), for its errors.

    Attributes
    ----------
    id_end : int
        One past the largest token id of ``tok``: the ids its text has (not get_vocab_size, the
        number of distinct token texts, fewer where ids are missing or a text has two ids).
    template_eos_id : int or None
        The first of ``eos_ids`` as given: the chat template's ``eos_token``, also where
        :func:`load_model` drops it from :attr:`eos_ids` (it has no row of the embedding).
    """

    def __init__(self, tok: tokenizers.Tokenizer, bos_id, eos_ids, chat_template,
                 template_source="the chat_template argument"):
        self.tok = tok
        self.id_end = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.template_eos_id = (*self.eos_ids, None)[0]  # kept where load_model drops an EOS
        self.chat_template = chat_template
        self.template_source = template_source

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds the BOS token where the model wants one.
        ValueError where the tokenizer cannot (e.g. a WordLevel model with no unknown token meets
        a word it lacks: the tokenizers library raises a bare Exception)."""
        model = type(self.tok.model).__name__
        with _library_calls(lambda e: ValueError(f"Tokenizer.encode: the tokenizer ({model} "
                                                 f"model) cannot encode this text: {e}")):
            return self.tok.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids) -> str:
        """Text of ``ids`` (token ids: integers of any type, e.g. a list, a 1-D tensor or
        array), special tokens dropped, and ids past the vocabulary too (they have no text: the
        rows a model's embedding pads it with, which sampling may draw); TypeError naming one
        that is not an integer, ValueError a negative one (the tokenizers library overflowed)."""
        out = []
        for i in ids:
            n = as_int(i)
            if n is None:
                raise TypeError(f"Tokenizer.decode: token ids must be integers, got {i!r}")
            if n < 0:
                raise ValueError(f"Tokenizer.decode: token ids must be >= 0, got {n}")
            if n < self.id_end:
                out.append(n)
        return self.tok.decode(out, skip_special_tokens=True)

    def render_chat(self, user_text: str) -> str:
        """``user_text`` as one user turn in the chat template, ready for the assistant's reply,
        with the variables transformers' ``apply_chat_template`` gives a plain chat. Raises
        ValueError if the model has no template, CheckpointError naming the template's source if
        it is not a string, does not parse or fails (``raise_exception`` included)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        template = self._compiled_template()
        name = self.tok.id_to_token
        special = {key: name(i) for key, i in (("bos_token", self.bos_id),
                                               ("eos_token", self.template_eos_id))
                   if i is not None}  # undefined where the model has none, as in transformers
        try:
            return template.render(
                messages=[{"role": "user", "content": user_text}], tools=None, documents=None,
                add_generation_prompt=True, **special)
        except Exception as e:  # jinja2's errors, and whatever the template's own code raises
            # (a TypeError adding a str to an int, a ZeroDivisionError): the template's fault
            raise CheckpointError(f"the chat template in {self.template_source} fails: "
                                  f"{e}") from e

    def _compiled_template(self) -> jinja2.Template:
        """The chat template compiled as transformers compiles it (sandboxed, with ``{% break %}``,
        ``{% continue %}`` and ``{% generation %}``, its ``tojson``, ``raise_exception`` and
        ``strftime_now``); CheckpointError naming its source if it is not a string, does not parse
        or does not compile."""
        source = self.template_source
        if not isinstance(self.chat_template, str):
            raise CheckpointError(f"the chat template in {source} must be a string, got "
                                  f"{type(self.chat_template).__name__}")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"the chat template in {source} does not parse: line "
                                  f"{e.lineno}: {e.message}") from e
        except SyntaxError as e:  # the Python jinja2 writes for it does not compile: a {% break %}
            # outside any loop (or in a macro's, a call block's or {% generation %}'s body)
            raise CheckpointError(f"the chat template in {source} does not compile: "
                                  f"{e.msg}") from e

    def encode_prompt(self, text: str, chat: bool) -> list[int]:
        """Token ids of a prompt: in the chat template if ``chat`` and the model has one (the
        template writes its own special tokens), else plain text with BOS where wanted."""
        if chat and self.chat_template is not None:
            return self.encode(self.render_chat(text), add_special=False)
        return self.encode(text)

    @classmethod
    def from_folder(cls, folder: str, eos_ids=()) -> "Tokenizer":
        """From ``tokenizer.json`` in ``folder``, with the special tokens and chat template that
        transformers takes from the folder: BOS and EOS from ``tokenizer_config.json`` and, where
        that has no ``added_tokens_decoder`` (older saves), from ``special_tokens_map.json``
        before it; the chat template from ``chat_template.jinja``, else from
        ``tokenizer_config.json``. ``eos_ids`` from the model config are added after the
        tokenizer's own EOS (the first of :attr:`eos_ids` is the chat template's ``eos_token``).
        """
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"no tokenizer.json in {folder}")
        with _library_calls(lambda e: CheckpointError(f"{path}: cannot read the tokenizer ({e})")):
            tok = tokenizers.Tokenizer.from_file(path)
            # a save's truncation or padding would cut or pad every prompt (transformers too
            # turns them off unless a call asks for them)
            tok.no_truncation()
            tok.no_padding()
            # what panics only at an encode (a post-processor's unknown token); the empty text,
            # which any vocabulary encodes
            tok.encode("")
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = read_json_object(cfg_path) if os.path.isfile(cfg_path) else {}
        # special token -> (its text, the file naming it); transformers reads the map of older
        # saves only where the config has no added_tokens_decoder, and then over the config
        specials = {key: (cfg.get(key), cfg_path) for key in ("bos_token", "eos_token")}
        map_path = os.path.join(folder, "special_tokens_map.json")
        if "added_tokens_decoder" not in cfg and os.path.isfile(map_path):
            specials.update((key, (value, map_path)) for key, value
                            in read_json_object(map_path).items() if key in specials)

        def token_id(key):  # the id of a special token named in those files, if any
            value, source = specials[key]
            text = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(text, str):  # {"x": 1} too: no "content"
                raise CheckpointError(f"{source}: {key} must be a token's text (a string, or "
                                      f"an object with \"content\"), got {value!r}")
            found = None if text is None else tok.token_to_id(text)
            if text is not None and found is None:  # generation would not stop at it
                warnings.warn(f"{source}: {key} {text!r} is not a token of the vocabulary; "
                              f"it is left out", stacklevel=3)
            return found
        jinja = os.path.join(folder, "chat_template.jinja")  # where transformers 5 saves it
        if os.path.isfile(jinja):  # transformers takes it over tokenizer_config.json's
            template, source = read_text(jinja), jinja
        else:
            template, source = cfg.get("chat_template"), cfg_path
        if isinstance(template, list):  # named templates: take "default", else the first
            named = [t for t in template if isinstance(t, dict) and "template" in t]
            if not named:
                raise CheckpointError(f"{cfg_path}: chat_template is a list without a "
                                      f"{{\"name\", \"template\"}} entry")
            template = next((t["template"] for t in named if t.get("name") == "default"),
                            named[0]["template"])
        eos = token_id("eos_token")  # first: the template's eos_token, as in transformers
        return cls(tok, token_id("bos_token"),
                   ((eos,) if eos is not None else ()) + tuple(i for i in eos_ids if i != eos),
                   template, source)

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        """A byte-level BPE (GPT-2 style, ``tokenizer.ggml.model`` "gpt2") rebuilt from the
        vocabulary, merges and special tokens of a GGUF file, with the split its
        ``tokenizer.ggml.pre`` names (:data:`GGUF_PRE_TOKENIZERS`; GPT-2's, with a warning, where
        it names none). Generation ends at the EOS token, at the end-of-turn token
        (``eot_token_id``) where the file has one, and at the special tokens of
        :data:`END_OF_TURN_TOKENS`. ``reader``: a GGUF checkpoint (gguf_loader.open_gguf). Its
        faults name the file."""
        with naming(reader.path):
            return cls._from_gguf_fields(reader)

    @classmethod
    def _from_gguf_fields(cls, reader) -> "Tokenizer":
        """:meth:`from_gguf`, its faults not yet naming the file."""
        def field(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()
        kind, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")
        if kind is None:
            raise CheckpointError("the GGUF file holds no tokenizer (no tokenizer.ggml.model): "
                                  "convert the model with its tokenizer, as llama.cpp's "
                                  "convert_hf_to_gguf.py does")
        if kind == "gpt2" and pre is None:  # converters older than the key wrote none
            warnings.warn(f"{reader.path}: no tokenizer.ggml.pre: splitting text as GPT-2 "
                          f"does, which may not be this model's split (llama.cpp warns that "
                          f"generation quality suffers); re-convert it with a current llama.cpp")
            pre = "gpt2"
        if kind != "gpt2" or not isinstance(pre, str) or pre not in GGUF_PRE_TOKENIZERS:
            raise UnsupportedModelError(
                f"unsupported GGUF tokenizer: model {kind!r}, pre-tokenizer {pre!r} (supported: "
                f"model 'gpt2' with pre-tokenizer {', '.join(GGUF_PRE_TOKENIZERS)})")
        tokens = field("tokenizer.ggml.tokens")
        if not tokens:
            raise CheckpointError("the GGUF file has no vocabulary (tokenizer.ggml.tokens)")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise CheckpointError(f"tokenizer.ggml.tokens must be an array of strings (one a "
                                  f"token), got {_kind(tokens)}")
        types = field("tokenizer.ggml.token_type", [1] * len(tokens))
        if not isinstance(types, list) or not all(isinstance(t, int) for t in types):
            raise CheckpointError(f"tokenizer.ggml.token_type must be an array of integers (one "
                                  f"a token), got {_kind(types)}")
        if len(types) != len(tokens):  # zip would drop the types of the last tokens
            raise CheckpointError(f"tokenizer.ggml.token_type has {len(types)} entries, "
                                  f"tokenizer.ggml.tokens {len(tokens)}: one type per token")
        merges = field("tokenizer.ggml.merges")
        if merges is None:  # llama.cpp refuses it too: without merges BPE leaves every byte apart
            raise CheckpointError("the GGUF file has no tokenizer.ggml.merges (the merges of its "
                                  "BPE tokenizer)")
        if not all(isinstance(m, str) for m in merges):
            raise CheckpointError("tokenizer.ggml.merges must be strings (\"a b\" pairs)")
        merges = [tuple(m.split(" ", 1)) for m in merges]
        with _library_calls(lambda e: CheckpointError(f"the GGUF vocabulary and merges do not fit "
                                                      f"together: {e}")):
            # Llama 3 takes a piece that is a token whole, before any merge (as llama.cpp does)
            bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             ignore_merges=pre in WHOLE_PIECE_SPLITS)
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(GGUF_PRE_TOKENIZERS[pre]())
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == CONTROL])
        tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED])
        bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
        eot = field("tokenizer.ggml.eot_token_id")  # end of a chat turn (Llama 3's <|eot_id|>)
        for key, value in (("bos", bos), ("eos", eos), ("eot", eot)):
            if value is not None and not 0 <= value < len(tokens):
                raise CheckpointError(f"tokenizer.ggml.{key}_token_id {value} is outside the "
                                      f"vocabulary of {len(tokens)} tokens")
        # Llama 3 files converted before the key existed want BOS (llama.cpp's default for them)
        add_bos = field("tokenizer.ggml.add_bos_token", pre in WHOLE_PIECE_SPLITS)
        if not isinstance(add_bos, bool):  # the string "false" would read as true
            raise CheckpointError(f"tokenizer.ggml.add_bos_token must be a bool, got "
                                  f"{_kind(add_bos)}")
        if bos is not None and add_bos:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)])
        # generation stops at EOS, at the end-of-turn token, and (as llama.cpp finds them) at
        # added tokens spelled as a chat turn's end: a Llama 3 Instruct file's EOS is
        # <|end_of_text|>, its turns end with <|eot_id|>, and few files name that id
        turn_ends = [i for i, (t, ty) in enumerate(zip(tokens, types))
                     if ty in (CONTROL, USER_DEFINED) and t in END_OF_TURN_TOKENS]
        ends = tuple(dict.fromkeys(i for i in (eos, eot, *turn_ends) if i is not None))
        return cls(tok, bos, ends, field("tokenizer.chat_template"),
                   f"{reader.path} (tokenizer.chat_template)")
