"""Device helpers the commands and the measurements share: the dtypes by name, the default device,
and a host sync for timing."""
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device():
    """CUDA where available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device):
    """Wait for the work queued on ``device`` (a no-op on the CPU: its ops are synchronous)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
