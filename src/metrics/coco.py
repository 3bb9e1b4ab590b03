"""COCO mAP with faster-coco-eval: the one evaluation box mAP (validator) and mask mAP (masks) share.

scores = coco_map(preds, gts, num_classes)      # per-image dicts as in src/metrics/validator.py
scores["mAP_50"], scores["mAP_50_95"], scores["AP50"], scores["AP50_95"]   # per-class arrays: nan = no GT
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from src.common.boxes import xyxy_to_xywh

logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)


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
    gt_dict, detections = coco_dicts(preds, gts, num_classes)
    return coco_summary(gt_dict, detections, num_classes, iou_type="bbox")


def coco_summary(gt_dict: dict, detections: list, num_classes: int, iou_type: str, prefix: str = "") -> dict:
    """faster-coco-eval on COCO dicts -> {prefix}mAP_50, {prefix}mAP_50_95, {prefix}mAP_75 and per-class
    {prefix}AP50, {prefix}AP50_95 arrays. iou_type: bbox | segm (box and mask mAP share this one evaluation)."""
    from faster_coco_eval import COCO, COCOeval_faster

    nan = np.full(num_classes, np.nan)
    if not gt_dict["annotations"]:
        return {
            f"{prefix}mAP_50": 0.0,
            f"{prefix}mAP_50_95": 0.0,
            f"{prefix}mAP_75": 0.0,
            f"{prefix}AP50": nan,
            f"{prefix}AP50_95": nan,
        }
    coco_gt = COCO(gt_dict)
    evaluator = COCOeval_faster(coco_gt, coco_gt.loadRes(detections), iouType=iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (iou thresholds, recall points, classes)
    return {
        f"{prefix}mAP_50": _mean_valid(precision[0]),
        f"{prefix}mAP_50_95": _mean_valid(precision),
        f"{prefix}mAP_75": _mean_valid(precision[5]),  # COCO's IoU thresholds 0.50:0.05:0.95, index 5 = 0.75
        f"{prefix}AP50": np.array([_mean_valid(precision[0, :, k], np.nan) for k in range(num_classes)]),
        f"{prefix}AP50_95": np.array([_mean_valid(precision[:, :, k], np.nan) for k in range(num_classes)]),
    }


def _mean_valid(values: np.ndarray, empty: float = 0.0) -> float:
    """Mean over entries > -1 (COCO marks 'no ground truth' with -1), as COCOeval.summarize does."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else empty
