"""GGUF checkpoints (llama.cpp's format), read with the ``gguf`` package and dequantized to float.

Architectures ``llama`` and ``qwen2``. llama.cpp's converter permutes the rows of Q and K of
Llama models (not Qwen2's: llama.cpp rotates those as Hugging Face does) so that its RoPE can
rotate interleaved pairs; :func:`unpermute` undoes that, so the decoder's one convention
(rotate-half, see rope.py) serves GGUF and Hugging Face checkpoints alike.

``gguf`` is imported when a GGUF file is opened, so the rest of the model code (the embedded
default, safetensors checkpoints) works where it is not installed.
"""
import importlib
import os

import numpy as np
import torch
from tqdm import tqdm

from .config import LlamaConfig
from .errors import CheckpointError, UnsupportedModelError
from .llama import Llama

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


def open_gguf(path: str):
    """A gguf.GGUFReader over ``path``; CheckpointError if it is missing, truncated, not GGUF
    or holds a string that is not UTF-8."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no such GGUF file: {path}")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise CheckpointError(f"{path} ({os.path.getsize(path)} bytes) is not a readable GGUF file "
                              f"(truncated or corrupt): {e}") from e
    check_strings(reader, path)
    return reader


def check_strings(reader, path: str):
    """CheckpointError naming the file and the key unless every string value of the file is
    UTF-8 (``gguf`` decodes them only when they are read, as by :func:`metadata`)."""
    for key, f in reader.fields.items():
        try:
            f.contents()
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: metadata key {key!r} holds a string that is not "
                                  f"UTF-8 ({e})") from e


def gguf_path(reader) -> str:
    """The path of the file that ``reader`` (a gguf.GGUFReader) maps."""
    return reader.data.filename


def metadata(reader) -> dict:
    """The scalar and string key/values of the file (arrays, such as the vocabulary, left out)."""
    array = _gguf().GGUFValueType.ARRAY
    return {key: f.contents() for key, f in reader.fields.items()
            if f.types and f.types[0] != array}


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


def to_tensor(t, path: str) -> torch.Tensor:
    """A GGUF tensor of the file ``path`` as float32, in PyTorch's [out, in] order;
    CheckpointError if its type is one ``gguf`` cannot dequantize (F64, Q8_K, I32, ...)."""
    try:
        arr = _gguf("gguf.quants").dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"unsupported tensor type {t.tensor_type.name} (tensor {t.name!r}) "
                              f"in {path}") from e
    # GGUF lists dims innermost first ([in, out]); PyTorch outermost first
    arr = arr.reshape(tuple(reversed(t.shape.tolist())))
    if not arr.flags.writeable:  # float32 tensors come back as views of the read-only file map
        arr = arr.copy()
    return torch.from_numpy(np.ascontiguousarray(arr))


def our_name(name: str, path: str) -> str:
    """GGUF tensor name (of the file ``path``) -> the decoder's parameter name, e.g.
    blk.3.ffn_up.weight -> layers.3.mlp.up_proj.weight."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    raise CheckpointError(f"{path}: unexpected tensor {name!r} (not one of a Llama-family model)")


def read_config(reader) -> LlamaConfig:
    """The LlamaConfig of a GGUF file, from its metadata and which tensors it holds; its faults
    name the file."""
    path = gguf_path(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: the GGUF file has no token_embd.weight")
    if len(tensors["token_embd.weight"].shape) != 2:  # its rows give the vocabulary's size
        raise CheckpointError(f"{path}: token_embd.weight must have 2 dims, got shape "
                              f"{[int(n) for n in tensors['token_embd.weight'].shape]}")
    rope_freqs = tensors.get("rope_freqs.weight")
    factors = None if rope_freqs is None else to_tensor(rope_freqs, path).tolist()
    try:
        return LlamaConfig.from_gguf(
            metadata(reader),
            vocab_size=int(tensors["token_embd.weight"].shape[1]),
            has_output="output.weight" in tensors,
            has_qkv_bias="blk.0.attn_q.bias" in tensors,
            rope_freq_factors=factors,
            has_output_bias="blk.0.attn_output.bias" in tensors)
    except (CheckpointError, UnsupportedModelError) as e:  # a key missing, a value or a model
        raise type(e)(f"{path}: {e}") from e             # from_gguf refused: name the file


def load_gguf_model(reader, device, dtype, config: LlamaConfig | None = None) -> Llama:
    """The decoder with the (dequantized) weights of a GGUF file, on ``device`` in ``dtype``;
    ``config`` is :func:`read_config` of ``reader``, read here unless the caller has it."""
    config = read_config(reader) if config is None else config
    path = gguf_path(reader)
    permuted = metadata(reader)["general.architecture"] == "llama"  # Q/K rows in pairs
    heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}

    def weights():
        for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False):
            if t.name == "rope_freqs.weight":
                continue  # already in the config
            name = our_name(t.name, path)
            w = to_tensor(t, path)
            n = heads.get(name.split(".")[-2]) if permuted else None
            # rows that do not fit the config's heads stay as they are, for from_weights to
            # refuse with the tensor's shape and the one the config implies
            if n is not None and len(w) == n * config.head_dim:
                w = unpermute(w, n)
            yield name, w
    return Llama.from_weights(config, weights(), device, dtype)
