"""What every backend runner shares: the error for a missing backend, the output triple, device choice."""

from __future__ import annotations

import numpy as np

# labels (B, K) int64, boxes (B, K, 4) float32 xyxy in pixels of the given target sizes, scores (B, K) float32
# [, masks (B, K, h, w) float32 mask logits: segment models only] (src/runtime/meta.py: output_names)
Outputs = tuple[np.ndarray, ...]


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
    """The torch device name for a runtime `device` value (src.common.device.resolve_device decides)."""
    from src.common.device import resolve_device

    return str(resolve_device(device))
