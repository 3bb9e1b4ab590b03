"""DETR's sine position encoding of a feature map (the official `PositionEmbeddingSine`, normalize=True).

Our inputs are never padded, so every position is valid: the official mask cumsum is a plain 1..n count.
Computed in float32 like the official code, whatever the model dtype (the caller casts the result).
"""

from __future__ import annotations

import math

import torch


def sine_position_embedding(
    height: int, width: int, num_pos_feats: int = 128, temperature: float = 10000.0, device=None
) -> torch.Tensor:
    """(height * width, 2 * num_pos_feats) float32, rows y-major like a flattened map; features are
    [y: sin, cos interleaved | x: sin, cos interleaved], positions normalised to (0, 2 pi]."""
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y = y / (y[-1:] + eps) * scale
    x = x / (x[-1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_y = interleave_sin_cos(y[:, None] / dim_t)  # (H, F)
    pos_x = interleave_sin_cos(x[:, None] / dim_t)  # (W, F)
    pos = torch.cat([pos_y[:, None].expand(-1, width, -1), pos_x[None].expand(height, -1, -1)], dim=-1)
    return pos.flatten(0, 1)


def interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(n, F) -> (n, F): sin of the even columns and cos of the odd ones, paired [sin0, cos1, sin2, ...]."""
    return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=-1).flatten(1)
