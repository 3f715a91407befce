"""Hugging Face checkpoints: a folder with config.json and model.safetensors, or shards
``model-0000x-of-0000y.safetensors`` listed by ``model.safetensors.index.json``."""
import json
import os
import struct

from safetensors import safe_open
from tqdm import tqdm

from .config import LlamaConfig
from .errors import CheckpointError, read_json_object
from .llama import Llama


def read_config(folder: str) -> LlamaConfig:
    """The LlamaConfig of ``folder/config.json``."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"no config.json in {folder}")
    cfg = read_json_object(path)
    try:
        return LlamaConfig.from_hf(cfg)
    except (KeyError, TypeError) as e:  # a key missing, a type no check foresaw
        raise CheckpointError(f"{path}: not a usable model config ({type(e).__name__}: {e})") from e
    except CheckpointError as e:  # a value from_hf refused: name the file too
        raise CheckpointError(f"{path}: not a usable model config ({e})") from e


SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards


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
        for p in paths:
            if not os.path.isfile(p):
                raise CheckpointError(f"shard {p} listed in {index} is missing")
    for p in paths:
        check_safetensors(p)
    return paths


def check_safetensors(path: str):
    """Raise CheckpointError unless the file's size is what its header declares (a truncated or
    corrupt download fails here, with the numbers, rather than deep inside the reader)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header")
        header_len = struct.unpack("<Q", raw)[0]
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: header of {header_len} bytes but the file has {size}: "
                                  "truncated or not a safetensors file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    end = max((_data_end(path, k, v) for k, v in _header_items(path, header)), default=0)
    if 8 + header_len + end != size:
        raise CheckpointError(f"{path}: the header declares {8 + header_len + end} bytes, the file "
                              f"has {size}: truncated or corrupt")


def _header_items(path, header):
    """The (tensor name, entry) pairs of a safetensors header (a JSON object)."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON "
                              f"{type(header).__name__}, not an object)")
    return [(k, v) for k, v in header.items() if k != "__metadata__"]


def _data_end(path, name, entry):
    """Where the bytes of tensor ``name`` end, from its header entry's ``data_offsets``."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0
                       for o in offsets)):
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has no "
                              f"data_offsets [begin, end] ({str(entry)[:80]})")
    return offsets[1]


def load_hf_model(folder: str, device, dtype) -> Llama:
    """The decoder with the weights of a Hugging Face folder, on ``device`` in ``dtype``."""
    config = read_config(folder)
    paths = shard_files(folder)

    def weights():
        for path in paths:
            with safe_open(path, framework="pt") as f:
                names = list(f.keys())
                for name in tqdm(names, desc=f"loading {os.path.basename(path)}", unit="tensor",
                                 leave=False):
                    # "model.layers.0..." -> "layers.0..."; the LM head is absent when tied
                    ours = name.removeprefix("model.")
                    if ours.endswith("rotary_emb.inv_freq") or (
                            config.tie_word_embeddings and ours == "lm_head.weight"):
                        continue
                    yield ours, f.get_tensor(name)
    return Llama.from_weights(config, weights(), device, dtype)
