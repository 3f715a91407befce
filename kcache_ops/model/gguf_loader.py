"""GGUF checkpoints (llama.cpp's format), read with the ``gguf`` package and dequantized to float.

Architectures ``llama`` and ``qwen2``. llama.cpp's converter permutes the rows of Q and K of
Llama models (not Qwen2's: llama.cpp rotates those as Hugging Face does) so that its RoPE can
rotate interleaved pairs; :func:`unpermute` undoes that, so the decoder's one convention
(rotate-half, see rope.py) serves GGUF and Hugging Face checkpoints alike.

A checkpoint that llama.cpp's llama-gguf-split cut into files ``<prefix>-00001-of-0000N.gguf`` ...
is opened from its first part (:func:`open_gguf`).

``gguf`` is imported when a GGUF file is opened, so the rest of the model code (the embedded
default, safetensors checkpoints) works where it is not installed.
"""
import dataclasses
import importlib
import importlib.metadata
import os
import re
import sys

import numpy as np
import torch
from tqdm import tqdm

from ..integers import int_at_least
from .config import LlamaConfig
from .errors import CheckpointError, UnsupportedModelError, naming
from .gguf_header import tensor_of_type
from .llama import Llama

GGUF_MAGIC = b"GGUF"  # a GGUF file's first bytes
# Suffixes of the files of a Hugging Face folder (model.safetensors, config.json ...)
HF_SUFFIXES = (".safetensors", ".json")
# llama-gguf-split's names of the parts of a split checkpoint: <prefix>-%05d-of-%05d.gguf
SPLIT_NAME = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")
# gguf's error for a tensor type number its GGMLQuantizationType lacks: "np.uint32(77) is not ..."
UNKNOWN_TYPE = re.compile(r"(\d+)\)? is not a valid GGMLQuantizationType")

