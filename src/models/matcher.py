"""One-to-one Hungarian matching of predictions to ground truth, as D-FINE and DETR train with it.

The cost of giving ground-truth j to query i is
    cost_class * class_cost(i, label_j) + cost_bbox * L1(box_i, box_j) + cost_giou * -GIoU(box_i, box_j)
and scipy's linear_sum_assignment picks the cheapest one-to-one assignment per image. The class cost is
D-FINE's focal-flavoured one on sigmoid scores (class_cost="focal"), or DETR's -softmax probability of the
target class over classes + "no object" (class_cost="softmax").

Segmentation models can add a mask cost (cost_mask > 0, train.mask_loss.matcher_cost), Mask2Former's:
    cost_mask * (BCE(mask_i, mask_j) + dice(mask_i, mask_j))
on MATCHER_POINTS random locations shared by every (query, object) pair of an image. It applies only to
outputs that carry "pred_masks" (the last decoder layer): earlier layers, encoder proposals and denoising
stay box-only. Objects without a mask ("has_mask" False) get mask cost 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from src.common.boxes import cxcywh_to_xyxy, generalized_box_iou
from src.models.mask_loss import point_sample

MatchIndices = list[tuple[torch.Tensor, torch.Tensor]]  # per image: (query indices, target indices), int64
# Mask2Former samples 12544 points for its matcher; matching needs ranks, not a loss value, and the cost
# is (Q x n) pairs per image: 1024 points keep it cheap (capped at the mask-logit pixel count).
MATCHER_POINTS = 1024
CLASS_COSTS = ("focal", "softmax")


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
        cost_mask: float = 0.0,
        class_cost: str = "focal",
    ):
        super().__init__()
        if class_cost not in CLASS_COSTS:
            raise ValueError(f"HungarianMatcher: class_cost must be one of {CLASS_COSTS}, got {class_cost!r}")
        self.class_cost = class_cost
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError(
                "HungarianMatcher: at least one of cost_class, cost_bbox, cost_giou must be non-zero"
            )
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        if not cost_mask >= 0:
            raise ValueError(f"HungarianMatcher: cost_mask must be >= 0, got {cost_mask}")
        self.alpha, self.gamma = alpha, gamma
        self.cost_mask = float(cost_mask)  # 0: box-only matching, bit for bit

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> MatchIndices:
        """outputs: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) cxcywh; targets: per image "labels" (n,),
        "boxes" (n, 4) cxcywh. With cost_mask > 0 and "pred_masks" (B, Q, h, w) in outputs, also "masks"
        (n, H, W) and optionally "has_mask" (n,) bool. Returns per image (query idx, target idx), min(Q, n)
        pairs, on the logits' device."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]  # (B, Q, C), (B, Q, 4)
        device, (batch, queries) = logits.device, logits.shape[:2]
        sizes = [len(target["labels"]) for target in targets]
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return [(empty, empty.clone()) for _ in targets]
        # Every query against every object of the batch at once (one cost call instead of one per image);
        # image i's block is its own queries' rows and its own objects' columns.
        labels = torch.cat([target["labels"] for target in targets])
        target_boxes = torch.cat([target["boxes"] for target in targets])
        cost = self.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), labels, target_boxes)
        blocks = list(cost.view(batch, queries, -1).split(sizes, dim=-1))  # per image (B, Q, n_i)
        blocks = [block[image] for image, block in enumerate(blocks)]  # (Q, n_i)
        if self.cost_mask > 0 and "pred_masks" in outputs:
            for image, target in enumerate(targets):
                if sizes[image] and "masks" in target:
                    mask = mask_cost(outputs["pred_masks"][image], target)
                    blocks[image] = blocks[image] + self.cost_mask * mask
        on_host = torch.cat([torch.nan_to_num(b, nan=1.0).flatten() for b in blocks]).cpu().numpy()
        offsets = np.cumsum([0] + [queries * n for n in sizes])
        return [
            _assign(on_host[start:end].reshape(queries, n), device)
            for start, end, n in zip(offsets[:-1], offsets[1:], sizes)
        ]

    def cost_matrix(
        self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, target_boxes: torch.Tensor
    ) -> torch.Tensor:
        """logits (Q, C) (softmax: C = classes + 1), boxes (Q, 4), labels (n,), target_boxes (n, 4) -> (Q, n)."""
        if self.class_cost == "softmax":
            cost_class = -logits.softmax(-1)[:, labels]  # (Q, n)
        else:
            prob = logits.sigmoid()[:, labels]  # (Q, n)
            # Focal-loss flavoured: how much cheaper the positive focal term is than the negative one.
            negative = (1 - self.alpha) * (prob**self.gamma) * (-(1 - prob + 1e-8).log())
            positive = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
            cost_class = positive - negative
        cost_bbox = torch.cdist(boxes, target_boxes.to(boxes.dtype), p=1)
        cost_giou = -generalized_box_iou(corners(boxes), corners(target_boxes.to(boxes.dtype)))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou


def mask_cost(pred_masks: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
    """pred_masks (Q, h, w) logits, target "masks" (n, H, W) (+ "has_mask" (n,)) -> BCE + dice cost (Q, n),
    both on the same random points for every pair (Mask2Former's batch_sigmoid_ce / batch_dice costs)."""
    masks = target["masks"].to(pred_masks.device)
    num_points = min(MATCHER_POINTS, pred_masks.shape[-2] * pred_masks.shape[-1])
    coords = torch.rand(1, num_points, 2, device=pred_masks.device)  # (1, P, 2), shared by all pairs
    logits = point_sample(pred_masks.unsqueeze(0).float(), coords)[0]  # (Q, P)
    truth = point_sample(masks.unsqueeze(0).float(), coords)[0]  # (n, P) in [0, 1]
    # BCE of every query against every object: softplus(-x) where the target is 1, softplus(x) where 0.
    bce = (F.softplus(-logits) @ truth.T + F.softplus(logits) @ (1 - truth).T) / num_points
    prob = logits.sigmoid()
    dice = 1 - (2 * prob @ truth.T + 1) / (prob.sum(1, keepdim=True) + truth.sum(1)[None, :] + 1)
    cost = bce + dice  # (Q, n)
    if "has_mask" in target:  # box-only objects: matched on boxes and class alone
        cost = cost * target["has_mask"].to(cost.device, cost.dtype)[None, :]
    return cost.to(pred_masks.dtype)


def _assign(cost: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The cheapest one-to-one (query, object) pairs of one image's cost (Q, n): scipy for n > 1; with one
    object the cheapest query, with none nothing (the same pairs scipy gives, without calling it)."""
    if cost.shape[1] <= 1:
        rows = np.argmin(cost, axis=0) if cost.shape[1] else np.zeros(0, np.int64)
        cols = np.arange(cost.shape[1])
    else:
        rows, cols = linear_sum_assignment(cost)
    return (
        torch.as_tensor(rows, dtype=torch.int64, device=device),
        torch.as_tensor(cols, dtype=torch.int64, device=device),
    )
