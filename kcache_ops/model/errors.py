"""The errors a checkpoint can give when it is loaded, and the reading of its text and JSON files,
whose faults are such errors."""
import contextlib
import json


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or lacks a tensor the model needs."""


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this decoder does not implement."""


@contextlib.contextmanager
def naming(where: str):
    """Re-raise a CheckpointError or UnsupportedModelError of the block with ``where`` (the file
    or folder at fault) in front of its message: the code that finds a fault knows what it
    reads, not where from. One that names a file there already (its message starts with
    ``where``, as "<folder>/model.safetensors: ...") is raised as it is."""
    try:
        yield
    except (CheckpointError, UnsupportedModelError) as e:
        if str(e).startswith(str(where)):
            raise
        raise type(e)(f"{where}: {e}") from e


def read_text(path: str) -> str:
    """The text of the UTF-8 file ``path``; CheckpointError naming the file if it is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text: {e}") from e


def read_json_object(path: str) -> dict:
    """The JSON object in the file ``path``; CheckpointError naming the file if it is not valid
    JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 faults, a number of 5000 digits,
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e  # nesting of 100000
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value
