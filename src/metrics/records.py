"""Per-image prediction / ground-truth records for the validator: input normalisation (numpy or torch ->
numpy), one record per image when gathered from several DDP ranks, and predict_batches (run a model over a
loader of DetectionDataset batches -> records in ORIGINAL image pixels).

    pred = {"boxes": (N, 4) xyxy, "scores": (N,), "labels": (N,)}   # unfiltered, e.g. the top-300
    gt   = {"boxes": (M, 4) xyxy, "labels": (M,)}
Both may carry "image_id" (then an image seen twice counts once) and "path". A segmentation model's
records (postprocessor results with "masks", targets with "polygons") also carry "mask": RLEs at the
original size (src/metrics/masks.py), so a split's records stay small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from src.common.network_input import boxes_to_original, network_boxes_to_original_xyxy
from src.metrics.masks import ground_truth_masks, prediction_masks


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


def unique_images(preds: Sequence[dict], gts: Sequence[dict]) -> list[tuple[dict, dict]]:
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
        gt = {"boxes": gt_boxes, "labels": _numpy(target["labels"], np.int64)}
        if "masks" in result and "polygons" in target:
            scores, labels = pred["scores"], pred["labels"]
            pred["mask"] = prediction_masks(result["masks"], pred["boxes"], scores, labels, meta)
            gt["mask"] = ground_truth_masks(target["polygons"], gt["labels"], meta.orig_h, meta.orig_w)
        preds.append(pred | extra)
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
