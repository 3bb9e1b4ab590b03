"""Contrastive denoising (CDN) query groups for D-FINE training (the DN-DETR / DINO recipe as D-FINE uses it).

Every ground-truth box is copied into `num_group` groups. Each group has a positive half (box jittered
by less than half its size, label sometimes flipped) that must reconstruct the ground truth, and a
negative half (jittered by one to two half-sizes) that must be classified as background. The decoder
runs these queries next to the ordinary ones; an attention mask keeps the ordinary queries from seeing
the answers and keeps the groups from seeing each other.

The random draws happen in the same order and on the same shapes as the official implementation, so
with the same seed both produce the same groups.

Background negatives (off by default; not in the official recipe): per image up to `num_negatives` random
boxes that overlap no ground truth above `negative_iou_thresh`, appended after the groups as one more
block of denoising queries. Their target is "no object", and the criterion uses them only in the
classification loss: they teach the decoder to score empty places low, which is where a small fine-tuning
set leaves pretrained queries firing on non-target objects. They also work on batches without any box.
Their content is the embedding of a random real class (not the zero padding row): a query whose content
alone said "I am a negative" could be scored low without looking at the image at all.
Layout along the query axis: [group 0 | group 1 | ... | negatives | matching queries].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from src.common.boxes import box_iou, cxcywh_to_xyxy, xyxy_to_cxcywh
from src.common.errors import ConfigError
from src.models.layers import inverse_sigmoid

# Background negatives: box sides (fractions of the image side) and candidates drawn per kept box.
NEGATIVE_MIN_SIZE = 0.02
NEGATIVE_MAX_SIZE = 0.5
NEGATIVE_TRIES = 4


def get_contrastive_denoising_training_group(
    targets: list[dict[str, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
    num_negatives: int = 0,
    negative_iou_thresh: float = 0.3,
):
    """Build the denoising queries for one batch.

    targets: per image {"labels": int64 (n,), "boxes": normalised cxcywh (n, 4)}.
    class_embed: embedding with num_classes + 1 rows (the last one is the padding "no object" class).

    Returns (input_query_class (B, num_dn, hidden), input_query_bbox_unact (B, num_dn, 4) as logits,
    attn_mask (num_dn + num_queries, num_dn + num_queries) bool with True = may NOT attend,
    dn_meta {"dn_positive_idx": tuple of (n_i * num_group,) int64, "dn_num_group", "dn_num_split",
    "dn_num_negatives", "dn_negative_valid": (B, num_negatives) bool or None}).
    num_dn = dn_num_split[0] counts the groups and the negatives. With denoising off all four are None;
    with no box in the batch and no negatives the three tensors are None and dn_meta says there are 0
    denoising queries; with negatives such a batch gets the negatives block alone (0 groups).
    """
    if num_denoising <= 0:
        return None, None, None, None

    num_gts = [len(t["labels"]) for t in targets]
    max_gt = max(num_gts)
    device = targets[0]["labels"].device
    if max_gt == 0:
        if num_negatives > 0:
            return _negatives_only(targets, num_classes, num_queries, class_embed, num_negatives)
        return (
            None,
            None,
            None,
            {
                "dn_positive_idx": None,
                "dn_num_group": 0,
                "dn_num_split": [0, num_queries],
                "dn_num_negatives": 0,
                "dn_negative_valid": None,
            },
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

    dn_positive_idx = positive_query_indices(num_gts, max_gt, num_group, device)
    num_dn = 2 * max_gt * num_group

    if label_noise_ratio > 0:
        labels = _flip_labels(labels, is_real, num_classes, label_noise_ratio)
    if box_noise_scale > 0:
        boxes = _jitter_boxes(boxes, is_negative, box_noise_scale)

    queries, box_logits, valid = class_embed(labels), inverse_sigmoid(boxes), None
    if num_negatives > 0:  # drawn after the groups: the groups stay those of the official recipe
        neg_queries, neg_logits, valid = _negative_queries(
            targets, num_classes, class_embed, num_negatives, negative_iou_thresh, box_dtype
        )
        queries = torch.cat([queries, neg_queries], dim=1)
        box_logits = torch.cat([box_logits, neg_logits], dim=1)

    attn_mask = denoising_attention_mask(max_gt, num_group, num_queries, device, num_negatives)
    dn_meta = {
        "dn_positive_idx": dn_positive_idx,
        "dn_num_group": num_group,
        "dn_num_split": [num_dn + num_negatives, num_queries],
        "dn_num_negatives": num_negatives,
        "dn_negative_valid": valid,
    }
    return queries, box_logits, attn_mask, dn_meta


def _negatives_only(targets, num_classes, num_queries, class_embed, num_negatives):
    """A batch without boxes: the negatives block is the whole denoising part."""
    device = targets[0]["labels"].device
    box_dtype = targets[0]["boxes"].dtype if torch.is_floating_point(targets[0]["boxes"]) else torch.float32
    # Boxes cannot overlap anything here, so the threshold is irrelevant.
    queries, box_logits, valid = _negative_queries(
        targets, num_classes, class_embed, num_negatives, 1.0, box_dtype
    )
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    dn_meta = {
        "dn_positive_idx": tuple(empty for _ in targets),
        "dn_num_group": 0,
        "dn_num_split": [num_negatives, num_queries],
        "dn_num_negatives": num_negatives,
        "dn_negative_valid": valid,
    }
    attn_mask = denoising_attention_mask(0, 0, num_queries, device, num_negatives)
    return queries, box_logits, attn_mask, dn_meta


def _negative_queries(targets, num_classes, class_embed, num_negatives, iou_thresh, box_dtype):
    """Content (B, N, hidden), box logits (B, N, 4) and validity (B, N) of the background negatives.

    Content: a random real class (see the module docstring); an invalid slot (too few boxes found clear of
    the ground truth) gets the zero padding row and is left out of the loss through `valid`.
    """
    boxes, valid = sample_background_boxes(targets, num_negatives, iou_thresh, dtype=box_dtype)
    device = boxes.device
    labels = torch.randint(0, num_classes, valid.shape, dtype=torch.int32, device=device)
    labels = torch.where(valid, labels, torch.full_like(labels, num_classes))
    return class_embed(labels), inverse_sigmoid(boxes), valid


def sample_background_boxes(
    targets: list[dict[str, torch.Tensor]],
    num: int,
    iou_thresh: float,
    min_size: float = NEGATIVE_MIN_SIZE,
    max_size: float = NEGATIVE_MAX_SIZE,
    tries: int = NEGATIVE_TRIES,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image `num` random boxes whose IoU with every ground-truth box is <= iou_thresh.

    Sides are log-uniform in [min_size, max_size] (fractions of the image side, so small and large
    objects' scales are both covered) and boxes lie inside the image. `tries * num` candidates are drawn
    per image and the first clear ones kept. Returns boxes (B, num, 4) normalised cxcywh and valid
    (B, num) bool: False where fewer than `num` candidates were clear (an image full of objects); such
    slots hold an arbitrary candidate.
    """
    device = targets[0]["labels"].device
    batch, candidates = len(targets), tries * num
    log_lo, log_hi = math.log(min_size), math.log(max_size)
    sizes = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(batch, candidates, 2, device=device))
    top_left = torch.rand(batch, candidates, 2, device=device) * (1 - sizes)
    corners = torch.cat([top_left, top_left + sizes], dim=-1).to(dtype)  # (B, candidates, 4) xyxy
    clear = torch.ones(batch, candidates, dtype=torch.bool, device=device)
    for i, target in enumerate(targets):
        if len(target["boxes"]):
            gt = cxcywh_to_xyxy(target["boxes"].to(device, dtype))
            clear[i] = box_iou(corners[i], gt)[0].max(dim=1).values <= iou_thresh
    # Clear candidates first (stable: in drawing order), then the first `num` of them.
    order = torch.argsort((~clear).to(torch.int8), dim=1, stable=True)[:, :num]
    chosen = corners.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))
    return xyxy_to_cxcywh(chosen), clear.gather(1, order)


