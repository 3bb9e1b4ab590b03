"""Contrastive denoising (CDN) query groups for D-FINE training (the DN-DETR / DINO recipe as D-FINE uses it).

Every ground-truth box is copied into `num_group` groups. Each group has a positive half (box jittered
by less than half its size, label sometimes flipped) that must reconstruct the ground truth, and a
negative half (jittered by one to two half-sizes) that must be classified as background. The decoder
runs these queries next to the ordinary ones; an attention mask keeps the ordinary queries from seeing
the answers and keeps the groups from seeing each other.

The random draws happen in the same order and on the same shapes as the official implementation, so
with the same seed both produce the same groups.
"""

from __future__ import annotations

import torch
from torch import nn

from src.common.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from src.d_fine.fdr import inverse_sigmoid


def get_contrastive_denoising_training_group(
    targets: list[dict[str, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
):
    """Build the denoising queries for one batch.

    targets: per image {"labels": int64 (n,), "boxes": normalised cxcywh (n, 4)}.
    class_embed: embedding with num_classes + 1 rows (the last one is the padding "no object" class).

    Returns (input_query_class (B, num_dn, hidden), input_query_bbox_unact (B, num_dn, 4) as logits,
    attn_mask (num_dn + num_queries, num_dn + num_queries) bool with True = may NOT attend,
    dn_meta {"dn_positive_idx": tuple of (n_i * num_group,) int64, "dn_num_group", "dn_num_split"}).
    With denoising off all four are None; with no box in the batch the three tensors are None and
    dn_meta says there are 0 denoising queries.
    """
    if num_denoising <= 0:
        return None, None, None, None

    num_gts = [len(t["labels"]) for t in targets]
    max_gt = max(num_gts)
    device = targets[0]["labels"].device
    if max_gt == 0:
        return (
            None,
            None,
            None,
            {"dn_positive_idx": None, "dn_num_group": 0, "dn_num_split": [0, num_queries]},
        )

    num_group = max(num_denoising // max_gt, 1)
    box_dtype = targets[0]["boxes"].dtype if torch.is_floating_point(targets[0]["boxes"]) else torch.float32

    labels, boxes, is_real = _pad_targets(targets, max_gt, num_classes, box_dtype, device)  # (B, max_gt[, 4])
    # Layout of one group along the query axis: [max_gt positives | max_gt negatives], repeated num_group times.
    labels = labels.tile([1, 2 * num_group])  # (B, num_dn)
    boxes = boxes.tile([1, 2 * num_group, 1])  # (B, num_dn, 4)
    is_real = is_real.tile([1, 2 * num_group])  # (B, num_dn)
    is_negative = torch.zeros([len(targets), 2 * max_gt, 1], dtype=box_dtype, device=device)
    is_negative[:, max_gt:] = 1
    is_negative = is_negative.tile([1, num_group, 1])  # (B, num_dn, 1)

    positive = (1 - is_negative).squeeze(-1) * is_real  # (B, num_dn)
    # Query index of every real positive, per image, in (group, gt) order: what the criterion matches to.
    dn_positive_idx = torch.split(torch.nonzero(positive)[:, 1], [n * num_group for n in num_gts])
    num_dn = 2 * max_gt * num_group

    if label_noise_ratio > 0:
        labels = _flip_labels(labels, is_real, num_classes, label_noise_ratio)
    if box_noise_scale > 0:
        boxes = _jitter_boxes(boxes, is_negative, box_noise_scale)

    attn_mask = denoising_attention_mask(max_gt, num_group, num_queries, device)
    dn_meta = {
        "dn_positive_idx": dn_positive_idx,
        "dn_num_group": num_group,
        "dn_num_split": [num_dn, num_queries],
    }
    return class_embed(labels), inverse_sigmoid(boxes), attn_mask, dn_meta


def _pad_targets(targets, max_gt, num_classes, box_dtype, device):
    """Stack per-image targets to (B, max_gt): padding slots get class `num_classes` and a zero box."""
    batch = len(targets)
    labels = torch.full([batch, max_gt], num_classes, dtype=torch.int32, device=device)
    boxes = torch.zeros([batch, max_gt, 4], dtype=box_dtype, device=device)
    is_real = torch.zeros([batch, max_gt], dtype=torch.bool, device=device)
    for i, target in enumerate(targets):
        n = len(target["labels"])
        if n > 0:
            labels[i, :n] = target["labels"]
            boxes[i, :n] = target["boxes"]
            is_real[i, :n] = True
    return labels, boxes, is_real


def _flip_labels(labels: torch.Tensor, is_real: torch.Tensor, num_classes: int, ratio: float) -> torch.Tensor:
    """Replace each real label by a uniformly random class with probability ratio / 2."""
    flip = torch.rand_like(labels, dtype=torch.float) < (ratio * 0.5)
    random_labels = torch.randint_like(flip, 0, num_classes, dtype=labels.dtype)
    return torch.where(flip & is_real, random_labels, labels)


def _jitter_boxes(boxes: torch.Tensor, is_negative: torch.Tensor, scale: float) -> torch.Tensor:
    """Move every edge by a random fraction of half the box size: < 1 for positives, in [1, 2) for negatives.

    boxes (B, num_dn, 4) cxcywh, is_negative (B, num_dn, 1) -> jittered cxcywh boxes inside [0, 1].
    """
    corners = cxcywh_to_xyxy(boxes)
    half_size = torch.tile(boxes[..., 2:] * 0.5, [1, 1, 2]) * scale  # (B, num_dn, 4): w/2, h/2, w/2, h/2
    sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
    fraction = torch.rand_like(boxes)
    fraction = (fraction + 1.0) * is_negative + fraction * (1 - is_negative)
    corners = torch.clip(corners + sign * fraction * half_size, min=0.0, max=1.0)
    jittered = xyxy_to_cxcywh(corners)
    # Negatives can move x1 past x2; a flipped box keeps its absolute size.
    jittered[jittered < 0] *= -1
    return jittered


def denoising_attention_mask(max_gt: int, num_group: int, num_queries: int, device=None) -> torch.Tensor:
    """(num_dn + num_queries)^2 bool, True = blocked: matching queries can't see any denoising query,
    and each denoising group sees only itself (and the matching queries)."""
    group_size = 2 * max_gt
    num_dn = group_size * num_group
    group_of = torch.arange(num_dn, device=device) // group_size  # (num_dn,)
    mask = torch.zeros([num_dn + num_queries, num_dn + num_queries], dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True
    mask[:num_dn, :num_dn] = group_of[:, None] != group_of[None, :]
    return mask
