"""Run any Detector over labelled images and score it with src/metrics/validator.py (export parity, bench,
ov_int8 and the benchmarks use this). The labelled images come from the caller: the stages read a split's
(src/dl/split_samples.py, where a model.use_one_class model's ground truth becomes its one class).

A segmentation model (its Detections carry masks) is also scored by COCO mask mAP (src/metrics/masks.py)
against the polygons of the labels, rasterised at the original image size (src/common/masks.py); objects
labelled by a box line have no mask and are left out of the mask ground truth. The evaluation keeps each
image's masks as COCO RLEs (EvalResult.mask_rles): every top-K mask at full size for a whole split would not
fit in memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from tqdm import tqdm

from src.common.images import read_image_rgb
from src.common.masks import polygons_has_mask, polygons_to_masks
from src.metrics.masks import (
    MAX_MASKS,
    MIN_MASK_SCORE,
    decode_rles,
    encode_masks,
    ground_truth_masks,
    mask_map,
)
from src.metrics.validator import evaluate
from src.runtime.detector import Detections, Detector, batched_predictions, read_each


@dataclass
class LabelledImage:
    """One labelled image of a split: ground truth in ORIGINAL pixels (the training side's augmentation
    sample is src.dl.train.augment.Sample, a different thing)."""

    path: Path
    boxes: np.ndarray  # (M, 4) float64 xyxy
    labels: np.ndarray  # (M,) int64
    split: str = ""
    image_id: int = 0
    polygons: list[np.ndarray | None] = field(default_factory=list)  # M: normalised (K, 2), None = box line

    def read_image(self) -> np.ndarray:
        return read_image_rgb(self.path)

    def ground_truth(self, width: int, height: int) -> dict[str, Any]:
        return {"boxes": self.boxes, "labels": self.labels, "width": width, "height": height,
                "image_id": self.image_id, "path": str(self.path)}  # fmt: skip

    @property
    def has_mask(self) -> np.ndarray:
        """(M,) bool: the objects labelled by a polygon (the others have no mask to score)."""
        return polygons_has_mask(self.polygons) if self.polygons else np.zeros(len(self.labels), bool)

    def masks(self, height: int, width: int) -> np.ndarray:
        """(M, height, width) bool ground-truth masks at the original image size (empty for box lines)."""
        return polygons_to_masks(self.polygons or [None] * len(self.labels), height, width)


@dataclass
class EvalResult:
    detections: list[Detections]  # per sample, every top-K detection with score >= the evaluation's min_conf
    samples: list[LabelledImage]
    metrics: dict[str, float]  # validator metrics (mAP_50, mAP_50_95, precision, recall, f1, ...)
    latencies_ms: list[float] = field(default_factory=list)  # per image: pre + inference + post (no decode)
    conf_thresh: float = 0.5  # the threshold P/R/F1 were computed at
    failed: list[str] = field(default_factory=list)  # unreadable images (skipped)
    # Segmentation models: per sample, one COCO RLE per detection (the detections' masks, which
    # `detections` do not hold: see the module doc); None for a detection model.
    mask_rles: list[list[dict]] | None = None

    def above(self, conf: float | np.ndarray) -> list[Detections]:
        """Detections filtered at a threshold (float, or per-class array); no masks (see with_masks)."""
        return [dets.filter(conf) for dets in self.detections]

    def with_masks(self, index: int) -> Detections:
        """Sample `index`'s detections with their (N, H, W) bool masks decoded (a segmentation model)."""
        dets = self.detections[index]
        if self.mask_rles is None:
            return dets
        return replace(dets, masks=decode_masks(self.mask_rles[index], dets.image_size))

    def latency_stats(self) -> dict[str, float]:
        lat = np.asarray(self.latencies_ms or [np.nan])
        median = float(np.median(lat))
        return {
            "latency_ms_median": median,
            "latency_ms_p90": float(np.percentile(lat, 90)),
            "throughput_img_s": 1000.0 / median if median > 0 else float("nan"),
        }

    def summary(self) -> dict[str, float]:
        keys = ("mAP_50", "mAP_50_95", "mask_mAP_50", "mask_mAP_50_95", "precision", "recall", "f1")
        return {k: float(self.metrics[k]) for k in keys if k in self.metrics} | {"images": len(self.samples)}


def score(
    detections: Sequence[Detections],
    samples: Sequence[LabelledImage],
    class_names: Sequence[str],
    conf: float,
    iou_thresh: float = 0.5,
) -> dict[str, float]:
    """Validator metrics of per-image detections against their samples' ground truth (P/R/F1 at conf)."""
    preds, gts = [], []
    for dets, sample in zip(detections, samples, strict=True):
        height, width = dets.image_size
        preds.append(
            {"boxes": dets.boxes, "scores": dets.scores, "labels": dets.labels, "image_id": sample.image_id}
        )
        gts.append(sample.ground_truth(width, height))
    return evaluate(preds, gts, list(class_names), conf_thresh=conf, iou_thresh=iou_thresh).metrics


def decode_masks(rles: list[dict], image_size: tuple[int, int]) -> np.ndarray:
    """One image's COCO RLEs (EvalResult.mask_rles[i]) -> (N, H, W) bool; image_size (h, w)."""
    return decode_rles(rles, *image_size)


