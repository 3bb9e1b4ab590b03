"""Mask loss of a segmentation model: BCE + dice on sampled points, for matched queries only.

As in Mask2Former (and Mask DINO / D-FINE-seg after it), the loss is not computed on whole masks but on
`points` locations per matched query, so its memory stays flat whatever the input size:
  - `points * oversample_ratio` random locations are scored by how uncertain the prediction is there
    (-|logit|, i.e. closest to the 0.5 boundary);
  - the `importance_sample_ratio` share of `points` are the most uncertain of them, the rest are uniform;
  - prediction (low resolution logits) and target (input resolution masks) are both read at those
    locations by bilinear `grid_sample`, so the target keeps its full resolution.
`points` is capped at the number of mask-logit pixels: a small input has fewer pixels than the default
12544 (= 112 x 112, Mask2Former's) and more samples than pixels would add no information.

Targets: per image "masks" (n, H, W) bool/uint8/float at the network input size and optionally
"has_mask" (n,) bool; an object whose flag is False (a box-only label) and an image without "masks" get
no mask loss, only the box and class losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MatchIndices = list[tuple[torch.Tensor, torch.Tensor]]  # per image: (query indices, target indices)


@dataclass(frozen=True)
class MaskLossSettings:
    """train.mask_loss in config.yaml (the defaults live there)."""

    bce: float  # weight of the point-sampled binary cross-entropy
    dice: float  # weight of the point-sampled dice loss
    points: int  # sampled points per matched query (capped at the mask-logit pixel count)
    oversample_ratio: float  # candidates per point for the uncertainty ranking (>= 1)
    importance_sample_ratio: float  # share of points taken from the most uncertain candidates

    def __post_init__(self) -> None:
        if self.points < 1 or self.oversample_ratio < 1 or not 0 <= self.importance_sample_ratio <= 1:
            raise ValueError(
                "mask loss needs points >= 1, oversample_ratio >= 1, importance_sample_ratio in [0, 1], "
                f"got {self}"
            )


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """maps (N, C, H, W), coords (N, P, 2) normalised (x, y) in [0, 1] -> bilinear values (N, C, P)."""
    grid = 2.0 * coords.unsqueeze(2) - 1.0  # (N, P, 1, 2) in grid_sample's [-1, 1]
    # "border": a point near the edge reads the edge pixels, not a blend with zeros outside the map.
    return F.grid_sample(maps, grid.to(maps.dtype), padding_mode="border", align_corners=False).squeeze(3)


@torch.no_grad()
def uncertain_points(logits: torch.Tensor, settings: MaskLossSettings, num_points: int) -> torch.Tensor:
    """logits (N, 1, h, w) -> coords (N, num_points, 2): the most uncertain of oversampled random
    locations plus uniformly random ones."""
    count = logits.shape[0]
    candidates = torch.rand(count, int(num_points * settings.oversample_ratio), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # (N, candidates)
    num_uncertain = int(settings.importance_sample_ratio * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices  # (N, k)
    chosen = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    uniform = torch.rand(count, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([chosen, uniform], dim=1)


def matched_masks(
    pred_masks: torch.Tensor, targets: list[dict[str, torch.Tensor]], match: MatchIndices
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted logits (N, h, w) and target masks (N, H, W) of the matched queries whose object has a mask."""
    preds, masks = [], []
    for image, (queries, target_idx) in enumerate(match):
        target = targets[image]
        if "masks" not in target or len(target_idx) == 0:
            continue
        target_idx = target_idx.to(target["masks"].device)
        if "has_mask" in target:  # box-only objects: no mask loss
            keep = target["has_mask"].to(target_idx.device)[target_idx].bool()
            queries, target_idx = queries[keep.to(queries.device)], target_idx[keep]
        preds.append(pred_masks[image, queries.to(pred_masks.device)])
        masks.append(target["masks"][target_idx])
    if not preds:
        return pred_masks[:0, 0], pred_masks.new_zeros(0, 1, 1)
    return torch.cat(preds), torch.cat(masks).to(pred_masks.device)


def mask_losses(
    pred_masks: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    match: MatchIndices,
    settings: MaskLossSettings,
) -> dict[str, torch.Tensor]:
    """pred_masks (B, Q, h, w) logits -> weighted {"loss_mask_bce", "loss_mask_dice"}, each a sum over
    matched objects with a mask, divided by their number (at least 1)."""
    preds, masks = matched_masks(pred_masks, targets, match)  # (N, h, w), (N, H, W)
    if len(preds) == 0:  # nothing to learn from; zero terms that still depend on the output (DDP)
        zero = pred_masks.sum() * 0
        return {"loss_mask_bce": zero, "loss_mask_dice": zero.clone()}
    num_points = min(settings.points, pred_masks.shape[-2] * pred_masks.shape[-1])
    preds = preds.unsqueeze(1)  # (N, 1, h, w)
    coords = uncertain_points(preds.detach(), settings, num_points)  # (N, P, 2)
    target_points = point_sample(masks.unsqueeze(1).to(preds.dtype), coords)[:, 0]  # (N, P) in [0, 1]
    pred_points = point_sample(preds, coords)[:, 0]  # (N, P) logits
    count = len(preds)
    bce = F.binary_cross_entropy_with_logits(pred_points, target_points, reduction="none").mean(1)
    prob = pred_points.sigmoid()
    dice = 1 - (2 * (prob * target_points).sum(1) + 1) / (prob.sum(1) + target_points.sum(1) + 1)
    return {
        "loss_mask_bce": bce.sum() / count * settings.bce,
        "loss_mask_dice": dice.sum() / count * settings.dice,
    }
