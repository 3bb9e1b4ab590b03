"""What every backend runner shares: the error for a missing backend, the output triple, device choice."""

from __future__ import annotations

import numpy as np

# labels (B, K) int64, boxes (B, K, 4) float32 xyxy in pixels of the given target sizes, scores (B, K) float32
Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]


class BackendUnavailable(RuntimeError):
    """A backend whose library (or hardware) is missing. Other backends keep working."""

    def __init__(self, backend: str, reason: str):
        super().__init__(f"{backend} backend unavailable: {reason}")
        self.backend = backend
        self.reason = reason


def wants_cuda(device: str) -> bool:
    """True for 'cuda', 'cuda:N' and 'auto' (auto: use CUDA when the backend has it)."""
    return device == "auto" or str(device).startswith("cuda")


def torch_device(device: str) -> str:
    """Resolve 'auto' to cuda when available, else cpu; other values pass through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} asked, but torch sees no CUDA GPU (use device=cpu or auto)")
    return str(device)
