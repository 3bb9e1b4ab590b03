"""Detection metrics: COCO mAP (faster-coco-eval), P/R/F1 at a confidence, confusion matrix, threshold curves,
best thresholds, eval pictures; predictions gathered from several DDP ranks count each image once.

Inputs per image (numpy arrays or torch tensors, ORIGINAL image pixels):
    pred = {"boxes": (N, 4) xyxy, "scores": (N,), "labels": (N,)}   # unfiltered, e.g. the top-300
    gt   = {"boxes": (M, 4) xyxy, "labels": (M,)}
Both may carry "image_id" (then an image seen twice, e.g. gathered from DDP ranks, counts once) and "path".
A segmentation model's records also carry "mask" (pred: {"rles", "scores", "labels"}, gt: {"rles", "labels",
"height", "width"}: src/metrics/masks.py prediction_masks / ground_truth_masks, made by predict_batches): then
the metrics add mask_mAP_50, mask_mAP_50_95 and per_class mask_AP50, mask_AP50_95 (COCO segm), and mask_iou
(mean mask IoU of the detections >= best_thresh that the box matching pairs with an object).

    preds, gts = predict_batches(model, val_loader, device, postprocessor)   # per rank
    (DDP: all_gather the two lists, concatenate; evaluate() dedupes by image_id)
    result = evaluate(preds, gts, class_names, conf_thresh, iou_thresh)
    result.metrics   # flat dict: mAP_50, mAP_50_95, precision, recall, f1, iou, tp, fp, fn, best_thresh, best_f1
    result.save(plots_dir); save_thresholds(exp / "thresholds.json", result.thresholds)
    save_eval_images(preds, gts, out_dir, class_names, conf_thresh, n=8)
    (predict_batches: src/metrics/records.py; save_eval_images and the plots: src/metrics/plots.py)

Matching (P/R/F1, confusion matrix, curves): the one-to-one, class-aware matching of src/metrics/matching.py.
Because matching is greedy by score, the matching at any confidence threshold is the matching of all
predictions restricted to those scoring >= the threshold; the curves are computed from one matching pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from loguru import logger

from src.common.io import atomic_write, atomic_write_csv, atomic_write_json
from src.metrics.coco import coco_dicts, coco_map  # noqa: F401 - coco_dicts: part of this module's API
from src.metrics.masks import MASK_COLUMNS, mask_map, matched_mask_iou
from src.metrics.matching import greedy_match, iou_matrix, match_image, score_order
from src.metrics.plots import plot_confusion_matrix, plot_threshold_curves
from src.metrics.records import as_ground_truth, as_prediction, unique_images

CURVE_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)  # confidence grid for the P/R/F1 curves
# Below this best F1 a model has no operating point worth deploying: its F1 maximum then sits at the lowest
# scores and would flood every output with boxes, so thresholds.json keeps the configured conf_thresh.
MIN_DEPLOYABLE_F1 = 0.1


def confusion_for_image(pred: dict, gt: dict, num_classes: int, iou_thresh: float) -> np.ndarray:
    """(C+1, C+1) counts, rows = true class, columns = predicted class, last = background.

    Same-class matches first (the diagonal), then the leftovers are paired across classes
    (misclassifications), then what is left is background on the other side.
    """
    bg = num_classes
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    iou = iou_matrix(pred["boxes"], gt["boxes"])
    order = score_order(pred["scores"])
    same_class = pred["labels"][:, None] == gt["labels"][None, :]
    matched, _ = greedy_match(iou, order, same_class, iou_thresh)
    gt_left = np.ones(len(gt["labels"]), dtype=bool)
    gt_left[matched[matched >= 0]] = False
    pred_left = matched < 0
    for label in pred["labels"][~pred_left]:
        matrix[label, label] += 1
    cross_allowed = pred_left[:, None] & gt_left[None, :]
    cross, _ = greedy_match(iou, order, cross_allowed, iou_thresh)
    for p in np.where(pred_left)[0]:
        if cross[p] >= 0:
            matrix[gt["labels"][cross[p]], pred["labels"][p]] += 1
            gt_left[cross[p]] = False
        else:
            matrix[bg, pred["labels"][p]] += 1
    for label in gt["labels"][gt_left]:
        matrix[label, bg] += 1
    return matrix


# ---------------------------------------------------------------- results


def _prf(tp, fp, fn):
    """Precision, recall, F1 (0 where undefined); works on scalars and arrays."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1


