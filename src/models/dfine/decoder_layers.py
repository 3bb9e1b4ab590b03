"""The decoder's building blocks: one decoder layer (self-attention, deformable cross-attention, gate, FFN),
the MLP heads, the gate, and LQE (the localisation-quality term added to class scores).

src/models/dfine/decoder.py stacks them into the D-FINE decoder. Parameter names follow the reference
implementation so its checkpoints load directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.models.attention import DecoderLayerParts, MSDeformableAttention
from src.models.layers import MLP, activation_layer, prior_bias


class Gate(nn.Module):
    """norm(g1 * x1 + g2 * x2) with sigmoid gates predicted from both inputs (starts at 0.5 / 0.5)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gate = nn.Linear(2 * d_model, 2 * d_model)
        nn.init.constant_(self.gate.bias, prior_bias(0.5))
        nn.init.constant_(self.gate.weight, 0)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        gate1, gate2 = torch.sigmoid(self.gate(torch.cat([x1, x2], dim=-1))).chunk(2, dim=-1)
        return self.norm(gate1 * x1 + gate2 * x2)


class DecoderLayer(DecoderLayerParts):
    def __init__(
        self,
        d_model: int,
        n_head: int,
        dim_feedforward: int,
        dropout: float,
        activation: str,
        n_levels: int,
        n_points: list[int],
        layer_scale: float | None = None,
    ):
        super().__init__()
        if layer_scale is not None:  # the optional wider layers after eval_idx
            dim_feedforward = round(layer_scale * dim_feedforward)
            d_model = round(layer_scale * d_model)
        self._add_self_attention(d_model, n_head, dropout)
        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.gateway = Gate(d_model)
        self._add_ffn(d_model, dim_feedforward, dropout, activation_layer(activation))

    def forward(
        self,
        target: torch.Tensor,
        reference_boxes: torch.Tensor,
        value: list[torch.Tensor],
        spatial_shapes: list[list[int]],
        attn_mask: torch.Tensor | None,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        target = self._self_attention(target, query_pos, attn_mask)
        sampled = self.cross_attn(target + query_pos, reference_boxes, value, spatial_shapes)
        target = self.gateway(target, self.dropout2(sampled))
        return self._ffn(target, clamp=65504)  # keeps fp16 finite (65504 = fp16 max)


class LQE(nn.Module):
    """Location Quality Estimator: score += MLP(top-k bin probabilities of each edge and their mean)."""

    def __init__(self, k: int, hidden_dim: int, num_layers: int, reg_max: int, act: str = "relu"):
        super().__init__()
        self.k = k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, num_layers, act=act)
        nn.init.constant_(self.reg_conf.layers[-1].bias, 0)
        nn.init.constant_(self.reg_conf.layers[-1].weight, 0)

    def forward(self, scores: torch.Tensor, pred_corners: torch.Tensor) -> torch.Tensor:
        batch, num_queries, _ = pred_corners.shape
        prob = F.softmax(pred_corners.reshape(batch, num_queries, 4, self.reg_max + 1), dim=-1)
        top, _ = prob.topk(self.k, dim=-1)  # (B, Q, 4, k)
        stat = torch.cat([top, top.mean(dim=-1, keepdim=True)], dim=-1)
        return scores + self.reg_conf(stat.reshape(batch, num_queries, -1))
