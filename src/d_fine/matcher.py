"""One-to-one Hungarian matching of predictions to ground truth, as D-FINE trains with it.

The cost of giving ground-truth j to query i is
    cost_class * focal_cost(p_i[label_j]) + cost_bbox * L1(box_i, box_j) + cost_giou * -GIoU(box_i, box_j)
and scipy's linear_sum_assignment picks the cheapest one-to-one assignment per image.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from src.common.boxes import cxcywh_to_xyxy, generalized_box_iou

MatchIndices = list[tuple[torch.Tensor, torch.Tensor]]  # per image: (query indices, target indices), int64


def corners(boxes: torch.Tensor) -> torch.Tensor:
    """cxcywh -> xyxy with negative sizes treated as 0 (a decoder's box can turn inside out early in
    training; the official box conversion clamps the same way, so GIoU stays defined)."""
    return cxcywh_to_xyxy(torch.cat([boxes[..., :2], boxes[..., 2:].clamp(min=0.0)], dim=-1))


class HungarianMatcher(nn.Module):
    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError(
                "HungarianMatcher: at least one of cost_class, cost_bbox, cost_giou must be non-zero"
            )
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> MatchIndices:
        """outputs: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) cxcywh; targets: per image "labels" (n,),
        "boxes" (n, 4) cxcywh. Returns per image (query idx, target idx), min(Q, n) pairs, on the logits' device."""
        device = outputs["pred_logits"].device
        indices = []
        for logits, boxes, target in zip(outputs["pred_logits"], outputs["pred_boxes"], targets):
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64, device=device)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits, boxes, target["labels"], target["boxes"])  # (Q, n)
            rows, cols = linear_sum_assignment(torch.nan_to_num(cost, nan=1.0).cpu().numpy())
            indices.append(
                (
                    torch.as_tensor(rows, dtype=torch.int64, device=device),
                    torch.as_tensor(cols, dtype=torch.int64, device=device),
                )
            )
        return indices

    def cost_matrix(
        self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, target_boxes: torch.Tensor
    ) -> torch.Tensor:
        """logits (Q, C), boxes (Q, 4), labels (n,), target_boxes (n, 4) -> cost (Q, n)."""
        prob = logits.sigmoid()[:, labels]  # (Q, n)
        # Focal-loss flavoured class cost: how much cheaper the positive focal term is than the negative one.
        negative = (1 - self.alpha) * (prob**self.gamma) * (-(1 - prob + 1e-8).log())
        positive = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
        cost_class = positive - negative
        cost_bbox = torch.cdist(boxes, target_boxes.to(boxes.dtype), p=1)
        cost_giou = -generalized_box_iou(corners(boxes), corners(target_boxes.to(boxes.dtype)))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