def best_threshold(thresholds: np.ndarray, f1: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) with the highest F1; on a plateau of equal F1 the middle of it (robust to drift)."""
    best = f1.max()
    ties = thresholds[np.isclose(f1, best, rtol=0, atol=1e-12)]
    return float(ties[len(ties) // 2]), float(best)


def deployed_thresholds(best: float, best_f1: float, per_class: dict[str, float], conf_thresh: float) -> dict:
    """thresholds.json's content: the best-F1 thresholds, or conf_thresh for every class when even the best
    F1 is under MIN_DEPLOYABLE_F1 (then "fallback" says why)."""
    if best_f1 >= MIN_DEPLOYABLE_F1:
        return {"conf_thresh": best, "f1": best_f1, "per_class": per_class}
    return {
        "conf_thresh": float(conf_thresh),
        "f1": best_f1,
        "per_class": dict.fromkeys(per_class, float(conf_thresh)),
        "fallback": f"best val F1 {best_f1:.3f} < {MIN_DEPLOYABLE_F1}: kept the configured conf_thresh",
    }


@dataclass
class ValResult:
    metrics: dict[
        str, float
    ]  # mAP_50, mAP_50_95, precision, recall, f1, iou, tp, fp, fn, best_thresh, best_f1
    per_class: pd.DataFrame  # class, AP50, AP50_95, precision, recall, f1, tp, fp, fn, best_thresh
    confusion: np.ndarray  # (C+1, C+1) at conf_thresh; rows true, columns predicted, last = background
    curves: pd.DataFrame  # class ("all" or a name), threshold, precision, recall, f1
    thresholds: dict  # {"conf_thresh": best global, "f1": its F1, "per_class": {name: threshold}}
    class_names: list[str] = field(default_factory=list)

    def save(self, out_dir: str | Path) -> list[Path]:
        """confusion_matrix.{png,csv}, threshold_curves.{png,csv}, per_class_metrics.csv."""
        out_dir = Path(out_dir)
        names = [*self.class_names, "background"]
        confusion = pd.DataFrame(self.confusion, index=names, columns=names).rename_axis("true \\ predicted")
        return [
            atomic_write(out_dir / "confusion_matrix.csv", lambda tmp: confusion.to_csv(tmp)),
            plot_confusion_matrix(self.confusion, self.class_names, out_dir / "confusion_matrix.png"),
            atomic_write_csv(out_dir / "threshold_curves.csv", self.curves),
            plot_threshold_curves(self.curves, out_dir / "threshold_curves.png", self.thresholds),
            atomic_write_csv(out_dir / "per_class_metrics.csv", self.per_class),
        ]


def save_thresholds(path: str | Path, thresholds: dict) -> Path:
    """thresholds.json: the best global confidence (max F1) and one per class."""
    return atomic_write_json(path, thresholds)


@dataclass
class Matches:
    """Every prediction of every image after class-aware matching (flat arrays), and GT counts per class."""

    scores: np.ndarray
    labels: np.ndarray
    is_tp: np.ndarray
    ious: np.ndarray  # IoU with the matched GT (0 for false positives)
    gt_counts: np.ndarray  # (C,)


def match_all(preds: Sequence[dict], gts: Sequence[dict], num_classes: int, iou_thresh: float) -> Matches:
    per_image = [match_image(pred, gt, iou_thresh) for pred, gt in zip(preds, gts, strict=True)]
    # Each concatenation starts with an empty array so that zero images still work.
    return Matches(
        scores=np.concatenate([np.zeros(0), *(p["scores"] for p in preds)]),
        labels=np.concatenate([np.zeros(0, np.int64), *(p["labels"] for p in preds)]),
        is_tp=np.concatenate([np.zeros(0, bool), *(matched >= 0 for matched, _ in per_image)]),
        ious=np.concatenate([np.zeros(0), *(iou for _, iou in per_image)]),
        gt_counts=np.bincount(
            np.concatenate([np.zeros(0, np.int64), *(g["labels"] for g in gts)]), minlength=num_classes
        ),
    )


def counts_at_thresholds(
    scores: np.ndarray, is_tp: np.ndarray, n_gt: int, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN counting only predictions with score >= each threshold (one sort, no loop)."""
    order = np.argsort(scores, kind="stable")
    ascending = scores[order]
    tp_from = np.concatenate([np.cumsum(is_tp[order][::-1])[::-1], [0]])  # TPs at sorted positions >= i
    first_kept = np.searchsorted(ascending, thresholds, side="left")
    tp = tp_from[first_kept]
    fp = (len(scores) - first_kept) - tp
    return tp, fp, n_gt - tp


def confusion_matrix(
    preds: Sequence[dict], gts: Sequence[dict], num_classes: int, conf_thresh: float, iou_thresh: float
) -> np.ndarray:
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for pred, gt in zip(preds, gts, strict=True):
        confident = {k: v[pred["scores"] >= conf_thresh] for k, v in pred.items()}
        matrix += confusion_for_image(confident, gt, num_classes, iou_thresh)
    return matrix


