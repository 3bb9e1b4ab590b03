"""Why masks come out smaller than their objects: a trained segmentation model's masks, dissected.

    python -m benchmarks.mask_quality output/<exp> [--split val] [--conf 0.3] [--json out.json]

Runs the experiment's best.pt over a split (no augmentation, the validation path) and reports, per way of
turning the mask logits into masks ("variant"):
  - COCO mask AP50 / AP75 beside box AP50 / AP75, and box AP50 of boxes taken from the masks' extent;
  - over the detections scoring >= conf matched one-to-one to a ground-truth box (class-aware box IoU >= 0.5,
    src/metrics/matching.py): mean mask IoU, mean predicted / true area, and how much of the true mask is
    covered (recall) and how much of the predicted one is true (precision).
Variants: the deployed path (logit > MASK_LOGIT_THRESHOLD inside the box), other logit thresholds, no box
clearing. And an
oracle that says what the stride-4 logit map plus the upsampling can reach at best: each true mask at the
network input, area-averaged onto the mask grid, turned into logits and upsampled by masks_to_original.
A mask smaller than its object shows as recall < precision and area ratio < 1; a threshold that fixes it
as a better IoU at a negative threshold; an upsampling loss as an oracle IoU well under 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from src.common.config import complete_with_defaults
from src.common.masks import polygons_has_mask, polygons_to_masks
from src.common.network_input import (
    MASK_LOGIT_THRESHOLD,
    box_interiors,
    boxes_to_original,
    masks_to_original,
    network_boxes_to_original_xyxy,
    resample_logits,
)
from src.metrics.coco import coco_map
from src.metrics.masks import encode_masks, mask_map
from src.metrics.matching import match_image
from src.metrics.records import network_sizes

THRESHOLDS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0)  # logit thresholds of the sweep (0 = probability 0.5)
DEPLOYED = f"t={MASK_LOGIT_THRESHOLD:+.1f}"  # the variant the runtime and validation draw
MAX_MASKS = 100  # as validation: the best 100 detections scoring >= MIN_SCORE get a mask
MIN_SCORE = 0.01


def load_experiment(exp: Path):
    """(config, eval model, postprocessor) of an experiment's best.pt."""
    from src.models import build, spec_from_checkpoint
    from src.models.checkpoint import read_checkpoint

    cfg = complete_with_defaults(OmegaConf.load(exp / "config.yaml"))
    checkpoint = read_checkpoint(exp / "best.pt")
    model, _, postprocessor = build(spec_from_checkpoint(checkpoint.meta, checkpoint.state))
    model.load_state_dict(checkpoint.state)
    return cfg, model.eval(), postprocessor.eval()


def variants(logits: torch.Tensor, values: torch.Tensor, boxes: np.ndarray, meta) -> dict[str, np.ndarray]:
    """Every variant's bool masks (K, orig_h, orig_w) of one image's kept detections from their logits
    (K, h, w) and those resampled at the original pixels (K, orig_h, orig_w)."""
    inside = box_interiors(boxes, meta.orig_h, meta.orig_w)
    out = {f"t={t:+.1f}": ((values > t) & inside).numpy() for t in THRESHOLDS}
    out[f"{DEPLOYED} no box"] = (values > MASK_LOGIT_THRESHOLD).numpy()
    # bilinear on probabilities instead of logits (0.5 crossing between a confident inside and a weak
    # outside cell lies nearer the inside one)
    out["probabilities resampled"] = (
        (resample_logits(logits.float().sigmoid(), meta) > 0.5) & inside
    ).numpy()
    return out


def oracle_masks(net_masks: torch.Tensor, stride: int, meta) -> np.ndarray:
    """True masks at the network input (n, H, W) -> the best a stride-`stride` logit map upsampled by
    masks_to_original gives: area-averaged coverage per mask pixel as logits, thresholded at 0."""
    if len(net_masks) == 0:
        return np.zeros((0, meta.orig_h, meta.orig_w), bool)
    coverage = F.avg_pool2d(net_masks.float().unsqueeze(1), stride)[:, 0]  # (n, H/s, W/s)
    logits = torch.logit(coverage.clamp(1e-3, 1 - 1e-3))
    return masks_to_original(logits, meta, threshold=0.0).numpy()  # coverage 0.5


