"""What a detector's forward returns: typed dicts, one field per output, shapes documented.

Every family's model returns `DetectorOutputs` (a plain dict at run time: export traces it, the criterion,
the matcher and the postprocessor index it by key). Shapes use B = batch, Q = object queries, C = classes
(DETR's softmax head adds one "no object" column: C + 1), L = decoder layers, R = reg_max (D-FINE's bins
per box edge), G = denoising queries (groups x boxes, negatives apart), H x W = the network input.

Boxes are always normalised (cx, cy, w, h) in [0, 1] of the network input; logits are raw (sigmoid or
softmax is the postprocessor's and the loss's business).

Eval mode returns only the top-level prediction fields (`pred_logits`, `pred_boxes`, and `pred_masks` for a
segmentation model); training adds what the criterion needs for deep supervision and denoising.
"""

from __future__ import annotations

from typing import TypedDict

import torch


class LayerOutputs(TypedDict, total=False):
    """One decoder layer's (or the encoder's, or the first layer's "pre") predictions."""

    pred_logits: torch.Tensor  # (B, Q, C) class logits
    pred_boxes: torch.Tensor  # (B, Q, 4) normalised cxcywh
    pred_corners: torch.Tensor  # (B, Q, 4 * (R + 1)) D-FINE: per-edge distribution logits (FDR)
    ref_points: torch.Tensor  # (B, Q, 4) D-FINE: the fixed reference box of FDR, normalised cxcywh
    teacher_corners: torch.Tensor  # (B, Q, 4 * (R + 1)) D-FINE: the last layer's corners (GO-LSD teacher)
    teacher_logits: torch.Tensor  # (B, Q, C) D-FINE: the last layer's class logits (GO-LSD teacher)


class DenoisingMeta(TypedDict, total=False):
    """How the denoising queries prepended in training map to the targets (src/models/denoising.py)."""

    dn_positive_idx: tuple[torch.Tensor, ...] | None  # per image (n_i * groups,) int64 query indices
    dn_num_group: int  # denoising groups (0: none)
    dn_num_split: list[int]  # [G + negatives, Q]: how the decoder's queries split
    dn_num_negatives: int  # background negative queries after the groups (0: none)
    dn_negative_valid: torch.Tensor | None  # (B, negatives) bool: negatives that are far from every box


class DetectorOutputs(TypedDict, total=False):
    """The forward's output of every family (src/models/family.py): eval mode has the first three fields."""

    pred_logits: torch.Tensor  # (B, Q, C) class logits of the last (eval) decoder layer
    pred_boxes: torch.Tensor  # (B, Q, 4) normalised cxcywh of the last (eval) decoder layer
    pred_masks: torch.Tensor  # (B, Q, H/4, W/4) mask logits (segment; > MASK_LOGIT_THRESHOLD: inside)
    # --- training only (deep supervision, denoising, FDR)
    pred_corners: torch.Tensor  # (B, Q, 4 * (R + 1)) D-FINE: last layer's distribution logits
    ref_points: torch.Tensor  # (B, Q, 4) D-FINE: last layer's FDR reference box
    up: torch.Tensor  # () D-FINE: FDR weighting-function scale
    reg_scale: torch.Tensor  # () D-FINE: FDR weighting-function curvature
    query_features: torch.Tensor  # (B, Q, D) eval-layer query embeddings the mask head reads
    aux_outputs: list[LayerOutputs]  # L - 1 entries: every decoder layer before the last
    pre_outputs: LayerOutputs  # D-FINE: layer 0's direct box ("pre" box) and its logits
    enc_aux_outputs: list[LayerOutputs]  # the encoder's query-selection proposals (B, Q, ...)
    enc_meta: dict  # {"class_agnostic": bool}: whether the encoder proposals are scored without classes
    dn_outputs: list[LayerOutputs]  # L entries over the G denoising queries (B, G, ...)
    dn_pre_outputs: LayerOutputs  # D-FINE: the "pre" box of the denoising queries
    dn_meta: DenoisingMeta
    dn_negative_outputs: list[LayerOutputs]  # L entries over the negatives: logits and boxes only
    dn_negative_pre_outputs: LayerOutputs  # the negatives' "pre" box and logits
