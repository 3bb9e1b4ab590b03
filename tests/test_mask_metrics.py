"""COCO mask mAP (src/metrics/masks.py) against pycocotools on a small fixture built here, and on a
hand-computed case."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from src.metrics.masks import encode_masks, mask_coco_dicts, mask_map

NUM_CLASSES = 3  # class 2 has no ground truth: nan per-class AP


def _blob(height: int, width: int, centre, axes, angle: float = 0.0) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, centre, axes, angle, 0, 360, 1, -1)
    return mask.astype(bool)


def _fixture() -> tuple[list[dict], list[dict]]:
    """3 images of different sizes: matched, shifted (lower IoU), missed and false-positive masks, a
    box-only ground-truth object, an image without predictions."""
    rng = np.random.default_rng(0)
    preds, gts = [], []
    for height, width, count in ((60, 80, 3), (100, 70, 4), (50, 50, 2)):
        gt_masks, gt_labels, pred_masks, pred_labels, scores = [], [], [], [], []
        for k in range(count):
            centre = (int(rng.integers(15, width - 15)), int(rng.integers(15, height - 15)))
            axes = (int(rng.integers(5, 14)), int(rng.integers(5, 14)))
            label = int(rng.integers(0, 2))
            angle = float(rng.uniform(0, 180))
            gt_masks.append(_blob(height, width, centre, axes, angle))
            gt_labels.append(label)
            if k == count - 1 and height == 100:
                continue  # missed object
            shift = int(rng.integers(0, 5))  # 0..4 px: IoU from 1 down to ~0.5
            pred_masks.append(_blob(height, width, (centre[0] + shift, centre[1]), axes, angle))
            pred_labels.append(label if k != 1 else 1 - label)  # one wrong class
            scores.append(float(rng.uniform(0.3, 1.0)))
        pred_masks.append(_blob(height, width, (10, 10), (6, 4)))  # false positive
        pred_labels.append(0)
        scores.append(0.35)
        gt = {"masks": np.stack(gt_masks), "labels": np.array(gt_labels)}
        if height == 60:
            gt["has_mask"] = np.array([True, True, False])  # a box-only object: not a mask ground truth
        gts.append(gt)
        preds.append(
            {"masks": np.stack(pred_masks), "labels": np.array(pred_labels), "scores": np.array(scores)}
        )
    preds[2] = {"masks": np.zeros((0, 50, 50), bool), "labels": np.zeros(0, int), "scores": np.zeros(0)}
    return preds, gts


def _pycocotools_precision(preds, gts) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict, detections = mask_coco_dicts(preds, gts, NUM_CLASSES)
    coco_gt = COCO()
    coco_gt.dataset = gt_dict
    coco_gt.createIndex()
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    return evaluator.eval["precision"][:, :, :, 0, -1]  # (iou thresholds, recall points, classes)


def _mean(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else float("nan")


def test_mask_map_matches_pycocotools():
    preds, gts = _fixture()
    ours = mask_map(preds, gts, NUM_CLASSES)
    precision = _pycocotools_precision(preds, gts)
    assert ours["mask_mAP_50"] == pytest.approx(_mean(precision[0]), abs=1e-9)
    assert ours["mask_mAP_50_95"] == pytest.approx(_mean(precision), abs=1e-9)
    for k in range(2):
        assert ours["mask_AP50"][k] == pytest.approx(_mean(precision[0, :, k]), abs=1e-9)
        assert ours["mask_AP50_95"][k] == pytest.approx(_mean(precision[:, :, k]), abs=1e-9)
    assert np.isnan(ours["mask_AP50"][2]) and np.isnan(ours["mask_AP50_95"][2])
    assert 0 < ours["mask_mAP_50_95"] < ours["mask_mAP_50"] < 1  # the fixture is neither perfect nor empty


def test_mask_map_on_a_hand_computed_case():
    """One object. An identical mask: AP 1 everywhere. A mask with IoU 0.64: a hit at IoU thresholds 0.5,
    0.55, 0.6 only, so AP50 = 1 and AP50:95 = 3 / 10."""
    gt_mask = np.zeros((1, 40, 40), bool)
    gt_mask[0, 10:30, 10:30] = True  # 400 px
    gts = [{"masks": gt_mask, "labels": np.array([0])}]
    same = [{"masks": gt_mask.copy(), "labels": np.array([0]), "scores": np.array([0.9])}]
    assert mask_map(same, gts, 1)["mask_mAP_50_95"] == pytest.approx(1.0)

    shifted = np.zeros((1, 40, 40), bool)
    shifted[0, 10:30, 15:35] = True
    shifted[0, 10:30, 14] = True  # overlap 320, union 500: IoU 0.64
    result = mask_map([{"masks": shifted, "labels": np.array([0]), "scores": np.array([0.9])}], gts, 1)
    assert result["mask_mAP_50"] == pytest.approx(1.0)
    assert result["mask_mAP_50_95"] == pytest.approx(0.3)


def test_mask_map_without_ground_truth_and_rle_round_trip():
    empty_gt = [{"masks": np.zeros((0, 20, 20), bool), "labels": np.zeros(0, int)}]
    pred = [{"masks": np.ones((1, 20, 20), bool), "labels": np.array([0]), "scores": np.array([0.5])}]
    result = mask_map(pred, empty_gt, 2)
    assert result["mask_mAP_50"] == 0.0 and np.isnan(result["mask_AP50"]).all()

    from faster_coco_eval.core import mask as mask_utils

    masks = np.stack([_blob(30, 40, (20, 15), (8, 5)), _blob(30, 40, (5, 5), (3, 3))])
    rles = encode_masks(masks)
    assert all(isinstance(rle["counts"], str) and rle["size"] == [30, 40] for rle in rles)
    decoded = mask_utils.decode(rles)  # (H, W, K)
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks)


def test_mask_iou_pairs_masks_by_index():
    from src.metrics.masks import mask_iou

    a = np.zeros((3, 10, 10), bool)
    b = np.zeros((3, 10, 10), bool)
    a[0, :5], b[0, :, :5] = True, True  # 25 / 75
    a[1, 2:4, 2:4], b[1, 2:4, 2:4] = True, True  # identical
    assert mask_iou(a, b).tolist() == pytest.approx([1 / 3, 1.0, 1.0])  # third pair: both empty
    # no pairs at all (an image where no detection pairs up in export parity): empty, not an error
    assert mask_iou(np.zeros((0,)), np.zeros((0,))).shape == (0,)
    assert mask_iou(np.zeros((0, 10, 10), bool), np.zeros((0, 10, 10), bool)).shape == (0,)


@pytest.mark.parametrize("keep_ratio", [True, False])
def test_validation_records_score_perfect_network_masks_as_perfect(keep_ratio, tmp_path):
    """The validation path (postprocessor mask logits at 1/4 of the network input -> original-size masks
    -> RLE, GT from the label polygons at the original size): logits drawn from the GT polygons themselves
    give mask mAP50 1 on a letterboxed or resized image of odd size, and the records hold RLEs only."""
    import torch

    from src.common.masks import polygons_to_masks
    from src.common.network_input import letterbox_or_resize
    from src.metrics.records import batch_records
    from src.metrics.validator import evaluate

    polygons = [
        np.array([[0.1, 0.1], [0.5, 0.15], [0.3, 0.6]], np.float32),
        np.array([[0.55, 0.5], [0.95, 0.5], [0.95, 0.9], [0.55, 0.9]], np.float32),
        None,  # a box-only object (train.allow_box_only): no mask ground truth
    ]
    _, meta = letterbox_or_resize(np.zeros((137, 201, 3), np.uint8), (128, 160), keep_ratio)
    # The GT polygons at the network input: normalised in the original -> normalised in the network input.
    to_net = np.array([meta.orig_w * meta.scale_x, meta.orig_h * meta.scale_y]) / [meta.net_w, meta.net_h]
    offset = np.array([meta.pad_x / meta.net_w, meta.pad_y / meta.net_h])
    net_masks = polygons_to_masks([p * to_net + offset for p in polygons[:2]], 128 // 4, 160 // 4)
    logits = torch.from_numpy(np.where(net_masks, 8.0, -8.0)).float()  # (2, 32, 40)
    # the objects' own boxes (the target's, in network pixels): the box matching pairs them for mask_iou
    boxes = torch.tensor([[16, 12.8, 80, 76.8], [88, 64, 152, 115.2]], dtype=torch.float32)
    result = {
        "labels": torch.tensor([0, 1]),
        "boxes": boxes,
        "scores": torch.tensor([0.9, 0.8]),
        "masks": logits,
    }
    target = {
        "labels": torch.tensor([0, 1, 1]),
        "boxes": torch.tensor([[0.3, 0.35, 0.4, 0.5], [0.75, 0.7, 0.4, 0.4], [0.2, 0.8, 0.1, 0.1]]),
        "image_id": 0,
        "letterbox": meta,
        "polygons": polygons,
        "path": str(tmp_path / "grey.png"),
    }
    cv2.imwrite(target["path"], np.full((137, 201, 3), 128, np.uint8))
    preds, gts = batch_records([result], [target])
    assert all(isinstance(rle["counts"], str) for rle in preds[0]["mask"]["rles"] + gts[0]["mask"]["rles"])
    assert len(gts[0]["mask"]["rles"]) == 2  # the box-only object has no mask ground truth
    metrics = evaluate(preds, gts, ["a", "b"]).metrics
    assert metrics["mask_mAP_50"] == pytest.approx(1.0)
    assert metrics["mask_mAP_50_95"] > 0.6  # a 1/4-resolution mask is not pixel-exact at high IoUs
    assert 0.85 < metrics["mask_iou"] <= 1.0  # both found objects, their masks from the 1/4 map
    # The eval pictures draw the masks: the grey image is tinted inside the objects, left alone outside.
    from src.common.images import read_image_rgb
    from src.common.masks import polygon_to_mask
    from src.metrics.plots import save_eval_images

    (picture,) = save_eval_images(preds, gts, tmp_path / "eval", ["a", "b"], 0.5, 1)
    drawn = read_image_rgb(picture).astype(int)
    inside = polygon_to_mask(polygons[1], 137, 201)
    assert np.abs(drawn[inside] - 128).max(-1).mean() > 40 and np.abs(drawn[60:70, 5:10] - 128).max() < 8


def test_masks_in_boxes_equal_masks_to_original():
    """The (H, W, K) layout of the box-cropped resampling (validation's RLEs) gives masks_to_original(..., boxes_xyxy=...)'s pixels (float32
    rounding of the sampling grid may flip a pixel sitting exactly on the 0.5 boundary)."""
    import torch

    from src.common.network_input import letterbox_or_resize, masks_in_boxes, masks_to_original

    for (height, width), keep_ratio in (((120, 150), True), ((61, 97), False)):
        _, meta = letterbox_or_resize(np.zeros((height, width, 3), np.uint8), (64, 96), keep_ratio)
        logits = torch.randn(12, 16, 24, generator=torch.Generator().manual_seed(0))
        corners = np.random.default_rng(0).uniform(-5, 1.1, (12, 4)) * np.array([width, height] * 2)
        boxes = np.concatenate([corners[:, :2].clip(0), np.maximum(corners[:, :2], corners[:, 2:])], 1)
        expected = masks_to_original(logits, meta, boxes_xyxy=boxes).numpy().transpose(1, 2, 0)
        ours = masks_in_boxes(logits, meta, boxes, hwk=True)  # the layout RLE encoding reads
        assert ours.flags.f_contiguous and ours.shape == expected.shape and expected.any()
        assert (ours.astype(bool) != expected).sum() <= max(1, expected.size // 10_000)


def _square(size: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_matched_mask_iou_pairs_by_box_and_counts_poor_masks():
    """Two objects (one box-only): the box matching decides the pairs, so a mask covering half its object
    counts with IoU 0.5 (mask mAP's own mask matching would leave it out at 0.55+); a detection under
    conf_thresh, a detection of another class and the box-only object add no pair; a masked detection's
    RLE is found by its index among all detections."""
    from src.metrics.masks import encode_masks, matched_mask_iou

    gt_masks = np.stack([_square(40, 10, 10, 30, 30), _square(40, 0, 0, 8, 8)])
    box_gt = {
        "boxes": np.array([[10, 10, 30, 30], [0, 0, 8, 8], [30, 30, 40, 40]], float),
        "labels": np.array([0, 0, 1]),
    }
    mask_gt = {"rles": encode_masks(gt_masks), "labels": np.array([0, 0]), "index": np.array([0, 1])}
    box_pred = {
        "boxes": np.array([[30, 30, 40, 40], [10, 10, 30, 30], [0, 0, 8, 8], [0, 0, 8, 8]], float),
        "scores": np.array([0.9, 0.8, 0.6, 0.1]),
        "labels": np.array([1, 0, 1, 0]),  # the box-only object found; the half mask; a wrong class; too low
    }
    pred_masks = np.stack([_square(40, 30, 30, 40, 40), _square(40, 10, 10, 30, 20), _square(40, 0, 0, 8, 8)])
    mask_pred = {
        "rles": encode_masks(pred_masks),
        "scores": box_pred["scores"][:3],
        "labels": box_pred["labels"][:3],
        "index": np.arange(3),
    }
    assert matched_mask_iou([box_pred], [box_gt], [mask_pred], [mask_gt], 0.5) == pytest.approx(0.5)
    # the low-score detection of the small object, with its mask, counts once conf_thresh lets it in
    mask_pred = {
        **mask_pred,
        "rles": encode_masks(np.concatenate([pred_masks[:2], pred_masks[2:]] + [gt_masks[1:]])),
        "index": np.arange(4),
    }
    assert matched_mask_iou([box_pred], [box_gt], [mask_pred], [mask_gt], 0.05) == pytest.approx(0.75)
    # nothing paired: 0, as the validator's box "iou" without a true positive
    assert matched_mask_iou([box_pred], [box_gt], [mask_pred], [mask_gt], 0.95) == 0.0
    # a background image (no object) beside it: its confident detections pair with nothing
    empty_gt = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)}
    empty_mask_gt = {"rles": [], "labels": np.zeros(0, np.int64), "index": np.zeros(0, np.int64)}
    both = matched_mask_iou(
        [box_pred, box_pred], [box_gt, empty_gt], [mask_pred, mask_pred], [mask_gt, empty_mask_gt], 0.05
    )
    assert both == pytest.approx(0.75)
