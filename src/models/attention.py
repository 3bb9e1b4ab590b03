"""Multi-scale deformable attention as D-FINE and RT-DETRv2 use it (bilinear sampling with F.grid_sample).

Each query looks at a few learned points per head and feature level, placed around its reference box:
offsets are predicted from the query, scaled by the box size and by 1/num_points of the level, and the
sampled values are averaged with softmax weights (over all points of all levels of one head). Levels may
have different point counts (`num_points`). D-FINE has no value or output projection
(`MSDeformableAttention`); RT-DETRv2 has both (`ProjectedDeformableAttention`) and can sample the nearest
cell instead of interpolating (method "discrete": no grid_sample, e.g. for runtimes without it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def split_value_heads(
    memory: torch.Tensor, num_heads: int, spatial_shapes: list[list[int]]
) -> list[torch.Tensor]:
    """(B, sum(h*w), C) encoder memory -> per level (B, heads, C / heads, h*w), the layout sampling needs."""
    batch, length, channels = memory.shape
    value = memory.reshape(batch, length, num_heads, channels // num_heads).permute(0, 2, 3, 1)
    return list(value.split([h * w for h, w in spatial_shapes], dim=-1))


def deformable_sample(
    value: list[torch.Tensor],
    spatial_shapes: list[list[int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
    num_points: list[int],
    method: str = "default",
) -> torch.Tensor:
    """Weighted sum of bilinear ("default") or nearest-cell ("discrete") samples.

    value: per level (B, heads, head_dim, h*w); locations (B, Q, heads, sum(points), 2) in [0, 1] (x, y);
    weights (B, Q, heads, sum(points)). Returns (B, Q, heads * head_dim).
    """
    batch, num_heads, head_dim, _ = value[0].shape
    num_queries = locations.shape[1]
    locations = locations.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*heads, Q, sum(points), 2)
    samples = []
    for level_value, (h, w), level_locations in zip(
        value, spatial_shapes, locations.split(num_points, dim=-2)
    ):
        image = level_value.reshape(batch * num_heads, head_dim, h * w)
        if method == "discrete":
            samples.append(_nearest_samples(image, h, w, level_locations))
        else:  # grid_sample wants [-1, 1] coordinates and one image per (batch, head)
            samples.append(
                F.grid_sample(
                    image.reshape(batch * num_heads, head_dim, h, w),
                    2 * level_locations - 1,
                    mode="bilinear",
                    padding_mode="zeros",
                    align_corners=False,
                )
            )  # (B*heads, head_dim, Q, points_l)
    weights = weights.permute(0, 2, 1, 3).reshape(batch * num_heads, 1, num_queries, sum(num_points))
    out = (torch.cat(samples, dim=-1) * weights).sum(-1)  # (B*heads, head_dim, Q)
    return out.reshape(batch, num_heads * head_dim, num_queries).permute(0, 2, 1)


def _nearest_samples(image: torch.Tensor, height: int, width: int, locations: torch.Tensor) -> torch.Tensor:
    """image (N, C, h*w), locations (N, Q, P, 2) in [0, 1] (x, y) -> (N, C, Q, P) cell values.

    The cell index is the reference's: trunc(x * w + 0.5), clamped to the map (the reference clamps both
    axes to h - 1, which only differs from this on non-square maps, where it would index out of range).
    """
    cells = (locations * torch.tensor([width, height], device=locations.device) + 0.5).to(torch.int64)
    x = cells[..., 0].clamp(0, width - 1)
    y = cells[..., 1].clamp(0, height - 1)
    index = (y * width + x).flatten(1)  # (N, Q*P)
    picked = image.gather(2, index.unsqueeze(1).expand(-1, image.shape[1], -1))  # (N, C, Q*P)
    return picked.reshape(*image.shape[:2], *locations.shape[1:3])


class MSDeformableAttention(nn.Module):
    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int | list[int] = 4,
        offset_scale: float = 0.5,
        method: str = "default",
    ):
        super().__init__()
        if method not in ("default", "discrete"):
            raise ValueError(f"deformable attention method must be default or discrete, got {method!r}")
        self.method = method
        self.num_points = (
            list(num_points) if isinstance(num_points, (list, tuple)) else [num_points] * num_levels
        )
        if len(self.num_points) != num_levels:
            raise ValueError(f"num_points {self.num_points} must have one entry per level ({num_levels})")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.offset_scale = offset_scale
        total_points = sum(self.num_points)
        # Offsets of a level's points are divided by that level's point count (a saved buffer in the reference).
        scale = [1 / n for n in self.num_points for _ in range(n)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * total_points)
        self._reset_parameters()
        if method == "discrete":  # nearest-cell sampling has no gradient with respect to the locations
            self.sampling_offsets.requires_grad_(False)

    def _reset_parameters(self) -> None:
        # Start with point k of each head at distance k along the head's own direction (a star pattern).
        nn.init.constant_(self.sampling_offsets.weight, 0)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        distance = torch.cat([torch.arange(1, n + 1) for n in self.num_points]).reshape(1, -1, 1)
        grid = directions.reshape(self.num_heads, 1, 2).tile([1, sum(self.num_points), 1]) * distance
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0)
        nn.init.constant_(self.attention_weights.bias, 0)

    def forward(
        self,
        query: torch.Tensor,
        reference_boxes: torch.Tensor,
        value: list[torch.Tensor],
        spatial_shapes: list[list[int]],
    ) -> torch.Tensor:
        """query (B, Q, C); reference_boxes (B, Q, 1, 4) cxcywh in [0, 1]; value from `split_value_heads`."""
        batch, num_queries = query.shape[:2]
        total_points = sum(self.num_points)
        offsets = self.sampling_offsets(query).reshape(batch, num_queries, self.num_heads, total_points, 2)
        weights = self.attention_weights(query).reshape(batch, num_queries, self.num_heads, total_points)
        weights = F.softmax(weights, dim=-1)

        point_scale = self.num_points_scale.to(dtype=query.dtype).unsqueeze(-1)  # (total_points, 1)
        box_size = reference_boxes[:, :, None, :, 2:]  # (B, Q, 1, 1, 2)
        offset = offsets * point_scale * box_size * self.offset_scale
        locations = reference_boxes[:, :, None, :, :2] + offset  # (B, Q, heads, total_points, 2)
        return deformable_sample(value, spatial_shapes, locations, weights, self.num_points, self.method)


class ProjectedDeformableAttention(MSDeformableAttention):
    """RT-DETRv2's deformable attention: the memory is projected into values in every layer
    (`value_proj`) and the sampled result projected back (`output_proj`)."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points=4, **kwargs):
        super().__init__(embed_dim, num_heads, num_levels, num_points, **kwargs)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.constant_(projection.bias, 0)

    def forward(
        self,
        query: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: list[list[int]],
    ) -> torch.Tensor:
        """query (B, Q, C); reference_boxes (B, Q, 1, 4) cxcywh in [0, 1]; memory (B, sum(h*w), C)."""
        value = split_value_heads(self.value_proj(memory), self.num_heads, spatial_shapes)
        return self.output_proj(super().forward(query, reference_boxes, value, spatial_shapes))