def positive_query_indices(
    num_gts: list[int], max_gt: int, num_group: int, device=None
) -> tuple[torch.Tensor, ...]:
    """Query index of every real positive, per image, in (group, gt) order: what the criterion matches to.

    Group g's positives sit at g * 2 * max_gt + [0, n_i); computed from the counts rather than with
    nonzero() on a mask (same indices; no data-dependent shape for torch.compile). Per image (n_i * num_group,).
    """
    group_starts = torch.arange(num_group, device=device)[:, None] * (2 * max_gt)  # (num_group, 1)
    return tuple((group_starts + torch.arange(n, device=device)[None, :]).flatten() for n in num_gts)


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
    # Negatives can move x1 past x2; a flipped box keeps its absolute size. abs(), not a masked in-place
    # flip: the same values without a data-dependent shape (torch.compile breaks its graph on those).
    return jittered.abs()


def denoising_attention_mask(
    max_gt: int, num_group: int, num_queries: int, device=None, num_negatives: int = 0
) -> torch.Tensor:
    """(num_dn + num_queries)^2 bool, True = blocked: matching queries can't see any denoising query,
    and each denoising group sees only itself (and the matching queries). The negatives block (after the
    groups) is one more such group: it sees itself and the matching queries, and no group sees it."""
    group_size = 2 * max_gt
    num_grouped = group_size * num_group
    num_dn = num_grouped + num_negatives
    # Block id of every denoising query: its group, or num_group for the negatives.
    group_of = torch.full([num_dn], num_group, dtype=torch.int64, device=device)
    if num_grouped:
        group_of[:num_grouped] = torch.arange(num_grouped, device=device) // group_size
    mask = torch.zeros([num_dn + num_queries, num_dn + num_queries], dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True
    mask[:num_dn, :num_dn] = group_of[:, None] != group_of[None, :]
    return mask


def set_denoising_negatives(model: nn.Module, num: int, iou_thresh: float = 0.3) -> None:
    """Turn background negatives on (num > 0) or off (0) for a D-FINE model (or its decoder) in training.

    Plain attributes, not weights: checkpoints and eval outputs do not change. Needs the denoising
    branch (num_denoising > 0): the negatives ride on it.
    """
    decoder = getattr(getattr(model, "module", model), "decoder", model)  # DDP -> DFINE -> decoder
    if num < 0 or not 0.0 <= iou_thresh <= 1.0:
        raise ValueError(
            f"denoising negatives: need num >= 0 and 0 <= iou_thresh <= 1, got {num}, {iou_thresh}"
        )
    if not hasattr(decoder, "num_denoising"):  # a family without a denoising branch (DETR)
        if num > 0:
            raise ConfigError("train.dn_negatives.num > 0 needs a denoising branch, which this model has not")
        return
    if num > 0 and decoder.num_denoising <= 0:
        raise ValueError(
            "denoising negatives need the denoising branch: build the model with num_denoising > 0"
        )
    decoder.num_dn_negatives = int(num)
    decoder.dn_negative_iou_thresh = float(iou_thresh)


def set_denoising_queries(model: nn.Module, num: int) -> None:
    """How many contrastive denoising queries a D-FINE / RT-DETRv2 model (or its decoder) trains with per
    batch (0 = the branch off; the official recipe: 100). num // (most boxes of one image in the batch)
    groups, at least one, each a positive and a negative copy of every box.

    A plain attribute, not a weight: the denoising class embedding stays in the model (and its checkpoints)
    whatever the number, so a model trained with any value loads anywhere.
    """
    decoder = getattr(getattr(model, "module", model), "decoder", model)  # DDP -> DFINE -> decoder
    if num < 0:
        raise ValueError(f"denoising queries: need num >= 0, got {num}")
    if not hasattr(decoder, "num_denoising"):  # a family without a denoising branch (DETR): nothing to set
        return
    if num > 0 and getattr(decoder, "denoising_class_embed", None) is None:
        raise ValueError("denoising queries need a model built with its denoising branch (num_denoising > 0)")
    decoder.num_denoising = int(num)


def split_denoising(
    x: torch.Tensor, dn_meta: dict, dim: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Split decoder outputs along the query axis `dim` into (denoising groups, background negatives or
    None, matching queries), the layout of `get_contrastive_denoising_training_group`."""
    num_dn, num_queries = dn_meta["dn_num_split"]
    negatives = dn_meta["dn_num_negatives"]
    groups, negative, matching = torch.split(x, [num_dn - negatives, negatives, num_queries], dim=dim)
    return groups, negative if negatives else None, matching
