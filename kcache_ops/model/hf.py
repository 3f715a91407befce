"""Hugging Face checkpoints: a folder with config.json and model.safetensors, or shards
``model-0000x-of-0000y.safetensors`` listed by ``model.safetensors.index.json``."""
import dataclasses
import json
import math
import os
import struct

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .config import LlamaConfig
from .errors import CheckpointError, UnsupportedModelError, naming, read_json_object
from .llama import Llama


def config_json(folder: str) -> tuple[str, dict]:
    """The path of ``folder/config.json`` and the JSON object it holds; CheckpointError where
    there is none, or it is not a JSON object."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        ggufs = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
        hint = f"; it holds {ggufs[0]}: pass that file to load a GGUF checkpoint" if ggufs else ""
        raise CheckpointError(f"no config.json in {folder}{hint}")
    return path, read_json_object(path)


def read_config(folder: str) -> LlamaConfig:
    """The LlamaConfig of ``folder/config.json``; generation ends at its ``eos_token_id`` and at
    those of ``generation_config.json`` (as in transformers' generate)."""
    path, cfg = config_json(folder)
    try:
        config = LlamaConfig.from_hf(cfg)
    except KeyError as e:  # a required key missing
        raise CheckpointError(f"{path}: not a usable model config (it lacks the key {e})") from e
    except TypeError as e:  # a type no check foresaw
        raise CheckpointError(f"{path}: not a usable model config ({type(e).__name__}: {e})") from e
    except CheckpointError as e:  # a value from_hf refused: name the file too
        raise CheckpointError(f"{path}: not a usable model config ({e})") from e
    except UnsupportedModelError as e:  # a model this decoder does not run: which file says so
        raise UnsupportedModelError(f"{path}: {e}") from e
    ends = config.eos_token_ids + generation_eos_ids(folder, config.vocab_size)
    return dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys(ends)))


def generation_eos_ids(folder: str, vocab_size: int) -> tuple[int, ...]:
    """The ``eos_token_id`` of ``folder/generation_config.json`` (an id or a list of ids; none
    where the file or the key is absent), each checked to be a token id of the vocabulary."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return ()
    eos = read_json_object(path).get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size
               for i in ids):
        raise CheckpointError(f"{path}: eos_token_id must be a token id in [0, {vocab_size}) or "
                              f"a list of them, got {eos!r}")
    return tuple(ids)


SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards
# bytes per element of each safetensors dtype that PyTorch reads
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E4M3FNUZ": 1,
               "F8_E5M2": 1, "F8_E5M2FNUZ": 1, "C64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def shard_files(folder: str) -> list[str]:
    """Paths of the safetensors files holding the weights of ``folder``, each checked by
    :func:`check_safetensors` (a truncated download fails here, with the numbers)."""
    single = os.path.join(folder, SAFETENSORS_NAMES[0])
    if os.path.isfile(single):
        paths = [single]
    else:
        index = os.path.join(folder, SAFETENSORS_NAMES[1])
        if not os.path.isfile(index):
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in "
                                  f"{folder}")
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str)
                                                      for n in weight_map.values()):
            raise CheckpointError(f"{index} must map tensor names to file names under "
                                  f"\"weight_map\", got {str(weight_map)[:80]}")
        names = sorted(set(weight_map.values()))
        paths = [os.path.join(folder, n) for n in names]
        inside = os.path.abspath(folder)  # by name: the Hub's cache links shards to blobs
        for n, p in zip(names, paths):
            if os.path.commonpath([inside, os.path.abspath(p)]) != inside:
                raise CheckpointError(f"{index} lists shard {n!r}, outside the folder: a "
                                      f"checkpoint's shards are files of its folder")
        for p in paths:
            if not os.path.isfile(p):
                raise CheckpointError(f"shard {p} listed in {index} is missing")
    for p in paths:
        check_safetensors(p)
    return paths


# the longest header the safetensors library reads (its MAX_HEADER_SIZE): a corrupt length is
# refused before it is read into memory, not after
MAX_HEADER_BYTES = 100_000_000


def check_safetensors(path: str):
    """Raise CheckpointError unless each tensor of the header has a known dtype and a byte range
    its shape fills, the ranges follow one another, and the file's size is what they declare (a
    truncated or corrupt download fails here, with the numbers, rather than deep inside the
    reader)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header")
        header_len = struct.unpack("<Q", raw)[0]
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: a header of {header_len} bytes, more than the "
                                  f"{MAX_HEADER_BYTES} a safetensors file may have: corrupt or "
                                  "not a safetensors file")
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: header of {header_len} bytes but the file has {size}: "
                                  "truncated or not a safetensors file")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as e:  # as errors.read_json_object
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    end = 0
    spans = sorted(_tensor_span(path, k, v) for k, v in _header_items(path, header))
    for begin, stop, name in spans:
        if begin != end:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} starts at "
                                  f"data byte {begin}, expected {end}, where the tensor before "
                                  "it ends")
        end = stop
    if 8 + header_len + end != size:
        raise CheckpointError(f"{path}: the header declares {8 + header_len + end} bytes, the file "
                              f"has {size}: truncated or corrupt")