class DecoderLayerParts(nn.Module):
    """What the D-FINE and RT-DETRv2 decoder layers share around their cross-attention: post-norm
    self-attention over the queries and the FFN. Subclasses register the parts in their official order
    (self-attention, cross-attention, FFN), as the reference checkpoints name them."""

    def _add_self_attention(self, d_model: int, n_head: int, dropout: float) -> None:
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

    def _add_ffn(self, d_model: int, dim_feedforward: int, dropout: float, activation: nn.Module) -> None:
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = activation
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def _self_attention(
        self, target: torch.Tensor, query_pos: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """target, query_pos (B, Q, C); attn_mask (Q, Q) True = blocked -> (B, Q, C)."""
        q = k = target + query_pos
        attended, _ = self.self_attn(q, k, value=target, attn_mask=attn_mask)
        return self.norm1(target + self.dropout1(attended))

    def _ffn(self, target: torch.Tensor, clamp: float | None = None) -> torch.Tensor:
        """(B, Q, C) -> (B, Q, C); clamp bounds the residual sum before the norm (D-FINE: fp16's max)."""
        out = target + self.dropout4(self.linear2(self.dropout3(self.activation(self.linear1(target)))))
        return self.norm3(out if clamp is None else out.clamp(min=-clamp, max=clamp))
