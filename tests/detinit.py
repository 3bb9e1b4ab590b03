"""Deterministic, implementation-independent weights for the parity tests.

The rule of the parity spec: every floating tensor with more than one element is filled from a NumPy
PCG64 stream seeded by the CRC32 of its state-dict key, so two implementations with the same keys and
shapes get bit-identical weights. Per key: running_mean ~ N(0, 0.1); running_var ~ U(0.5, 1.5);
1-D weight ~ U(0.8, 1.2); 1-D bias ~ N(0, 0.02); >=2-D ~ N(0, 1)/sqrt(fan_in); anything else N(0, 0.02).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _values(key: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    count = int(np.prod(shape))
    if key.endswith("running_mean"):
        values = 0.1 * rng.standard_normal(count)
    elif key.endswith("running_var"):
        values = rng.uniform(0.5, 1.5, count)
    elif len(shape) == 1 and key.endswith("weight"):
        values = rng.uniform(0.8, 1.2, count)
    elif len(shape) >= 2:
        values = rng.standard_normal(count) / np.sqrt(int(np.prod(shape[1:])))
    else:  # 1-D biases and any other 1-D tensor
        values = 0.02 * rng.standard_normal(count)
    return values.reshape(shape)


def deterministic_state_dict(state: dict[str, torch.Tensor], skip=frozenset()) -> dict[str, torch.Tensor]:
    """A copy of `state` with deterministic values; skipped keys, ints and scalars keep their own."""
    out = {}
    for key, tensor in state.items():
        if key in skip or not torch.is_floating_point(tensor) or tensor.numel() <= 1:
            out[key] = tensor.clone()
        else:
            out[key] = torch.from_numpy(_values(key, tuple(tensor.shape))).to(tensor.dtype)
    return out