def _header_items(path, header):
    """The (tensor name, entry) pairs of a safetensors header (a JSON object)."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON "
                              f"{type(header).__name__}, not an object)")
    return [(k, v) for k, v in header.items() if k != "__metadata__"]


def _counts(value, length=None) -> bool:
    """Whether ``value`` is a list (of ``length`` items, if given) of ints >= 0."""
    return (isinstance(value, list) and length in (None, len(value))
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _tensor_span(path, name, entry):
    """(begin, end, name): the bytes of tensor ``name`` in the data, from its header entry's
    ``data_offsets``, checked to hold exactly its ``shape`` of ``dtype``."""
    offsets, shape, dtype = (entry.get(k) if isinstance(entry, dict) else None
                             for k in ("data_offsets", "shape", "dtype"))
    fault = f"{path}: corrupt safetensors header: tensor {name!r}"
    if not _counts(offsets, 2):
        raise CheckpointError(f"{fault} has no data_offsets [begin, end] ({str(entry)[:80]})")
    if not _counts(shape):
        raise CheckpointError(f"{fault} has no shape [d0, d1, ...] ({str(entry)[:80]})")
    if dtype not in DTYPE_BYTES:  # a newer format's dtype, or damage
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {repr(dtype)[:20]}, which "
                              f"kcache_ops does not read (it reads {', '.join(DTYPE_BYTES)})")
    need = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != need:
        raise CheckpointError(f"{fault} of shape {shape} and dtype {dtype} needs {need} bytes, "
                              f"its data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1], name


def open_safetensors(path: str):
    """safe_open(``path``) for PyTorch; CheckpointError naming the file where the reader refuses
    it (a fault of the header that :func:`check_safetensors` does not look for)."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{path}: the safetensors reader refuses the file: {e}") from e


def load_hf_model(folder: str, device, dtype, config: LlamaConfig | None = None) -> Llama:
    """The decoder with the weights of a Hugging Face folder, on ``device`` in ``dtype``;
    ``config`` is :func:`read_config` of ``folder``, read here unless the caller has it."""
    config = read_config(folder) if config is None else config
    paths = shard_files(folder)
    # tied: the head is the embedding, read from lm_head.weight where that is all the folder has
    # (transformers loads such a folder)
    tied_name = _tied_head(folder, paths) if config.tie_word_embeddings else None

    def weights():
        for path in paths:
            with open_safetensors(path) as f:
                names = list(f.keys())
                for name in tqdm(names, desc=f"loading {os.path.basename(path)}", unit="tensor",
                                 leave=False):
                    # "model.layers.0..." -> "layers.0..."; tied, the head is the embedding
                    ours = name.removeprefix("model.")
                    if ours == "lm_head.weight" and config.tie_word_embeddings:
                        if tied_name == "embed_tokens.weight":
                            continue  # the same values, read as the embedding
                        ours = "embed_tokens.weight"
                    if ours.endswith("rotary_emb.inv_freq"):
                        continue
                    yield ours, f.get_tensor(name)
    with naming(folder):  # a tensor missing, unexpected, of another shape: which folder
        return Llama.from_weights(config, weights(), device, dtype)


def _tied_head(folder, paths):
    """Which of a folder's weights a config.json that ties the LM head makes the embedding and
    the head: embed_tokens.weight, or lm_head.weight where the folder holds only that (None
    where it holds neither: the embedding is then missing). CheckpointError if it holds both and
    they differ (transformers 5 uses such a head, 4 the embeddings), before any weight is loaded;
    the two are read only where both are there."""
    found = {}  # our name -> (its file, the file's name)
    for path in paths:
        with open_safetensors(path) as f:
            for name in f.keys():
                if name.removeprefix("model.") in ("lm_head.weight", "embed_tokens.weight"):
                    found[name.removeprefix("model.")] = path, name
    if len(found) < 2:
        return next(iter(found), None)
    head, embed = (_read_tensor(*found[ours]) for ours in ("lm_head.weight", "embed_tokens.weight"))
    if not torch.equal(head, embed):
        raise CheckpointError(
            f"{folder}: config.json sets tie_word_embeddings, but the weights hold an "
            f"lm_head.weight that differs from embed_tokens.weight (transformers 5 uses "
            f"lm_head.weight, 4 the embeddings): set tie_word_embeddings to false to use it, or "
            f"drop it")
    return "embed_tokens.weight"


def _read_tensor(path, name):
    """Tensor ``name`` of the safetensors file ``path``."""
    with open_safetensors(path) as f:
        return f.get_tensor(name)
