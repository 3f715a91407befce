"""The errors a checkpoint can give when it is loaded, and the reading of its JSON files, whose
faults are such errors."""
import json


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or lacks a tensor the model needs."""


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this decoder does not implement."""


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
