"""DETR's training loss: the official SetCriterion's terms, weights and matching, in our own code.

Per decoder output ("head") with its own Hungarian matching (class cost = -softmax probability of the
target class, plus L1 and GIoU box costs):
  loss_ce    cross-entropy over classes + "no object", every unmatched query's target being "no object",
             whose weight is eos_coef (0.1) so the many empty queries do not swamp the few objects
  loss_bbox  L1 between matched boxes (normalised cxcywh), summed over boxes / number of objects
  loss_giou  1 - GIoU between matched boxes, likewise
Suffixes: none = last decoder layer, _0 .. _4 = earlier layers (auxiliary losses).
Returns the weighted terms; their sum is the training loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.common.boxes import cxcywh_to_xyxy, generalized_box_iou
from src.models.matcher import HungarianMatcher, MatchIndices

# The official defaults (facebookresearch/detr main.py).
DEFAULT_LOSS_WEIGHTS = {"ce": 1.0, "bbox": 5.0, "giou": 2.0}
DEFAULT_MATCHER_COSTS = {"class": 1.0, "bbox": 5.0, "giou": 2.0}
EOS_COEF = 0.1


class DetrCriterion(nn.Module):
    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        loss_weights: dict[str, float] | None = None,
        eos_coef: float = EOS_COEF,
    ):
        super().__init__()
        self.num_classes, self.matcher, self.eos_coef = num_classes, matcher, float(eos_coef)
        self.loss_weights = dict(DEFAULT_LOSS_WEIGHTS if loss_weights is None else loss_weights)

    def forward(self, outputs: dict, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """outputs: the model's train-mode dict; targets: per image "labels" (n,) int64 and "boxes" (n, 4)
        normalised cxcywh."""
        num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
        heads = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        losses = {}
        for suffix, head in heads:
            match = self.matcher(head, targets)
            for name, value in self.head_losses(head, targets, match, num_boxes).items():
                losses[f"loss_{name}{suffix}"] = self.loss_weights[name] * value
        return losses

    def head_losses(
        self, head: dict, targets: list[dict[str, torch.Tensor]], match: MatchIndices, num_boxes: int
    ) -> dict[str, torch.Tensor]:
        logits, boxes = head["pred_logits"], head["pred_boxes"]  # (B, Q, classes + 1), (B, Q, 4)
        image = torch.cat([torch.full_like(queries, i) for i, (queries, _) in enumerate(match)])
        query = torch.cat([queries for queries, _ in match])
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, match)])
        matched_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, match)]).to(boxes.dtype)

        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[image, query] = matched_labels.to(logits.device)
        class_weight = torch.ones(self.num_classes + 1, dtype=logits.dtype, device=logits.device)
        class_weight[-1] = self.eos_coef
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, class_weight)

        predicted = boxes[image, query]  # (N, 4)
        loss_bbox = F.l1_loss(predicted, matched_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(predicted), cxcywh_to_xyxy(matched_boxes)))
        return {"ce": loss_ce, "bbox": loss_bbox, "giou": (1 - giou).sum() / num_boxes}


def build_criterion(
    num_classes: int,
    loss_weights: dict[str, float] | None = None,
    matcher_costs: dict[str, float] | None = None,
    bg_loss_weight: float = 1.0,
) -> DetrCriterion:
    """The official criterion; bg_loss_weight multiplies the "no object" weight (1.0: the official 0.1)."""
    if not bg_loss_weight >= 0:
        raise ValueError(f"bg_loss_weight must be >= 0, got {bg_loss_weight}")
    costs = {**DEFAULT_MATCHER_COSTS, **(matcher_costs or {})}
    matcher = HungarianMatcher(costs["class"], costs["bbox"], costs["giou"], class_cost="softmax")
    return DetrCriterion(num_classes, matcher, loss_weights, EOS_COEF * bg_loss_weight)
