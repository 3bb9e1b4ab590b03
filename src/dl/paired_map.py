"""The mAP50 difference of two deployments of one model on the same images, with a paired bootstrap interval.

One detection that flips in one image moves mAP50 by about 1 / (detections of its class): on a small
sample that alone can exceed a tolerance. Resampling the IMAGES (with replacement, the same draw for both
deployments) shows how much of a delta such single images make: a delta from one image has an interval
reaching 0, a systematic one (every image a little worse) has an interval away from 0.

AP50 here is COCO's at IoU 0.5 (the validator's faster-coco-eval): per class, detections of every image by
descending score (the 100 best per image and class), each greedily matched to the unmatched ground-truth
box of its class with the highest IoU >= 0.5 (src/metrics/matching.py); precision made monotone and read
at 101 recall points; classes without ground truth left out of the mean. An image drawn w times counts
w times; with every image drawn once it is the validator's mAP50.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from src.metrics.matching import match_image

MAX_DETECTIONS = 100  # per image and class, as COCO's maxDets
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
RESAMPLES = 1000
SEED = 0


@dataclass
class ScoredDetections:
    """Every detection of a set of images, flattened: which image, class, score, and whether it is a true
    positive at IoU 0.5; with the ground-truth count per (image, class)."""

    image: np.ndarray  # (N,) int
    label: np.ndarray  # (N,) int
    score: np.ndarray  # (N,) float
    true_positive: np.ndarray  # (N,) bool
    ground_truth: np.ndarray  # (images, classes) int


def score_detections(detections: Sequence, samples: Sequence, num_classes: int) -> ScoredDetections:
    """Detections per image (boxes, scores, labels; any order) against their samples' ground truth
    (boxes, labels in the same pixels)."""

    images, labels, scores, hits = [], [], [], []
    ground_truth = np.zeros((len(samples), num_classes), np.int64)
    for index, (dets, sample) in enumerate(zip(detections, samples, strict=True)):
        keep = top_per_class(np.asarray(dets.scores), np.asarray(dets.labels))
        pred = {"boxes": dets.boxes[keep], "scores": dets.scores[keep], "labels": dets.labels[keep]}
        matched, _ = match_image(pred, {"boxes": sample.boxes, "labels": sample.labels}, 0.5)
        images.append(np.full(len(keep), index))
        labels.append(pred["labels"])
        scores.append(pred["scores"])
        hits.append(matched >= 0)
        ground_truth[index] = np.bincount(sample.labels, minlength=num_classes)[:num_classes]
    flat = [np.concatenate([np.zeros(0, dtype), *parts]) for parts, dtype in
            ((images, np.int64), (labels, np.int64), (scores, np.float64), (hits, bool))]  # fmt: skip
    return ScoredDetections(*flat, ground_truth)


def top_per_class(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices of the MAX_DETECTIONS best detections of each class (one image)."""
    order = np.argsort(-scores, kind="stable")
    rank = np.zeros(len(order), np.int64)
    for label in np.unique(labels):
        of_class = order[labels[order] == label]
        rank[of_class] = np.arange(len(of_class))
    return order[rank[order] < MAX_DETECTIONS]


def weighted_map50(scored: ScoredDetections, weights: np.ndarray) -> np.ndarray:
    """mAP50 under image weights (R, images) (how often each image is drawn) -> (R,)."""
    per_class, present = [], []
    for label in range(scored.ground_truth.shape[1]):
        positives = weights @ scored.ground_truth[:, label]  # (R,)
        of_class = np.flatnonzero(scored.label == label)
        order = of_class[np.argsort(-scored.score[of_class], kind="stable")]
        drawn = weights[:, scored.image[order]]  # (R, n): each detection counted as often as its image
        per_class.append(average_precision(drawn, scored.true_positive[order], positives))
        present.append(positives > 0)
    if not per_class:
        return np.zeros(len(weights))
    ap, present = np.stack(per_class, 1), np.stack(present, 1)  # (R, classes)
    counted = present.sum(1)
    return np.where(counted > 0, (ap * present).sum(1) / np.maximum(counted, 1), 0.0)


def average_precision(drawn: np.ndarray, hit: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """COCO's 101-point AP of one class: drawn (R, n) weights of its detections in descending score order,
    hit (n,) true positives, positives (R,) ground-truth count -> (R,) (0 where there is no ground truth)."""
    if drawn.shape[1] == 0:
        return np.zeros(len(drawn))
    true_cum = np.cumsum(drawn * hit, axis=1)
    false_cum = np.cumsum(drawn * ~hit, axis=1)
    recall = true_cum / np.maximum(positives, 1)[:, None]
    precision = np.where(true_cum + false_cum > 0, true_cum / np.maximum(true_cum + false_cum, 1e-12), 0.0)
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # the monotone envelope
    ap = np.empty(len(drawn))
    for r in range(len(drawn)):
        at = np.searchsorted(recall[r], RECALL_POINTS, side="left")
        ap[r] = np.where(at < recall.shape[1], precision[r, np.minimum(at, recall.shape[1] - 1)], 0.0).mean()
    return ap


def paired_map50_delta(
    reference: Sequence, candidate: Sequence, samples: Sequence, num_classes: int, confidence: float = 0.95,
    resamples: int = RESAMPLES,
) -> dict[str, float]:  # fmt: skip
    """candidate's mAP50 minus reference's on the same images, and its paired bootstrap interval
    (`confidence`, percentile method, the same image draw for both)."""
    if not samples:
        return dict.fromkeys(("reference_mAP_50", "mAP_50", "mAP_50_delta", "mAP_50_delta_low",
                              "mAP_50_delta_high"), 0.0) | {"confidence": confidence, "images": 0}  # fmt: skip
    ref = score_detections(reference, samples, num_classes)
    cand = score_detections(candidate, samples, num_classes)
    count = len(samples)
    once = np.ones((1, count))
    draws = np.random.default_rng(SEED).multinomial(count, np.full(count, 1 / count), size=resamples)
    ref_map, cand_map = weighted_map50(ref, once)[0], weighted_map50(cand, once)[0]
    deltas = weighted_map50(cand, draws) - weighted_map50(ref, draws)  # (resamples,)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return {
        "reference_mAP_50": float(ref_map),
        "mAP_50": float(cand_map),
        "mAP_50_delta": float(cand_map - ref_map),
        "mAP_50_delta_low": float(low),
        "mAP_50_delta_high": float(high),
        "confidence": float(confidence),
        "images": len(samples),
    }
