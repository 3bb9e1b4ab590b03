"""D-FINE decoder: query selection, deformable-attention layers and Fine-grained Distribution Refinement.

Flow (shapes for batch B, Q queries, C = hidden_dim, R = reg_max):
1. Encoder maps are flattened into one memory (B, sum(h*w), C). Every memory position has an anchor box
   (its cell centre, size 0.05 * 2^level). A linear+LayerNorm and a class head score every position;
   the top Q become the queries: content = their memory, reference box = anchor + a small MLP delta
   (shared with RT-DETRv2: src/models/query_selection.py).
2. Each decoder layer: self-attention between queries, deformable cross-attention around the current
   box, a gate mixing both, an FFN.
3. Layer 0 also refines the box directly ("pre" box), which becomes the fixed reference of FDR. Every
   layer i predicts 4 x (R+1) bin logits per query, added to layer i-1's logits (residual distribution
   refinement); the expected bin value W(n) moves each edge of the reference box.
4. Class logits come from the layer's class head plus LQE, a small MLP on the top-4 bin probabilities
   (a sharp distribution = a well-localised box = higher score).
In training every layer's output is returned (deep supervision, GO-LSD distillation); in eval only layer
`eval_idx`. Contrastive denoising queries are prepended in training when num_denoising > 0 (optionally
with a block of background negatives, see denoising.py; their outputs come back separately as
"dn_negative_outputs" so that the official "dn_outputs" keep their meaning).

Parameter names follow the reference implementation so its checkpoints load directly.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from src.models.attention import split_value_heads
from src.models.dfine.decoder_layers import LQE, DecoderLayer
from src.models.dfine.fdr import distance2bbox, distribution_to_distance, weighting_function
from src.models.layers import MLP, inverse_sigmoid, prior_bias
from src.models.outputs import DetectorOutputs, LayerOutputs
from src.models.query_selection import QuerySelection


class DecoderStack(nn.Module):
    """The decoder layers and their LQE heads (the heads proper live in DFineDecoder, as in the reference).

    Holds `up` / `reg_scale` (shared with DFineDecoder) because reference checkpoints store them here too.
    """

    def __init__(
        self,
        layer: DecoderLayer,
        wide_layer: DecoderLayer,
        num_layers: int,
        eval_idx: int,
        reg_max: int,
        up: nn.Parameter,
        reg_scale: nn.Parameter,
        lqe_act: str,
    ):
        super().__init__()
        self.eval_idx = eval_idx
        self.reg_max = reg_max
        self.up = up
        self.reg_scale = reg_scale
        self.layers = nn.ModuleList(
            [copy.deepcopy(layer) for _ in range(eval_idx + 1)]
            + [copy.deepcopy(wide_layer) for _ in range(num_layers - eval_idx - 1)]
        )
        self.lqe_layers = nn.ModuleList(LQE(4, 64, 2, reg_max, act=lqe_act) for _ in range(num_layers))

    def project(self) -> torch.Tensor:
        """W(n), (reg_max + 1,): computed from up/reg_scale, or the constant frozen by convert_to_deploy."""
        frozen = getattr(self, "frozen_project", None)
        return frozen if frozen is not None else weighting_function(self.reg_max, self.up, self.reg_scale)

    def convert_to_deploy(self) -> None:
        """Keep only what eval runs: layers up to eval_idx, one LQE head, W(n) as a constant."""
        self.register_buffer(
            "frozen_project",
            weighting_function(self.reg_max, self.up, self.reg_scale).detach(),
            persistent=False,
        )
        self.layers = self.layers[: self.eval_idx + 1]
        self.lqe_layers = nn.ModuleList([nn.Identity()] * self.eval_idx + [self.lqe_layers[self.eval_idx]])


class DFineDecoder(QuerySelection):
    def __init__(
        self,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 300,
        feat_channels: list[int] = (256, 256, 256),
        feat_strides: list[int] = (8, 16, 32),
        num_levels: int = 3,
        num_points: list[int] | int = (3, 6, 3),
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        mlp_act: str = "relu",
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        eval_spatial_size: tuple[int, int] | None = None,
        eval_idx: int = -1,
        eps: float = 1e-2,
        aux_loss: bool = True,
        reg_max: int = 32,
        reg_scale: float = 4.0,
        layer_scale: float = 1,
        num_dn_negatives: int = 0,
        dn_negative_iou_thresh: float = 0.3,
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
            num_dn_negatives,
            dn_negative_iou_thresh,
        )
        self.nhead = nhead
        self.num_layers = num_layers
        self.aux_loss = aux_loss
        self.reg_max = reg_max
        self.layer_scale = layer_scale
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        # True (segmentation models, mask_head.py): also return the query features of the layer whose boxes
        # are "pred_boxes", as "query_features" (B, Q, C). Off: the detection outputs are exactly as before.
        self.return_query_features = False
        scaled_dim = round(layer_scale * hidden_dim)
        num_points = list(num_points) if isinstance(num_points, (list, tuple)) else [num_points] * num_levels

        # FDR constants (not trained): W(n) upper bound factor and curvature.
        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([float(reg_scale)]), requires_grad=False)

        self.input_proj = self._build_input_proj(list(feat_channels))
        layer_args = (hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels, num_points)
        self.decoder = DecoderStack(
            DecoderLayer(*layer_args),
            DecoderLayer(*layer_args, layer_scale=layer_scale),
            num_layers,
            self.eval_idx,
            reg_max,
            self.up,
            self.reg_scale,
            lqe_act=activation,
        )
        if num_denoising > 0:  # row num_classes = padding ("no object")
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])

        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2, act=mlp_act)
        self.enc_output = nn.Sequential(
            OrderedDict([("proj", nn.Linear(hidden_dim, hidden_dim)), ("norm", nn.LayerNorm(hidden_dim))])
        )
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)
        num_wide = num_layers - self.eval_idx - 1
        self.dec_score_head = nn.ModuleList(
            [nn.Linear(hidden_dim, num_classes) for _ in range(self.eval_idx + 1)]
            + [nn.Linear(scaled_dim, num_classes) for _ in range(num_wide)]
        )
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)
        corners = 4 * (reg_max + 1)
        self.dec_bbox_head = nn.ModuleList(
            [MLP(hidden_dim, hidden_dim, corners, 3, act=mlp_act) for _ in range(self.eval_idx + 1)]
            + [MLP(scaled_dim, scaled_dim, corners, 3, act=mlp_act) for _ in range(num_wide)]
        )
        self._reset_parameters(list(feat_channels))

    # ------------------------------------------------------------------ construction helpers
    def _build_input_proj(self, feat_channels: list[int]) -> nn.ModuleList:
        def conv_bn(in_channels: int, kernel: int, stride: int) -> nn.Module:
            if in_channels == self.hidden_dim:
                return nn.Identity()
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

    def _reset_parameters(self, feat_channels: list[int]) -> None:
        bias = prior_bias(0.01)
        nn.init.constant_(self.enc_score_head.bias, bias)
        for head in (self.enc_bbox_head, self.pre_bbox_head):
            nn.init.constant_(head.layers[-1].weight, 0)
            nn.init.constant_(head.layers[-1].bias, 0)
        for score_head, box_head in zip(self.dec_score_head, self.dec_bbox_head):
            nn.init.constant_(score_head.bias, bias)
            nn.init.constant_(box_head.layers[-1].weight, 0)
            nn.init.constant_(box_head.layers[-1].bias, 0)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[1].weight)
        for projection, channels in zip(self.input_proj, feat_channels):
            if channels != self.hidden_dim:
                nn.init.xavier_uniform_(projection[0].weight)

    def convert_to_deploy(self) -> None:
        """Drop the class/box heads eval never runs (the decoder stack drops its own layers)."""
        self.dec_score_head = nn.ModuleList(
            [nn.Identity()] * self.eval_idx + [self.dec_score_head[self.eval_idx]]
        )
        self.dec_bbox_head = nn.ModuleList(
            head if i <= self.eval_idx else nn.Identity() for i, head in enumerate(self.dec_bbox_head)
        )

    def _run_layers(self, target, ref_logits, memory, spatial_shapes, attn_mask):
        """The refinement loop. Returns per kept layer: boxes, logits, corner logits, FDR reference boxes
        (each stacked on dim 0), layer 0's direct boxes and logits ("pre" outputs), and the query features
        (B, Q, C) of the last kept layer (None unless return_query_features)."""
        stack = self.decoder
        project = stack.project()
        value = split_value_heads(memory, self.nhead, spatial_shapes)
        output = target
        ref_boxes = F.sigmoid(ref_logits)  # (B, Q, 4), detached between layers
        previous_output = previous_corners = 0
        boxes, logits, corners, refs = [], [], [], []
        pre_boxes = pre_logits = fdr_ref = features = None
        for i, layer in enumerate(stack.layers):
            query_pos = self.query_pos_head(ref_boxes).clamp(min=-10, max=10)
            if i > self.eval_idx and self.layer_scale > 1:  # wider auxiliary layers: stretch the channels
                query_pos = F.interpolate(query_pos, scale_factor=self.layer_scale)
                value = split_value_heads(
                    F.interpolate(memory, size=query_pos.shape[-1]), self.nhead, spatial_shapes
                )
                output = F.interpolate(output, size=query_pos.shape[-1])
                previous_output = output.detach()

            output = layer(output, ref_boxes.unsqueeze(2), value, spatial_shapes, attn_mask, query_pos)

            if i == 0:  # direct refinement of the selected boxes; the fixed reference for FDR from here on
                pre_boxes = F.sigmoid(self.pre_bbox_head(output) + inverse_sigmoid(ref_boxes))
                pre_logits = self.dec_score_head[0](output) if self.training else None
                fdr_ref = pre_boxes.detach()

            # Residual distribution refinement: this layer's bin logits add to the previous layer's.
            layer_corners = self.dec_bbox_head[i](output + previous_output) + previous_corners
            layer_boxes = distance2bbox(
                fdr_ref, distribution_to_distance(layer_corners, project), self.reg_scale
            )

            if self.training or i == self.eval_idx:
                layer_logits = stack.lqe_layers[i](self.dec_score_head[i](output), layer_corners)
                boxes.append(layer_boxes)
                logits.append(layer_logits)
                corners.append(layer_corners)
                refs.append(fdr_ref)
                if self.return_query_features:
                    features = output
                if not self.training:
                    break

            previous_corners = layer_corners
            ref_boxes = layer_boxes.detach()
            previous_output = output.detach()

        stacked = [torch.stack(x) for x in (boxes, logits, corners, refs)]  # each (layers, B, Q, ...)
        return (*stacked, pre_boxes, pre_logits, features)

    def forward(self, feats: list[torch.Tensor], targets: list[dict] | None = None) -> DetectorOutputs:
        memory, spatial_shapes = self._flatten_memory(feats)

        dn_logits, dn_ref_logits, attn_mask, dn_meta = self._denoising_queries(targets)
        target, ref_logits, enc_boxes, enc_logits = self._select_queries(memory, spatial_shapes)
        if dn_meta is not None:  # denoising queries go first
            target = torch.cat([dn_logits, target], dim=1)
            ref_logits = torch.cat([dn_ref_logits, ref_logits], dim=1)

        boxes, logits, corners, refs, pre_boxes, pre_logits, features = self._run_layers(
            target, ref_logits, memory, spatial_shapes, attn_mask
        )
        if not self.training:
            out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
            return out if features is None else out | {"query_features": features}

        if dn_meta is not None:
            split = dn_meta["dn_num_split"]
            dn_pre_logits, pre_logits = torch.split(pre_logits, split, dim=1)
            dn_pre_boxes, pre_boxes = torch.split(pre_boxes, split, dim=1)
            dn_boxes, boxes = torch.split(boxes, split, dim=2)
            dn_logits_out, logits = torch.split(logits, split, dim=2)
            dn_corners, corners = torch.split(corners, split, dim=2)
            dn_refs, refs = torch.split(refs, split, dim=2)
            if features is not None:  # masks are learnt on the matching queries only
                features = torch.split(features, split, dim=1)[1]
            negatives = dn_meta["dn_num_negatives"]
            if negatives:  # [groups | negatives]: the negatives only feed the classification loss
                grouped = [split[0] - negatives, negatives]
                dn_pre_logits, neg_pre_logits = torch.split(dn_pre_logits, grouped, dim=1)
                dn_pre_boxes, neg_pre_boxes = torch.split(dn_pre_boxes, grouped, dim=1)
                dn_logits_out, neg_logits = torch.split(dn_logits_out, grouped, dim=2)
                dn_boxes, neg_boxes = torch.split(dn_boxes, grouped, dim=2)
                dn_corners = dn_corners[:, :, : grouped[0]]
                dn_refs = dn_refs[:, :, : grouped[0]]

        out = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "pred_corners": corners[-1],
            "ref_points": refs[-1],
            "up": self.up,
            "reg_scale": self.reg_scale,
        }
        if features is not None:
            out["query_features"] = features
        if self.aux_loss:
            out["aux_outputs"] = _layer_outputs(
                logits[:-1], boxes[:-1], corners[:-1], refs[:-1], corners[-1], logits[-1]
            )
            out["enc_aux_outputs"] = [{"pred_logits": enc_logits, "pred_boxes": enc_boxes}]
            out["pre_outputs"] = {"pred_logits": pre_logits, "pred_boxes": pre_boxes}
            out["enc_meta"] = {"class_agnostic": False}
            if dn_meta is not None:
                out["dn_outputs"] = _layer_outputs(
                    dn_logits_out, dn_boxes, dn_corners, dn_refs, dn_corners[-1], dn_logits_out[-1]
                )
                out["dn_pre_outputs"] = {"pred_logits": dn_pre_logits, "pred_boxes": dn_pre_boxes}
                out["dn_meta"] = dn_meta
                if negatives:
                    out["dn_negative_outputs"] = [
                        {"pred_logits": layer_logits, "pred_boxes": layer_boxes}
                        for layer_logits, layer_boxes in zip(neg_logits, neg_boxes)
                    ]
                    out["dn_negative_pre_outputs"] = {
                        "pred_logits": neg_pre_logits,
                        "pred_boxes": neg_pre_boxes,
                    }
        return out


def _layer_outputs(logits, boxes, corners, refs, teacher_corners, teacher_logits) -> list[LayerOutputs]:
    """Per-layer dicts for deep supervision; the last layer is the GO-LSD teacher of all of them."""
    return [
        {
            "pred_logits": layer_logits,
            "pred_boxes": layer_boxes,
            "pred_corners": layer_corners,
            "ref_points": layer_refs,
            "teacher_corners": teacher_corners,
            "teacher_logits": teacher_logits,
        }
        for layer_logits, layer_boxes, layer_corners, layer_refs in zip(logits, boxes, corners, refs)
    ]
