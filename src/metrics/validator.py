"""Detection metrics: COCO mAP (faster-coco-eval), P/R/F1 at a confidence, confusion matrix, threshold curves,
best thresholds, eval pictures; predictions gathered from several DDP ranks count each image once.

Inputs per image (numpy arrays or torch tensors, ORIGINAL image pixels):
    pred = {"boxes": (N, 4) xyxy, "scores": (N,), "labels": (N,)}   # unfiltered, e.g. the top-300
    gt   = {"boxes": (M, 4) xyxy, "labels": (M,)}
Both may carry "image_id" (then an image seen twice, e.g. gathered from DDP ranks, counts once) and "path".

    preds, gts = predict_batches(model, val_loader, device, postprocessor)   # per rank
    (DDP: all_gather the two lists, concatenate; evaluate() dedupes by image_id)
    result = evaluate(preds, gts, class_names, conf_thresh, iou_thresh)
    result.metrics   # flat dict: mAP_50, mAP_50_95, precision, recall, f1, iou, tp, fp, fn, best_thresh, best_f1
    result.save(plots_dir); save_thresholds(exp / "thresholds.json", result.thresholds)
    save_eval_images(preds, gts, out_dir, class_names, conf_thresh, n=8)

Matching (P/R/F1, confusion matrix, curves): predictions in descending score order each take the unmatched
ground-truth box of the same class with the highest IoU >= iou_thresh (one-to-one). Because matching is
greedy by score, the matching at any confidence threshold is the matching of all predictions restricted to
those scoring >= the threshold; the curves are computed from one matching pass.

The matching is public and shared (check_errors finds FP/FN with it, export pairs an artifact's detections
with the torch model's with it):
    iou_matrix(boxes_a, boxes_b)                    -> (A, B) IoU of xyxy numpy boxes
    score_order(scores)                             -> indices, highest score first (stable)
    greedy_match(iou, order, allowed, iou_thresh)   -> one-to-one (matched column per row, its IoU)
    match_image(pred, gt, iou_thresh)               -> the class-aware matching of one image
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from loguru import logger

from src.common.boxes import box_iou, xyxy_to_xywh
from src.common.draw import draw_gt_vs_pred, save_image_rgb
from src.common.io import atomic_write, atomic_write_csv, atomic_write_json
from src.common.network_input import boxes_to_original, network_boxes_to_original_xyxy

logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)

CURVE_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)  # confidence grid for the P/R/F1 curves


# ---------------------------------------------------------------- input normalisation and DDP


def _numpy(values, dtype, shape_tail=()) -> np.ndarray:
    if values is None:
        return np.zeros((0, *shape_tail), dtype=dtype)
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy() if values.is_floating_point() else values.cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1, *shape_tail)


def as_prediction(pred: dict) -> dict[str, np.ndarray]:
    boxes = _numpy(pred.get("boxes"), np.float64, (4,))
    scores = _numpy(pred.get("scores"), np.float64)
    labels = _numpy(pred.get("labels"), np.int64)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"prediction sizes differ: boxes {len(boxes)}, scores {len(scores)}, labels {len(labels)}"
        )
    return {"boxes": boxes, "scores": scores, "labels": labels}


def as_ground_truth(gt: dict) -> dict[str, np.ndarray]:
    boxes = _numpy(gt.get("boxes"), np.float64, (4,))
    labels = _numpy(gt.get("labels"), np.int64)
    if len(boxes) != len(labels):
        raise ValueError(f"ground truth sizes differ: boxes {len(boxes)}, labels {len(labels)}")
    return {"boxes": boxes, "labels": labels}


def network_sizes(images: torch.Tensor) -> torch.Tensor:
    """(B, 2) network input (w, h) for each image: the size to give the postprocessor (see preprocess)."""
    batch, _, height, width = images.shape
    return torch.tensor([[width, height]], dtype=torch.float32, device=images.device).repeat(batch, 1)


# ---------------------------------------------------------------- COCO mAP


def coco_dicts(preds: Sequence[dict], gts: Sequence[dict], num_classes: int) -> tuple[dict, list[dict]]:
    """In-memory COCO ground-truth dict and detection list. Image ids are 1..N, category ids class + 1."""
    images, annotations, detections = [], [], []
    for i, (pred, gt) in enumerate(zip(preds, gts, strict=True), start=1):
        images.append({"id": i, "width": int(gt.get("width", 0)), "height": int(gt.get("height", 0))})
        xywh = xyxy_to_xywh(torch.from_numpy(gt["boxes"])).tolist()
        for box, label in zip(xywh, gt["labels"].tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": label + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
        pred_xywh = xyxy_to_xywh(torch.from_numpy(pred["boxes"])).tolist()
        for box, score, label in zip(
            pred_xywh, pred["scores"].tolist(), pred["labels"].tolist(), strict=True
        ):
            detections.append({"image_id": i, "category_id": label + 1, "bbox": box, "score": score})
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def coco_map(preds: Sequence[dict], gts: Sequence[dict], num_classes: int) -> dict:
    """COCO bbox mAP@0.5 and mAP@0.5:0.95 (100 detections per image) plus per-class AP arrays (nan for a
    class without ground truth). With no ground truth at all every value is 0."""
    from faster_coco_eval import COCO, COCOeval_faster

    nan = np.full(num_classes, np.nan)
    gt_dict, detections = coco_dicts(preds, gts, num_classes)
    if not gt_dict["annotations"]:
        return {"mAP_50": 0.0, "mAP_50_95": 0.0, "AP50": nan, "AP50_95": nan}
    coco_gt = COCO(gt_dict)
    evaluator = COCOeval_faster(coco_gt, coco_gt.loadRes(detections), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (iou thresholds, recall points, classes)
    return {
        "mAP_50": _mean_valid(precision[0]),
        "mAP_50_95": _mean_valid(precision),
        "AP50": np.array([_mean_valid(precision[0, :, k], np.nan) for k in range(num_classes)]),
        "AP50_95": np.array([_mean_valid(precision[:, :, k], np.nan) for k in range(num_classes)]),
    }


def _mean_valid(values: np.ndarray, empty: float = 0.0) -> float:
    """Mean over entries > -1 (COCO marks 'no ground truth' with -1), as COCOeval.summarize does."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else empty


