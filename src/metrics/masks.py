"""COCO mask mAP (faster-coco-eval, iouType "segm") beside the validator's box mAP.

    scores = mask_map(preds, gts, num_classes)
    scores["mask_mAP_50"], scores["mask_mAP_50_95"]          # floats
    scores["mask_AP50"], scores["mask_AP50_95"]              # (num_classes,) arrays, nan: no ground truth

preds: per image {"masks" bool (K, H, W), "labels" (K,), "scores" (K,)}; gts: per image {"masks" bool
(n, H, W), "labels" (n,)}; masks at the original image size (network_input.masks_to_original), numpy or
torch. Masks are RLE-encoded with faster-coco-eval's mask utilities (pycocotools' format); a ground-truth
object without a mask (box-only label, "has_mask" False) is left out of the mask ground truth.
Either side may give "rles" (K COCO RLEs, already encoded) instead of "masks" (a gt then also "height",
"width"): validation keeps only RLEs per image (prediction_masks / ground_truth_masks), never a split's masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from src.common.masks import polygons_has_mask, polygons_to_masks
from src.common.network_input import Letterbox, masks_in_boxes
from src.metrics.coco import coco_summary

MASK_COLUMNS = ("mask_mAP_50", "mask_mAP_50_95")
# Validation scores masks of the best MAX_MASKS predictions per image (COCO counts 100 per image and class)
# that score at least MIN_MASK_SCORE: resampling 300 full-size masks per image would cost more than the
# forward pass, and predictions below 1% hardly move AP.
MAX_MASKS = 100
MIN_MASK_SCORE = 0.01


def _bool_masks(masks) -> np.ndarray:
    """(K, H, W) numpy/torch, any dtype -> Fortran-ordered uint8 (H, W, K), the layout RLE encoding wants."""
    array = masks.detach().cpu().numpy() if hasattr(masks, "detach") else np.asarray(masks)
    if array.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got shape {array.shape}")
    return np.asfortranarray(array.astype(bool).astype(np.uint8).transpose(1, 2, 0))


def encode_masks(masks) -> list[dict]:
    """(K, H, W) masks -> K COCO RLEs ({"size": [H, W], "counts": str})."""
    if len(masks) == 0:
        return []
    return _encode_hwk(_bool_masks(masks))


def _encode_hwk(masks: np.ndarray) -> list[dict]:
    """Fortran-ordered uint8 (H, W, K) -> K RLEs with str counts."""
    from faster_coco_eval.core import mask as mask_utils

    rles = mask_utils.encode(masks)
    for rle in rles:  # bytes counts -> str, as a COCO json holds them
        if isinstance(rle["counts"], bytes):
            rle["counts"] = rle["counts"].decode("ascii")
    return rles


def decode_rles(rles: list[dict], height: int, width: int) -> np.ndarray:
    """K COCO RLEs -> (K, height, width) bool (the shape also for K = 0)."""
    from faster_coco_eval.core import mask as mask_utils

    if not rles:
        return np.zeros((0, height, width), bool)
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1).astype(bool))


def _numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)


def mask_iou(masks_a, masks_b) -> np.ndarray:
    """IoU of each mask in masks_a (N, H, W) with the one at the same index in masks_b (N, H, W): (N,)
    float64; two empty masks count as IoU 1 (they agree). For export parity and error analysis."""
    a, b = _numpy(masks_a).astype(bool), _numpy(masks_b).astype(bool)
    if len(a) == 0 and len(b) == 0:  # no pairs (reshape(0, -1) cannot infer the pixel count)
        return np.zeros(0, np.float64)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"mask_iou needs masks of one shape, got {a.shape} and {b.shape}")
    union = (a | b).sum(1)
    return np.where(union > 0, (a & b).sum(1) / np.maximum(union, 1), 1.0)


def mask_iou_matrix(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """(A, B) IoU of bool masks (A, H, W) x (B, H, W), computed on their COCO RLEs (cheap for big images)."""
    from faster_coco_eval.core import mask as mask_utils

    if len(masks_a) == 0 or len(masks_b) == 0:
        return np.zeros((len(masks_a), len(masks_b)))
    iou = mask_utils.iou(encode_masks(masks_a), encode_masks(masks_b), [0] * len(masks_b))
    return np.asarray(iou, np.float64).reshape(len(masks_a), len(masks_b))


def prediction_masks(logits, boxes_xyxy, scores, labels, meta: Letterbox) -> dict:
    """A postprocessor's mask logits (K, h, w) of one image (sorted by score, as it returns them) + boxes in
    ORIGINAL pixels -> {"rles", "scores", "labels"} of the best MAX_MASKS scoring >= MIN_MASK_SCORE, masks
    at the original size (network_input.masks_to_original, cut to each box)."""
    scores, labels = _numpy(scores).reshape(-1), _numpy(labels).reshape(-1)
    kept = np.flatnonzero(scores >= MIN_MASK_SCORE)[:MAX_MASKS]
    masks = masks_in_boxes(torch.as_tensor(logits)[kept], meta, np.asarray(boxes_xyxy)[kept], hwk=True)
    return {"rles": _encode_hwk(masks), "scores": scores[kept], "labels": labels[kept]}


def ground_truth_masks(polygons, labels, height: int, width: int) -> dict:
    """One image's label polygons (normalised; None = box-only object) -> {"rles", "labels", "height",
    "width"} of the objects that have one, rasterised at the original size (common.masks)."""
    has_mask = polygons_has_mask(polygons)
    masks = polygons_to_masks([p for p in polygons if p is not None], height, width)
    return {
        "rles": encode_masks(masks),
        "labels": _numpy(labels).reshape(-1)[has_mask],
        "height": height,
        "width": width,
    }


def _rles(item: dict) -> list[dict]:
    return item["rles"] if "rles" in item else encode_masks(_numpy(item["masks"]))


def mask_coco_dicts(preds: Sequence[dict], gts: Sequence[dict], num_classes: int) -> tuple[dict, list[dict]]:
    """In-memory COCO ground truth with RLE segmentations and the detection list; image ids 1..N,
    category ids class + 1 (as validator.coco_dicts)."""
    from faster_coco_eval.core import mask as mask_utils

    images, annotations, detections = [], [], []
    for i, (pred, gt) in enumerate(zip(preds, gts, strict=True), start=1):
        height, width = (gt["height"], gt["width"]) if "rles" in gt else np.shape(gt["masks"])[-2:]
        images.append({"id": i, "width": int(width), "height": int(height)})
        labels = _numpy(gt["labels"]).astype(np.int64).reshape(-1)
        keep = _numpy(gt["has_mask"]).astype(bool) if "has_mask" in gt else np.ones(len(labels), bool)
        rles = [rle for rle, kept in zip(_rles(gt), keep, strict=True) if kept]
        for rle, label in zip(rles, labels[keep].tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": label + 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
        scores, pred_labels = _numpy(pred["scores"]).tolist(), _numpy(pred["labels"]).tolist()
        for rle, score, label in zip(_rles(pred), scores, pred_labels, strict=True):
            detections.append(
                {"image_id": i, "category_id": int(label) + 1, "segmentation": rle, "score": score}
            )
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def mask_map(preds: Sequence[dict], gts: Sequence[dict], num_classes: int) -> dict:
    """COCO segm mAP@0.5 and mAP@0.5:0.95 (100 detections per image) plus per-class AP arrays (nan for a
    class without ground truth). With no ground-truth mask at all every value is 0."""
    gt_dict, detections = mask_coco_dicts(preds, gts, num_classes)
    return coco_summary(gt_dict, detections, num_classes, iou_type="segm", prefix="mask_")