def mask_scores(
    detections: Sequence[Detections],
    mask_rles: Sequence[list[dict]],
    samples: Sequence[LabelledImage],
    num_classes: int,
) -> dict[str, float]:
    """COCO mask mAP (mask_mAP_50, mask_mAP_50_95 and per-class mask_AP50 / mask_AP50_95 arrays) of each
    image's masked_count first detections against the samples' polygons, as training's validation scores
    them; {} when no sample has a polygon (nothing to score). Both sides go in as RLEs: one image's dense
    ground-truth masks exist only while they are encoded."""
    if not any(s.has_mask.any() for s in samples):
        logger.info("mask mAP not computed: no ground-truth polygons in these labels (box lines only)")
        return {}
    preds, gts = [], []
    for dets, rles, sample in zip(detections, mask_rles, samples, strict=True):
        height, width = dets.image_size
        n = masked_count(dets)
        preds.append({"rles": rles[:n], "labels": dets.labels[:n], "scores": dets.scores[:n]})
        polygons = sample.polygons or [None] * len(sample.labels)
        gts.append(ground_truth_masks(polygons, sample.labels, height, width))
    return mask_map(preds, gts, num_classes)


def masked_count(dets: Detections) -> int:
    """How many of an image's detections (sorted by score) an evaluation gives a mask, as training's
    validation does (metrics.masks): the MAX_MASKS best (COCO mAP reads 100 per image and class) that score
    >= MIN_MASK_SCORE. Full-size masks are what cost (resampling, then RLE-encoding): every top-K query's
    would take far longer than the prediction itself."""
    return int(min(MAX_MASKS, np.count_nonzero(dets.scores >= MIN_MASK_SCORE)))


def predict_for_evaluation(
    detector: Detector, image: np.ndarray, min_conf: float
) -> tuple[Detections, list[dict] | None, float]:
    """One image: (its detections >= min_conf without masks, one COCO RLE per detection or None for a
    detection model, the milliseconds of a deployed prediction).

    A detection model (or a detector with its own predict, e.g. sliced) is timed at min_conf, masks (if
    any) encoded. A segmentation model runs the network once: the time is the prediction at the model's own
    thresholds, masks of its kept detections included (what deployment pays); the evaluation's detections
    are selected from the same outputs untimed, the first masked_count of them with their masks, the rest
    with empty ones (mask mAP leaves them out: see mask_scores).
    """
    if detector.meta.task != "segment" or type(detector).predict is not Detector.predict:
        (dets,), ms = detector.timed([image], conf=min_conf)
        if dets.masks is None:
            return dets, None, ms
        return replace(dets, masks=None), encode_masks(dets.masks), ms
    detector.synchronize()
    start = time.perf_counter()
    outputs, (letterbox,) = detector.raw([image])
    detector.select(outputs, 0, letterbox, detector.thresholds())  # the deployed post-processing
    detector.synchronize()
    ms = (time.perf_counter() - start) * 1000.0
    dets = detector.select(outputs[:3], 0, letterbox, detector.thresholds(min_conf))  # boxes: no masks made
    best = np.argsort(-np.asarray(outputs[2][0]), kind="stable")[:MAX_MASKS]  # as _select orders them
    top_conf = detector.thresholds(max(float(min_conf), MIN_MASK_SCORE))
    top = detector.select(tuple(o[:, best] for o in outputs), 0, letterbox, top_conf)  # dets[:len(top)]
    empty = encode_masks(np.zeros((1, *dets.image_size), bool)) * (len(dets) - len(top))
    return dets, encode_masks(top.masks) + empty, ms


def evaluate_detector(
    detector: Detector,
    samples: Sequence[LabelledImage],
    conf: float | None = None,
    min_conf: float = 0.0,
    warmup: int = 0,
    desc: str = "",
    iou_thresh: float = 0.5,
    images: Sequence[np.ndarray] | None = None,
) -> EvalResult:
    """Predict every sample one image at a time (timed: decode excluded; batch 1 is what a deployed model's
    latency means) and compute the metrics. Unreadable images are skipped and listed in `failed`.

    mAP uses every top-K detection (>= min_conf, as COCO evaluation expects); P/R/F1 are at `conf`
    (default: the artifact's global threshold). images: the samples' pictures already decoded (optional).
    """
    conf = float(detector.meta.conf_thresh if conf is None else conf)
    if warmup:
        detector.warmup(warmup)
    failed: list[str] = []

    def read(item: tuple[int, LabelledImage]) -> np.ndarray:
        index, sample = item
        return images[index] if images is not None else sample.read_image()

    readable = read_each(
        enumerate(tqdm(samples, desc=desc or f"eval {detector.backend}", leave=False, dynamic_ncols=True)),
        read, lambda item, _err: failed.append(str(item[1].path)),
    )  # fmt: skip

    def one_image(batch: list[np.ndarray]) -> list[tuple[Detections, list[dict] | None, float]]:
        return [predict_for_evaluation(detector, batch[0], min_conf)]

    detections, latencies, kept, mask_rles = [], [], [], []
    for (_, sample), _, (dets, rles, ms) in batched_predictions(readable, one_image, batch_size=1):
        if rles is not None:
            mask_rles.append(rles)
        detections.append(dets)
        latencies.append(ms)
        kept.append(sample)
    metrics = score(detections, kept, detector.class_names, conf, iou_thresh)
    if mask_rles:  # a segmentation model (every image's detections carry masks)
        metrics |= mask_scores(detections, mask_rles, kept, len(detector.class_names))
    return EvalResult(detections, kept, metrics, latencies, conf, failed, mask_rles or None)


def unthresholded_scores(detector: Detector, image_paths: Sequence[str | Path]) -> list[np.ndarray]:
    """Per readable image, the scores of all its top-K detections (no threshold, no masks made), through
    the runtime's prediction loop: what false-positive statistics on background images are computed from."""
    readable = read_each(image_paths)
    return [dets.scores for _, _, dets in detector.stream(readable, conf=0.0, masks=False)]
