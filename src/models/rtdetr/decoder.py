"""RT-DETRv2 decoder: query selection, deformable-attention layers, iterative box refinement.

Flow (shapes for batch B, Q queries, C = hidden_dim):
1. Every encoder map is projected (1x1 conv + BN) and flattened into one memory (B, sum(h*w), C). Each
   memory position has an anchor box (its cell centre, size 0.05 * 2^level); a linear+LayerNorm and a
   class head score every position, and the top Q become the queries: content = their memory,
   reference box = anchor + an MLP delta (shared with D-FINE: src/models/query_selection.py).
2. Each layer: self-attention between queries (position = an MLP of the current box), deformable
   cross-attention with value/output projections around the box (RT-DETRv2: per-level point counts,
   optional "discrete" sampling), an FFN; post-norm after each.
3. After each layer a box head moves the reference box (in logit space) and a class head scores it.
In training every layer's output is returned (deep supervision); in eval only layer `eval_idx`, and the
layers after it are not run. Contrastive denoising queries are prepended in training when
num_denoising > 0 (src/models/denoising.py).

Parameter names follow the reference implementation so its checkpoints load directly.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from src.models.attention import DecoderLayerParts, ProjectedDeformableAttention
from src.models.denoising import split_denoising
from src.models.layers import MLP, activation_layer, inverse_sigmoid, prior_bias
from src.models.query_selection import QuerySelection


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
        method: str = "default",
    ):
        super().__init__()
        self._add_self_attention(d_model, n_head, dropout)
        self.cross_attn = ProjectedDeformableAttention(d_model, n_head, n_levels, n_points, method=method)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self._add_ffn(d_model, dim_feedforward, dropout, activation_layer(activation))

    def forward(
        self,
        target: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: list[list[int]],
        attn_mask: torch.Tensor | None,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        """target (B, Q, C), reference_boxes (B, Q, 1, 4) cxcywh, memory (B, L, C) -> (B, Q, C)."""
        target = self._self_attention(target, query_pos, attn_mask)
        sampled = self.cross_attn(target + query_pos, reference_boxes, memory, spatial_shapes)
        return self._ffn(self.norm2(target + self.dropout2(sampled)))


class LayerStack(nn.Module):
    """The decoder layers (a module of their own: reference checkpoints keep them under `decoder.layers`)."""

    def __init__(self, layer: DecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))


class RTDETRv2Decoder(QuerySelection):
    def __init__(
        self,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 300,
        feat_channels: list[int] = (256, 256, 256),
        feat_strides: list[int] = (8, 16, 32),
        num_levels: int = 3,
        num_points: list[int] | int = 4,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        mlp_act: str = "relu",
        query_pos_method: str = "default",
        cross_attn_method: str = "default",
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        eval_spatial_size: tuple[int, int] | None = None,
        eval_idx: int = -1,
        eps: float = 1e-2,
        aux_loss: bool = True,
    ):
        super().__init__(
            num_classes,
            hidden_dim,
            num_queries,
            list(feat_channels),
            list(feat_strides),
            num_levels,
            eval_spatial_size,
            eps,
            num_denoising,
            label_noise_ratio,
            box_noise_scale,
        )
        if query_pos_method not in ("default", "as_reg"):
            raise ValueError(f"query_pos_method must be default or as_reg, got {query_pos_method!r}")
        self.nhead = nhead
        self.num_layers = num_layers
        self.aux_loss = aux_loss
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        num_points = list(num_points) if isinstance(num_points, (list, tuple)) else [num_points] * num_levels

        self.input_proj = self._build_input_proj(list(feat_channels))
        layer = DecoderLayer(
            hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels, num_points, cross_attn_method
        )
        self.decoder = LayerStack(layer, num_layers)
        if num_denoising > 0:  # row num_classes = padding ("no object")
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])
        # DEIM's "as_reg": the box -> query-position MLP shaped like a box head (3 layers of hidden_dim).
        if query_pos_method == "as_reg":
            self.query_pos_head = MLP(4, hidden_dim, hidden_dim, 3, act=mlp_act)
        else:
            self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2, act=mlp_act)
        self.enc_output = nn.Sequential(
            OrderedDict([("proj", nn.Linear(hidden_dim, hidden_dim)), ("norm", nn.LayerNorm(hidden_dim))])
        )
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(
            MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act) for _ in range(num_layers)
        )
        self._reset_parameters()

    def _build_input_proj(self, feat_channels: list[int]) -> nn.ModuleList:
        """1x1 conv + BN per encoder map (even at hidden_dim channels); extra levels: stride-2 3x3 convs."""

        def conv_bn(in_channels: int, kernel: int, stride: int) -> nn.Module:
            conv = nn.Conv2d(
                in_channels, self.hidden_dim, kernel, stride, padding=(kernel - 1) // 2, bias=False
            )
            return nn.Sequential(OrderedDict([("conv", conv), ("norm", nn.BatchNorm2d(self.hidden_dim))]))

        projections = nn.ModuleList(conv_bn(channels, 1, 1) for channels in feat_channels)
        in_channels = feat_channels[-1]
        for _ in range(self.num_levels - len(feat_channels)):
            projections.append(conv_bn(in_channels, 3, 2))
            in_channels = self.hidden_dim
        return projections

    def _reset_parameters(self) -> None:
        bias = prior_bias(0.01)
        nn.init.constant_(self.enc_score_head.bias, bias)
        nn.init.constant_(self.enc_bbox_head.layers[-1].weight, 0)
        nn.init.constant_(self.enc_bbox_head.layers[-1].bias, 0)
        for score_head, box_head in zip(self.dec_score_head, self.dec_bbox_head):
            nn.init.constant_(score_head.bias, bias)
            nn.init.constant_(box_head.layers[-1].weight, 0)
            nn.init.constant_(box_head.layers[-1].bias, 0)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[1].weight)
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight)

    def convert_to_deploy(self) -> None:
        """Keep only what eval runs: the layers and heads up to eval_idx."""
        keep = self.eval_idx + 1
        self.decoder.layers = self.decoder.layers[:keep]
        self.dec_score_head = nn.ModuleList(
            [nn.Identity()] * self.eval_idx + [self.dec_score_head[self.eval_idx]]
        )
        self.dec_bbox_head = self.dec_bbox_head[:keep]

    def _run_layers(self, target, ref_logits, memory, spatial_shapes, attn_mask):
        """The refinement loop: per kept layer boxes (B, Q, 4) and logits (B, Q, classes), stacked on dim 0.

        The next layer's reference is this layer's box, detached. A returned box of layer i > 0 is the same
        value computed from the previous layer's box with its gradient kept, as the reference trains.
        """
        output = target
        ref_boxes = F.sigmoid(ref_logits)  # (B, Q, 4), detached
        ref_with_grad = None
        boxes, logits = [], []
        for i, layer in enumerate(self.decoder.layers):
            query_pos = self.query_pos_head(ref_boxes)
            output = layer(output, ref_boxes.unsqueeze(2), memory, spatial_shapes, attn_mask, query_pos)
            delta = self.dec_bbox_head[i](output)
            new_boxes = F.sigmoid(delta + inverse_sigmoid(ref_boxes))
            if self.training:
                logits.append(self.dec_score_head[i](output))
                boxes.append(new_boxes if i == 0 else F.sigmoid(delta + inverse_sigmoid(ref_with_grad)))
            elif i == self.eval_idx:
                logits.append(self.dec_score_head[i](output))
                boxes.append(new_boxes)
                break
            ref_with_grad = new_boxes
            ref_boxes = new_boxes.detach()
        return torch.stack(boxes), torch.stack(logits)

    def forward(self, feats: list[torch.Tensor], targets: list[dict] | None = None) -> dict:
        memory, spatial_shapes = self._flatten_memory(feats)
        dn_queries, dn_ref_logits, attn_mask, dn_meta = self._denoising_queries(targets)
        target, ref_logits, enc_boxes, enc_logits = self._select_queries(memory, spatial_shapes)
        if dn_meta is not None:  # denoising queries go first
            target = torch.cat([dn_queries, target], dim=1)
            ref_logits = torch.cat([dn_ref_logits, ref_logits], dim=1)
        boxes, logits = self._run_layers(target, ref_logits, memory, spatial_shapes, attn_mask)
        if not self.training:
            return {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}

        if dn_meta is not None:
            dn_logits, negative_logits, logits = split_denoising(logits, dn_meta, dim=2)
            dn_boxes, negative_boxes, boxes = split_denoising(boxes, dn_meta, dim=2)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = _layer_outputs(logits[:-1], boxes[:-1])
            out["enc_aux_outputs"] = [{"pred_logits": enc_logits, "pred_boxes": enc_boxes}]
            out["enc_meta"] = {"class_agnostic": False}
            if dn_meta is not None:
                out["dn_outputs"] = _layer_outputs(dn_logits, dn_boxes)
                out["dn_meta"] = dn_meta
                if negative_logits is not None:  # background negatives: classification loss only
                    out["dn_negative_outputs"] = _layer_outputs(negative_logits, negative_boxes)
        return out


def _layer_outputs(logits: torch.Tensor, boxes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """(layers, B, Q, ...) stacks -> per-layer {"pred_logits", "pred_boxes"} dicts (deep supervision)."""
    return [
        {"pred_logits": layer_logits, "pred_boxes": layer_boxes}
        for layer_logits, layer_boxes in zip(logits, boxes)
    ]
