"""Validator pictures: confusion matrix, P/R/F1-vs-confidence curves, eval images (GT vs predictions)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from src.common.draw import GT_COLOR, PRED_COLOR, draw_gt_vs_pred, draw_masks, save_image_rgb
from src.common.images import read_image_rgb
from src.common.io import atomic_write
from src.metrics.masks import decode_rles
from src.metrics.records import as_ground_truth, as_prediction, unique_images


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

    saved = []
    for k, (pred, gt) in enumerate(unique_images(preds, gts)[:n]):
        path = gt.get("path") or pred.get("path")
        if path is None:
            continue
        image = _draw_record_masks(read_image_rgb(path), pred, gt, conf_thresh)
        pred, gt_np = as_prediction(pred), as_ground_truth(gt)
        keep = pred["scores"] >= conf_thresh
        picture = draw_gt_vs_pred(
            image,
            gt_np["boxes"],
            gt_np["labels"],
            pred["boxes"][keep],
            pred["labels"][keep],
            pred["scores"][keep],
            class_names,
        )
        saved.append(save_image_rgb(Path(out_dir) / f"{k:03d}_{Path(path).stem}.jpg", picture))
    return saved


def _draw_record_masks(image: np.ndarray, pred: dict, gt: dict, conf_thresh: float) -> np.ndarray:
    """A segmentation model's records: GT masks in green, predicted masks >= conf_thresh in red, under the
    boxes (records without "mask": the image unchanged)."""
    if "mask" not in pred or "mask" not in gt:
        return image

    height, width = image.shape[:2]
    kept = [
        rle
        for rle, score in zip(pred["mask"]["rles"], pred["mask"]["scores"], strict=True)
        if score >= conf_thresh
    ]
    out = draw_masks(
        image, decode_rles(gt["mask"]["rles"], height, width), gt["mask"]["labels"], color=GT_COLOR
    )
    labels = np.zeros(len(kept), np.int64)  # one colour: the class is in the box label
    return draw_masks(out, decode_rles(kept, height, width), labels, color=PRED_COLOR)