def _check_labels(items: Sequence[dict], num_classes: int) -> None:
    for item in items:
        bad = item["labels"][(item["labels"] < 0) | (item["labels"] >= num_classes)]
        if bad.size:
            raise ValueError(
                f"class id {int(bad[0])} outside 0..{num_classes - 1} ({num_classes} class names)"
            )


def _summary(matches: Matches, mask: np.ndarray, n_gt: int, conf_thresh: float) -> tuple[dict, np.ndarray]:
    """P/R/F1 and counts at conf_thresh, and the (thresholds, 3) P/R/F1 curve, for a subset of predictions."""
    scores, is_tp = matches.scores[mask], matches.is_tp[mask]
    tp, fp, fn = (int(v[0]) for v in counts_at_thresholds(scores, is_tp, n_gt, np.array([conf_thresh])))
    precision, recall, f1 = (float(v) for v in _prf(tp, fp, fn))
    curve = np.stack(_prf(*counts_at_thresholds(scores, is_tp, n_gt, CURVE_THRESHOLDS)), axis=1)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}, curve


def evaluate(
    preds: Sequence[dict],
    gts: Sequence[dict],
    class_names: Sequence[str],
    conf_thresh: float = 0.5,
    iou_thresh: float = 0.5,
) -> ValResult:
    """All metrics for lists of per-image predictions and ground truth (see the module docstring)."""
    pairs = unique_images(preds, gts)
    if not pairs:
        logger.warning("evaluate: no images to evaluate; every metric is 0")
    class_names = list(class_names)
    num_classes = len(class_names)
    preds = [as_prediction(p) for p, _ in pairs]
    gts = [as_ground_truth(g) | {k: g[k] for k in ("width", "height") if k in g} for _, g in pairs]
    _check_labels([*preds, *gts], num_classes)

    matches = match_all(preds, gts, num_classes, iou_thresh)
    overall, overall_curve = _summary(
        matches, np.ones_like(matches.is_tp), int(matches.gt_counts.sum()), conf_thresh
    )
    best_thresh, best_f1 = best_threshold(CURVE_THRESHOLDS, overall_curve[:, 2])
    coco = coco_map(preds, gts, num_classes)
    segment = bool(pairs) and all("mask" in pred for pred, _ in pairs)
    masks = {}
    if segment:
        mask_preds, mask_gts = [p["mask"] for p, _ in pairs], [g["mask"] for _, g in pairs]
        masks = mask_map(mask_preds, mask_gts, num_classes)
        # at the best-F1 threshold (what thresholds.json deploys): the masks of the detections a user gets,
        # also while the scores of a young model stay under conf_thresh
        masks["mask_iou"] = matched_mask_iou(preds, gts, mask_preds, mask_gts, best_thresh, iou_thresh)
    curves, per_class, best_per_class = [_curve_frame("all", overall_curve)], [], {}
    for c, name in enumerate(class_names):
        summary, curve = _summary(matches, matches.labels == c, int(matches.gt_counts[c]), conf_thresh)
        curves.append(_curve_frame(name, curve))
        # A class with nothing to find or nothing found has no meaningful optimum: use the global one.
        has_optimum = curve[:, 2].max() > 0
        best_per_class[name] = (
            best_threshold(CURVE_THRESHOLDS, curve[:, 2])[0] if has_optimum else best_thresh
        )
        coco_row = {"class": name, "AP50": coco["AP50"][c], "AP50_95": coco["AP50_95"][c]}
        coco_row |= {f"mask_{k}": masks[f"mask_{k}"][c] for k in ("AP50", "AP50_95") if masks}
        per_class.append(coco_row | summary | {"best_thresh": best_per_class[name]})
    tp_ious = matches.ious[matches.is_tp & (matches.scores >= conf_thresh)]
    metrics = {
        "mAP_50": coco["mAP_50"],
        "mAP_50_95": coco["mAP_50_95"],
        **{k: masks[k] for k in MASK_COLUMNS if masks},
        **{k: overall[k] for k in ("precision", "recall", "f1")},
        "iou": float(tp_ious.mean()) if tp_ious.size else 0.0,
        **{k: overall[k] for k in ("tp", "fp", "fn")},
        "best_thresh": best_thresh,
        "best_f1": best_f1,
    }
    return ValResult(
        metrics=metrics,
        per_class=pd.DataFrame(per_class),
        confusion=confusion_matrix(preds, gts, num_classes, conf_thresh, iou_thresh),
        curves=pd.concat(curves, ignore_index=True),
        thresholds=deployed_thresholds(best_thresh, best_f1, best_per_class, conf_thresh),
        class_names=class_names,
    )


def _curve_frame(name: str, curve: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "class": name,
            "threshold": CURVE_THRESHOLDS,
            "precision": curve[:, 0],
            "recall": curve[:, 1],
            "f1": curve[:, 2],
        }
    )
