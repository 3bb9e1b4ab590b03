"""The one place a torch device is chosen from the config's `device` key (training and every runtime)."""

from __future__ import annotations


def resolve_device(device: str, local_rank: int = 0):
    """`auto` -> this process's GPU if there is one, else CPU; explicit names are checked, not trusted.

    cuda without an index means this process's GPU (`local_rank` under torchrun). Returns a torch.device.
    """
    import torch

    device = str(device)
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device} was asked for but CUDA is not available here; use device=cpu or auto"
        )
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)
