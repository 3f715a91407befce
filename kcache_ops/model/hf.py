"""Hugging Face checkpoints: a folder with config.json and model.safetensors, or shards
``model-0000x-of-0000y.safetensors`` listed by ``model.safetensors.index.json``."""
import json
import os
import struct

from safetensors import safe_open
from tqdm import tqdm

from .config import LlamaConfig
from .errors import CheckpointError
from .llama import Llama


def read_config(folder: str) -> LlamaConfig:
    """The LlamaConfig of ``folder/config.json``."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"no config.json in {folder}")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
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
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
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
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CheckpointError(f"{path}: the header declares {8 + header_len + end} bytes, the file "
                              f"has {size}: truncated or corrupt")


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