# GGUF tensor name (after "blk.{i}.") -> ours (after "layers.{i}.")
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def _gguf(module="gguf"):
    """The ``gguf`` package (or one of its modules); an ImportError saying what needs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ImportError("reading a GGUF checkpoint needs the gguf package (pip install "
                          "gguf; requirements.txt lists it)") from e


def _gguf_release() -> str:
    """"gguf <version>", or "this gguf" where it has no package metadata (llama.cpp's gguf-py
    put on the path)."""
    try:
        return f"gguf {importlib.metadata.version('gguf')}"
    except importlib.metadata.PackageNotFoundError:
        return "this gguf"


@dataclasses.dataclass
class GGUFCheckpoint:
    """An opened GGUF checkpoint (:func:`open_gguf`): the file ``path`` and, where it is the
    first part of a split checkpoint, the other parts.

    Attributes
    ----------
    path : str
        The file given (a split checkpoint's first part), which its errors name.
    fields : dict
        Metadata key -> gguf.ReaderField, of ``path`` (llama.cpp writes the metadata of a split
        checkpoint into its first part only).
    tensors : list of gguf.ReaderTensor
        Those of every part, in the parts' order.
    """
    path: str
    fields: dict
    tensors: list


def open_gguf(path: str) -> GGUFCheckpoint:
    """The GGUF checkpoint of the file ``path``, with its other parts where it is the first part
    of one split by llama.cpp (:func:`other_parts`). CheckpointError if a file is missing,
    truncated, not GGUF, holds a string that is not UTF-8 or a tensor type number gguf does not
    know; UnsupportedModelError if its byte order is not this machine's."""
    first = read_gguf(path)
    parts = [first] + other_parts(first, path)
    return GGUFCheckpoint(path, first.fields, [t for part in parts for t in part.tensors])


def read_gguf(path: str):
    """A gguf.GGUFReader over the one file ``path``, checked as :func:`open_gguf` says."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        # a file of a Hugging Face folder (model.safetensors, config.json), given for the folder
        hint = (f"; a Hugging Face checkpoint is loaded from its folder: pass "
                f"{os.path.dirname(path) or '.'}" if path.endswith(HF_SUFFIXES) else "")
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not "
                              f"{GGUF_MAGIC!r}){hint}")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        kind = UNKNOWN_TYPE.search(str(e))
        if kind:  # gguf stops on the number before it names the tensor: the header walk names it
            name = tensor_of_type(path, int(kind[1]))
            which = "a tensor's" if name is None else f"tensor {name}'s"
            raise CheckpointError(f"{path}: {which} GGML type is {kind[1]}, which "
                                  f"{_gguf_release()} does not know: a quantization newer than "
                                  f"this gguf (pip install -U gguf), or a corrupt file") from e
        raise CheckpointError(f"{path} ({os.path.getsize(path)} bytes) is not a readable GGUF file "
                              f"(truncated or corrupt): {e}") from e
    if reader.byte_order == "S":  # gguf swaps the metadata's bytes, but not the tensors' blocks
        other = "big" if sys.byteorder == "little" else "little"
        raise UnsupportedModelError(f"{path} is a {other}-endian GGUF file, which this loader "
                                    f"does not read; convert it with: gguf-convert-endian {path} "
                                    f"native (a script of the gguf package; it rewrites the file "
                                    f"in place)")
    check_strings(reader, path)
    check_layout(reader, path)
    return reader


def other_parts(first, path: str) -> list:
    """The gguf.GGUFReaders of the parts after the first of the checkpoint whose first file
    ``first`` reads from ``path``: none unless its ``split.count`` is over 1, else the files
    llama.cpp's llama-gguf-split names ``<prefix>-00002-of-0000N.gguf`` ... beside it, each
    :func:`read_gguf`; CheckpointError if ``path`` is not part 1 so named or a part is missing."""
    meta = metadata(first)
    count = int_at_least(meta.get("split.count", 1), 0)
    if count is None:
        raise CheckpointError(f"{path}: split.count must be a number of files, got "
                              f"{meta['split.count']!r}")
    if count <= 1:
        return []
    no, match = meta.get("split.no", 0), SPLIT_NAME.fullmatch(os.path.basename(path))
    if no != 0 or not match or match.group(2, 3) != ("00001", f"{count:05d}"):
        raise CheckpointError(f"{path}: a GGUF checkpoint split into {count} files (split.count; "
                              f"this one is split.no {no}): load it from its first part, named "
                              f"<prefix>-00001-of-{count:05d}.gguf as llama-gguf-split names the "
                              f"parts (the others are found by that name), or merge the parts "
                              f"with llama-gguf-split --merge")
    parts = []
    for i in range(2, count + 1):
        part = os.path.join(os.path.dirname(path), f"{match[1]}-{i:05d}-of-{count:05d}.gguf")
        if not os.path.isfile(part):
            raise CheckpointError(f"{path} is part 1 of a GGUF checkpoint split into {count} "
                                  f"files (split.count), but part {i}, {part}, is missing")
        parts.append(read_gguf(part))
        meta = metadata(parts[-1])
        no = meta.get("split.no")
        if no != i - 1:  # as llama.cpp checks: a part renamed, or one of another checkpoint
            raise CheckpointError(f"{part}: split.no is {no!r}, its name says {i - 1}")
        if meta.get("split.count") != count:  # a part of another split renamed
            raise CheckpointError(f"{part}: split.count is {meta.get('split.count')!r}, part 1's "
                                  f"is {count}")
    return parts


def check_strings(reader, path: str):
    """CheckpointError naming the file and the key unless every string value of the file is
    UTF-8 (``gguf`` decodes them only when they are read, as by :func:`metadata`)."""
    for key, f in reader.fields.items():
        try:
            f.contents()
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: metadata key {key!r} holds a string that is not "
                                  f"UTF-8 ({e})") from e


def check_layout(reader, path: str):
    """CheckpointError naming the file and the tensor unless the tensors' data lie one after the
    other in the order of their entries, each at the next multiple of the file's alignment after
    the one before, as llama.cpp requires (and gguf's writer lays them out): ``gguf`` reads any
    offset, so one that points into another tensor's bytes would load wrong weights silently."""
    expected = reader.data_offset  # bytes from the file's start
    for t in reader.tensors:
        if t.data_offset != expected:
            raise CheckpointError(f"{path}: tensor {t.name}'s data is at byte {t.data_offset}, "
                                  f"expected {expected} (after the tensor before it, at a "
                                  f"multiple of the alignment, {reader.alignment} bytes): a "
                                  f"corrupt file")
        expected += -(-int(t.n_bytes) // reader.alignment) * reader.alignment


def metadata(reader) -> dict:
    """The scalar and string key/values of ``reader`` (a GGUFCheckpoint or a gguf.GGUFReader;
    arrays, such as the vocabulary, left out)."""
    array = _gguf().GGUFValueType.ARRAY
    return {key: f.contents() for key, f in reader.fields.items()
            if f.types and f.types[0] != array}


def array_lengths(reader) -> dict:
    """The array-valued keys of ``reader`` (a GGUFCheckpoint or a gguf.GGUFReader) -> how many
    values each holds: what :func:`metadata` leaves out."""
    array = _gguf().GGUFValueType.ARRAY
    return {key: len(f.data) for key, f in reader.fields.items()
            if f.types and f.types[0] == array}


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    w : [heads * D, ...] (a weight [heads*D, E] or a bias [heads*D]), whose rows within each head
    are ordered (0, D/2, 1, D/2+1, ...) -> the same with rows in Hugging Face order
    (0, 1, ..., D-1).
    """
    rest = w.shape[1:]
    d = w.shape[0] // heads
    # [heads, D/2, 2, ...] -> [heads, 2, D/2, ...]: pairs back to halves
    return w.reshape(heads, d // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def to_tensor(t) -> torch.Tensor:
    """A GGUF tensor as float32, in PyTorch's [out, in] order; CheckpointError if its type is one
    ``gguf`` cannot dequantize (F64, Q8_K, I32, ...)."""
    try:
        arr = _gguf("gguf.quants").dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"unsupported tensor type {t.tensor_type.name} "
                              f"(tensor {t.name!r})") from e
    # GGUF lists dims innermost first ([in, out]); PyTorch outermost first
    arr = arr.reshape(tuple(reversed(t.shape.tolist())))
    if not arr.flags.writeable:  # float32 tensors come back as views of the read-only file map
        arr = arr.copy()
    return torch.from_numpy(np.ascontiguousarray(arr))


def our_name(name: str) -> str:
    """GGUF tensor name -> the decoder's parameter name, e.g. blk.3.ffn_up.weight ->
    layers.3.mlp.up_proj.weight."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    raise CheckpointError(f"unexpected tensor {name!r} (not one of a Llama-family model)")


def read_config(reader: GGUFCheckpoint) -> LlamaConfig:
    """The LlamaConfig of a GGUF checkpoint, from its metadata and which tensors it holds; its
    faults name the file."""
    tensors = {t.name: t for t in reader.tensors}
    meta = metadata(reader)
    with naming(reader.path):
        embedding = tensors.get("token_embd.weight")
        if embedding is None:
            raise CheckpointError("the GGUF file has no token_embd.weight")
        if len(embedding.shape) != 2:  # its rows give the vocabulary's size
            raise CheckpointError(f"token_embd.weight must have 2 dims, got shape "
                                  f"{[int(n) for n in embedding.shape]}")
        arch = meta.get("general.architecture")
        for key, count in array_lengths(reader).items():  # read as absent, they took defaults
            if key.startswith(f"{arch}."):
                raise UnsupportedModelError(f"{key} is an array of {count} values (one a layer?): "
                                            f"this decoder takes one value for every layer")
        key = f"{arch}.expert_count"
        if meta.get(key):  # Mixtral's files are architecture llama, with experts in each layer
            raise UnsupportedModelError(f"{key} = {meta[key]}: a mixture of experts (this "
                                        f"decoder has one MLP per layer)")
        rope_freqs = tensors.get("rope_freqs.weight")
        return LlamaConfig.from_gguf(
            meta,
            vocab_size=int(embedding.shape[1]),
            has_output="output.weight" in tensors,
            has_qkv_bias="blk.0.attn_q.bias" in tensors,
            rope_freq_factors=None if rope_freqs is None else to_tensor(rope_freqs).tolist(),
            has_output_bias="blk.0.attn_output.bias" in tensors)


def load_gguf_model(reader: GGUFCheckpoint, device, dtype,
                    config: LlamaConfig | None = None) -> Llama:
    """The decoder with the (dequantized) weights of a GGUF checkpoint, on ``device`` in
    ``dtype``; ``config`` is :func:`read_config` of ``reader``, read here unless the caller has
    it. Its faults name the file."""
    config = read_config(reader) if config is None else config
    permuted = metadata(reader)["general.architecture"] == "llama"  # Q/K rows in pairs
    heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}

    def weights():
        for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False):
            if t.name == "rope_freqs.weight":
                continue  # already in the config
            name = our_name(t.name)
            w = to_tensor(t)
            n = heads.get(name.split(".")[-2]) if permuted else None
            # rows that do not fit the config's heads stay as they are, for from_weights to
            # refuse with the tensor's shape and the one the config implies
            if n is not None and len(w) == n * config.head_dim:
                w = unpermute(w, n)
            yield name, w
    with naming(reader.path):  # a tensor missing, unexpected, of another shape: which file
        return Llama.from_weights(config, weights(), device, dtype)