def pair_stats(pred: np.ndarray, true: np.ndarray) -> tuple[float, float, float, float]:
    """IoU, area ratio (pred / true), recall (true covered), precision (pred that is true) of two masks."""
    inter, pred_area, true_area = (pred & true).sum(), pred.sum(), true.sum()
    union = pred_area + true_area - inter
    return (
        inter / max(union, 1),
        pred_area / max(true_area, 1),
        inter / max(true_area, 1),
        inter / max(pred_area, 1) if pred_area else 0.0,
    )


def edge_logits(values: torch.Tensor, true: np.ndarray) -> tuple[float, float]:
    """Mean resampled logit on the true mask's own outermost pixels and on the pixels just outside it
    (3x3 erosion / dilation): a mask drawn at the object's edge has the first > 0 > the second."""
    kernel = np.ones((3, 3), np.uint8)
    mask = true.astype(np.uint8)
    inner = true & ~cv2.erode(mask, kernel).astype(bool)
    outer = cv2.dilate(mask, kernel).astype(bool) & ~true
    values = values.numpy()
    return float(values[inner].mean()), float(values[outer].mean()) if outer.any() else float("nan")


def mask_box(masks: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes of bool masks (K, H, W) in pixel-edge coordinates; an empty mask keeps fallback."""
    boxes = np.asarray(fallback, np.float64).copy()
    for k, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if len(rows):
            boxes[k] = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
    return boxes


class Tally:
    """Per variant: COCO records and matched-pair statistics, gathered image by image."""

    def __init__(self) -> None:
        self.preds: dict[str, list] = {}
        self.pairs: dict[str, list] = {}
        self.box_preds, self.extent_preds, self.gts, self.mask_gts = [], [], [], []
        self.oracle: list[float] = []
        self.edges: list[tuple[float, float]] = []  # mean logit just inside / just outside each true mask

    def add(self, name: str, pred_record: dict, stats: list) -> None:
        self.preds.setdefault(name, []).append(pred_record)
        self.pairs.setdefault(name, []).extend(stats)

    def report(self, num_classes: int) -> dict:
        boxes = coco_map(self.box_preds, self.gts, num_classes)
        extent = coco_map(self.extent_preds, self.gts, num_classes)
        report = {
            "images": len(self.gts),
            "box_AP50": boxes["mAP_50"],
            "box_AP75": boxes["mAP_75"],
            "mask_extent_box_AP50": extent["mAP_50"],
            "oracle_mean_iou": float(np.mean(self.oracle)) if self.oracle else None,
            "edge_logit_inside": float(np.nanmean([e[0] for e in self.edges])) if self.edges else None,
            "edge_logit_outside": float(np.nanmean([e[1] for e in self.edges])) if self.edges else None,
            "variants": {},
        }
        for name, preds in self.preds.items():
            masks = mask_map(preds, self.mask_gts, num_classes)
            stats = np.asarray(self.pairs[name]).reshape(-1, 4)
            report["variants"][name] = {
                "mask_AP50": masks["mask_mAP_50"],
                "mask_AP75": masks["mask_mAP_75"],
                "pairs": len(stats),
                **dict(
                    zip(("iou", "area_ratio", "recall", "precision"), stats.mean(0).tolist(), strict=True)
                ),
            }
        return report


def analyse_image(tally: Tally, result: dict, target: dict, conf: float, stride: int) -> None:
    meta = target["letterbox"]
    scores, labels = result["scores"].float().numpy(), result["labels"].numpy()
    kept = np.flatnonzero(scores >= MIN_SCORE)[:MAX_MASKS]
    boxes = boxes_to_original(result["boxes"].float(), meta).numpy()[kept]
    scores, labels = scores[kept], labels[kept]
    polygons = target["polygons"]
    has_mask = polygons_has_mask(polygons)
    gt_labels = target["labels"].numpy()
    gt_boxes = network_boxes_to_original_xyxy(target["boxes"].numpy(), meta)
    true = polygons_to_masks(polygons, meta.orig_h, meta.orig_w)
    tally.gts.append({"boxes": gt_boxes, "labels": gt_labels, "width": meta.orig_w, "height": meta.orig_h})
    tally.mask_gts.append({"masks": true, "labels": gt_labels, "has_mask": has_mask})
    tally.box_preds.append({"boxes": boxes, "scores": scores, "labels": labels})
    confident = scores >= conf
    matched, _ = match_image(
        {"boxes": boxes[confident], "scores": scores[confident], "labels": labels[confident]},
        {"boxes": gt_boxes, "labels": gt_labels},
        0.5,
    )
    pairs = [
        (p, g) for p, g in zip(np.flatnonzero(confident), matched, strict=True) if g >= 0 and has_mask[g]
    ]
    values = resample_logits(result["masks"][kept], meta)  # (K, orig_h, orig_w)
    tally.edges += [edge_logits(values[p], true[g]) for p, g in pairs]
    for name, masks in variants(result["masks"][kept], values, boxes, meta).items():
        if name == DEPLOYED:
            tally.extent_preds.append({"boxes": mask_box(masks, boxes), "scores": scores, "labels": labels})
        record = {"rles": encode_masks(masks), "scores": scores, "labels": labels}
        tally.add(name, record, [pair_stats(masks[p], true[g]) for p, g in pairs])
    oracle = oracle_masks(target["masks"][torch.from_numpy(has_mask)], stride, meta)
    tally.oracle += [pair_stats(o, t)[0] for o, t in zip(oracle, true[has_mask], strict=True)]


@torch.no_grad()
def run(exp: Path, split: str, conf: float) -> dict:
    from src.dl.train.dataset import collate_fn
    from src.dl.train.setup import split_dataset

    cfg, model, postprocessor = load_experiment(exp)
    dataset = split_dataset(cfg, split, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_fn)
    stride = model.mask_head.mask_stride
    tally = Tally()
    for images, targets in loader:
        results = postprocessor(model(images), network_sizes(images))
        for result, target in zip(results, targets, strict=True):
            analyse_image(tally, result, target, conf, stride)
    return tally.report(len(dataset.class_names))


def print_report(report: dict) -> None:
    print(
        f"{report['split']}: {report['images']} images, detections >= {report['conf']:.2f} paired; box AP50 {report['box_AP50']:.3f} AP75 {report['box_AP75']:.3f}; "
        f"boxes from the masks' extent AP50 {report['mask_extent_box_AP50']:.3f}; "
        f"oracle (true mask on the stride-4 grid, upsampled) mean IoU {report['oracle_mean_iou']:.3f}; "
        f"paired masks' mean logit on the object's edge pixels {report['edge_logit_inside']:.2f}, "
        f"just outside {report['edge_logit_outside']:.2f}"
    )
    print("| variant | mask AP50 | mask AP75 | pairs | mean IoU | area ratio | recall | precision |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|")
    for name, v in report["variants"].items():
        print(
            f"| {name} | {v['mask_AP50']:.3f} | {v['mask_AP75']:.3f} | {v['pairs']} | {v['iou']:.3f} | "
            f"{v['area_ratio']:.3f} | {v['recall']:.3f} | {v['precision']:.3f} |"
        )


def deployed_threshold(exp: Path) -> float:
    """The experiment's best-F1 threshold (thresholds.json, what infer applies; the validator's mask_iou)."""
    path = exp / "thresholds.json"
    return float(json.loads(path.read_text())["conf_thresh"]) if path.exists() else 0.5


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exp", type=Path, help="an experiment folder with best.pt (model.task=segment)")
    parser.add_argument("--split", default="val")
    parser.add_argument(
        "--conf", type=float, default=0.3, help="score of the detections whose masks are paired"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    conf = args.conf if args.conf is not None else deployed_threshold(args.exp)
    report = run(args.exp, args.split, conf) | {"conf": conf, "split": args.split}
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
