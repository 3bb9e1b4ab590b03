"""One-to-one matching of detections to ground truth: the validator's P/R/F1, confusion matrix and curves use it,
check_errors finds FP/FN with it, export pairs an artifact's detections with the torch model's with it.

Predictions in descending score order each take the unmatched ground-truth box of the same class with the
highest IoU >= iou_thresh (one-to-one). Because matching is greedy by score, the matching at any confidence
threshold is the matching of all predictions restricted to those scoring >= the threshold.

    iou_matrix(boxes_a, boxes_b)                    -> (A, B) IoU of xyxy numpy boxes
    score_order(scores)                             -> indices, highest score first (stable)
    greedy_match(iou, order, allowed, iou_thresh)   -> one-to-one (matched column per row, its IoU)
    match_image(pred, gt, iou_thresh)               -> the class-aware matching of one image
"""

from __future__ import annotations

import numpy as np
import torch

from src.common.boxes import box_iou


def iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(A, B) float64 IoU of xyxy boxes (numpy, any float dtype); 0 where a box is degenerate."""
    if len(boxes_a) == 0 or len(boxes_b) == 0:
        return np.zeros((len(boxes_a), len(boxes_b)))
    as_double = [torch.from_numpy(np.asarray(b, np.float64).reshape(-1, 4)) for b in (boxes_a, boxes_b)]
    iou, _ = box_iou(*as_double)
    return torch.nan_to_num(iou).numpy()


def greedy_match(
    iou: np.ndarray, order: np.ndarray, allowed: np.ndarray, iou_thresh: float
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of predictions (rows, visited in `order`) to ground truth (columns).

    iou and allowed are (P, G); each prediction takes the still unmatched allowed GT with the highest
    IoU >= iou_thresh. Returns matched GT index per prediction (-1: none) and its IoU. Any two box sets
    can be paired this way (export pairs an artifact's detections with the torch model's).
    """
    matched_gt = np.full(iou.shape[0], -1, dtype=np.int64)
    matched_iou = np.zeros(iou.shape[0])
    free = np.ones(iou.shape[1], dtype=bool)
    eligible = allowed & (iou >= iou_thresh)
    has_candidate = eligible.any(axis=1)  # most of a top-300 list overlaps nothing: skip those quickly
    for p in order[has_candidate[order]]:
        candidates = np.where(free & eligible[p], iou[p], -1.0)
        if candidates.max() >= 0:
            g = int(candidates.argmax())
            matched_gt[p], matched_iou[p] = g, iou[p, g]
            free[g] = False
    return matched_gt, matched_iou


def score_order(scores: np.ndarray) -> np.ndarray:
    """Indices of scores from highest to lowest (ties keep their input order)."""
    return np.argsort(-np.asarray(scores), kind="stable")


def match_image(pred: dict, gt: dict, iou_thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Class-aware one-to-one matching of one image (the one P/R/F1 and check_errors use).

    pred: {"boxes" (N, 4) xyxy, "scores" (N,), "labels" (N,)}, gt: {"boxes" (M, 4), "labels" (M,)}, numpy.
    Returns (matched GT index per prediction, -1 for a false positive; IoU of that match, 0 if none).
    """
    iou = iou_matrix(pred["boxes"], gt["boxes"])
    same_class = pred["labels"][:, None] == gt["labels"][None, :]
    return greedy_match(iou, score_order(pred["scores"]), same_class, iou_thresh)