# ---------------------------------------------------------------- matching


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


def _unique_images(preds: Sequence[dict], gts: Sequence[dict]) -> list[tuple[dict, dict]]:
    """Pairs (pred, gt); with image ids: one pair per id (the first), sorted by id."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth images")
    pairs = list(zip(preds, gts, strict=True))
    if not pairs or any("image_id" not in gt for gt in gts):
        return pairs
    unique: dict[int, tuple[dict, dict]] = {}
    for pred, gt in pairs:
        unique.setdefault(int(gt["image_id"]), (pred, gt))
    return [unique[i] for i in sorted(unique)]


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
    pairs = _unique_images(preds, gts)
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
        per_class.append(coco_row | summary | {"best_thresh": best_per_class[name]})
    tp_ious = matches.ious[matches.is_tp & (matches.scores >= conf_thresh)]
    metrics = {
        "mAP_50": coco["mAP_50"],
        "mAP_50_95": coco["mAP_50_95"],
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
        thresholds={"conf_thresh": best_thresh, "f1": best_f1, "per_class": best_per_class},
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


# ---------------------------------------------------------------- plots


def _save_figure(figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    return atomic_write(
        path, lambda tmp: figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    )


def plot_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: str | Path) -> Path:
    from matplotlib.figure import Figure

    names = [*class_names, "background"]
    size = max(5.0, 0.6 * len(names) + 2)
    figure = Figure(figsize=(size + 1, size))
    axes = figure.add_subplot()
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes)
    ticks = np.arange(len(names))
    axes.set_xticks(ticks, names, rotation=45, ha="right")
    axes.set_yticks(ticks, names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("Confusion matrix")
    half = confusion.max() / 2 if confusion.size else 0
    for (row, col), value in np.ndenumerate(confusion):
        color = "white" if value > half else "black"
        axes.text(col, row, str(value), ha="center", va="center", color=color, fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, Path(path))


def plot_threshold_curves(curves: pd.DataFrame, path: str | Path, thresholds: dict | None = None) -> Path:
    """Precision, recall and F1 against the confidence threshold (all classes together)."""
    from matplotlib.figure import Figure

    overall = curves[curves["class"] == "all"]
    figure = Figure(figsize=(7, 5))
    axes = figure.add_subplot()
    for column in ("precision", "recall", "f1"):
        axes.plot(overall["threshold"], overall[column], label=column)
    if thresholds:
        axes.axvline(thresholds["conf_thresh"], color="grey", linestyle="--", label="best F1")
    axes.set_xlabel("confidence threshold")
    axes.set_ylim(0, 1.02)
    axes.set_xlim(0, 1)
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title("Precision / recall / F1 vs confidence")
    figure.tight_layout()
    return _save_figure(figure, Path(path))


# ---------------------------------------------------------------- predicting a loader, eval pictures


def batch_records(results: Sequence[dict], targets: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Postprocessor output (boxes in NETWORK pixels: it was given network_sizes(images)) and the dataset's
    targets -> per-image prediction and ground-truth dicts in ORIGINAL pixels (via each target's letterbox)."""
    preds, gts = [], []
    for result, target in zip(results, targets, strict=True):
        meta = target["letterbox"]
        pred = as_prediction(result)
        pred["boxes"] = boxes_to_original(pred["boxes"], meta)
        gt_boxes = network_boxes_to_original_xyxy(_numpy(target["boxes"], np.float64, (4,)), meta)
        extra = {"image_id": int(target["image_id"]), "path": target.get("path")}
        preds.append(pred | extra)
        gt = {"boxes": gt_boxes, "labels": _numpy(target["labels"], np.int64)}
        gts.append(gt | {"width": meta.orig_w, "height": meta.orig_h} | extra)
    return preds, gts


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module,
    loader,
    device: torch.device | str,
    postprocessor,
    amp_dtype: torch.dtype | None = None,
    desc: str = "eval",
    show_progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Run an (eval-mode) model over a loader of DetectionDataset batches -> (preds, gts) per image in
    original pixels, unfiltered (the postprocessor's top-k)."""
    from tqdm import tqdm

    device = torch.device(device)
    preds, gts = [], []
    for images, targets in tqdm(
        loader, desc=desc, disable=not show_progress, leave=False, dynamic_ncols=True
    ):
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
        outputs = {k: v.float() if torch.is_tensor(v) else v for k, v in outputs.items()}
        batch_preds, batch_gts = batch_records(postprocessor(outputs, network_sizes(images)), targets)
        preds += batch_preds
        gts += batch_gts
    return preds, gts


def save_eval_images(
    preds: Sequence[dict],
    gts: Sequence[dict],
    out_dir: str | Path,
    class_names: Sequence[str],
    conf_thresh: float,
    n: int,
) -> list[Path]:
    """The first n images (by image_id when given) with GT in green and predictions >= conf_thresh in red.
    The original image is read from the record's "path" (records without one are skipped)."""
    from src.common.images import read_image_rgb

    saved = []
    for k, (pred, gt) in enumerate(_unique_images(preds, gts)[:n]):
        path = gt.get("path") or pred.get("path")
        if path is None:
            continue
        pred, gt_np = as_prediction(pred), as_ground_truth(gt)
        keep = pred["scores"] >= conf_thresh
        picture = draw_gt_vs_pred(
            read_image_rgb(path),
            gt_np["boxes"],
            gt_np["labels"],
            pred["boxes"][keep],
            pred["labels"][keep],
            pred["scores"][keep],
            class_names,
        )
        saved.append(save_image_rgb(Path(out_dir) / f"{k:03d}_{Path(path).stem}.jpg", picture))
    return saved
