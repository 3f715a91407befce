"""The errors a checkpoint can give when it is loaded."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or lacks a tensor the model needs."""


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this decoder does not implement."""
