"""Run any Detector over a split and score it with src/metrics/validator.py (export parity, bench, check_errors,
ov_int8 all use this one loop). Ground truth comes from the split CSVs and YOLO labels (src/etl/splits.py);
a model trained with model.use_one_class=true is scored against every box as its one class.

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
from omegaconf import DictConfig
from tqdm import tqdm

from src.common.images import ImageReadError, image_size, read_image_rgb
from src.common.masks import polygons_has_mask, polygons_to_masks
from src.runtime.detector import Detections, Detector


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


def load_split_samples(cfg: DictConfig, split: str, limit: int | None = None) -> list[LabelledImage]:
    """Images and labels of <splits_dir>/<split>.csv ([] when the split file is missing or empty).

    With model.use_one_class every ground-truth box gets class 0, the one class such a model predicts.
    """
    from src.common.config import label_names
    from src.etl.splits import load_labels, read_split

    paths = read_split(cfg, split)
    if not paths:
        return []
    if limit is not None and limit > 0:
        paths = paths[:limit]
    labels = load_labels(paths, Path(cfg.data_path), len(label_names(cfg)))
    samples = []
    for index, (path, boxes, ids, polygons) in enumerate(zip(paths, *labels, strict=True)):
        width, height = image_size(path) if len(ids) else (1, 1)  # header only; no decode
        cx, cy, w, h = (np.asarray(boxes, np.float64).reshape(-1, 4) * [width, height, width, height]).T
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        ids = np.zeros(len(ids), np.int64) if cfg.model.use_one_class else np.asarray(ids, np.int64)
        samples.append(LabelledImage(path, xyxy, ids, split, index, list(polygons)))
    return samples


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
        return [filter_detections(d, conf) for d in self.detections]

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
    from src.metrics.validator import evaluate

    preds, gts = [], []
    for dets, sample in zip(detections, samples, strict=True):
        height, width = dets.image_size
        preds.append(
            {"boxes": dets.boxes, "scores": dets.scores, "labels": dets.labels, "image_id": sample.image_id}
        )
        gts.append(sample.ground_truth(width, height))
    return evaluate(preds, gts, list(class_names), conf_thresh=conf, iou_thresh=iou_thresh).metrics


def detection_thresholds(dets: Detections, conf: float | np.ndarray) -> np.ndarray:
    """(N,) the threshold each detection is held to: conf is one float or per-class thresholds (C,)."""
    thresholds = np.asarray(conf, np.float32)
    return thresholds[dets.labels] if thresholds.ndim else np.full(len(dets), float(thresholds), np.float32)


def filter_detections(dets: Detections, conf: float | np.ndarray) -> Detections:
    """The detections scoring >= conf (one float or per-class thresholds (C,)), masks included."""
    return select_detections(dets, dets.scores >= detection_thresholds(dets, conf))


def select_detections(dets: Detections, keep: np.ndarray) -> Detections:
    """A subset of one image's detections (keep: (N,) bool or indices), masks included when present."""
    index = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
    return Detections(
        dets.boxes[index], dets.scores[index], dets.labels[index], [dets.names[i] for i in index],
        dets.image_size, None if dets.masks is None else dets.masks[index],
    )  # fmt: skip


def decode_masks(rles: list[dict], image_size: tuple[int, int]) -> np.ndarray:
    """One image's COCO RLEs (EvalResult.mask_rles[i]) -> (N, H, W) bool; image_size (h, w)."""
    from src.metrics.masks import decode_rles

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
    from src.metrics.masks import ground_truth_masks, mask_map

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
    >= MIN_MASK_SCORE. Full-size masks are what cost: on one core of a 2-core AMD EPYC, 300 masks of a
    640x480 image took 1.2-1.6 s to resample (network_input.masks_to_original) + 0.6-0.8 s to RLE-encode."""
    from src.metrics.masks import MAX_MASKS, MIN_MASK_SCORE

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
    from src.metrics.masks import MAX_MASKS, MIN_MASK_SCORE, encode_masks

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
    """Predict every sample one image at a time (timed: decode excluded) and compute the metrics.

    mAP uses every top-K detection (>= min_conf, as COCO evaluation expects); P/R/F1 are at `conf`
    (default: the artifact's global threshold). images: the samples' pictures already decoded (optional).
    """
    conf = float(detector.meta.conf_thresh if conf is None else conf)
    if warmup:
        detector.warmup(warmup)
    detections, latencies, kept, failed, mask_rles = [], [], [], [], []
    for index, sample in enumerate(
        tqdm(samples, desc=desc or f"eval {detector.backend}", leave=False, dynamic_ncols=True)
    ):
        try:
            image = images[index] if images is not None else sample.read_image()
        except (ImageReadError, OSError) as err:
            logger.warning(f"skipped: {err}")
            failed.append(str(sample.path))
            continue
        dets, rles, ms = predict_for_evaluation(detector, image, min_conf)
        if rles is not None:
            mask_rles.append(rles)
        detections.append(dets)
        latencies.append(ms)
        kept.append(sample)
    metrics = score(detections, kept, detector.class_names, conf, iou_thresh)
    if mask_rles:  # a segmentation model (every image's detections carry masks)
        metrics |= mask_scores(detections, mask_rles, kept, len(detector.class_names))
    return EvalResult(detections, kept, metrics, latencies, conf, failed, mask_rles or None)


def load_experiment_model(
    cfg: DictConfig,
    model_path: str | None = None,
    precision: str | None = None,
    conf: float | dict | None = None,
) -> Detector:
    """A stage's model: `model_path` when given, else the experiment's best artifact for cfg.device."""
    from omegaconf import OmegaConf

    from src.common.errors import UserError
    from src.common.experiment import Experiment
    from src.runtime import best_artifact, load_model
    from src.runtime.slicing import sliced_if_configured

    if OmegaConf.is_config(conf):  # {class: threshold} from the command line / config.yaml
        conf = OmegaConf.to_container(conf)
    try:
        path = Path(model_path) if model_path else best_artifact(Experiment.of(cfg).root, str(cfg.device))
        detector = load_model(path, device=str(cfg.device), precision=precision, conf=conf)
        detector = sliced_if_configured(detector, cfg)  # slicing.enabled (auto: trained on tiles)
    except FileNotFoundError as err:  # nothing trained / exported, or a mistyped model_path: one line
        raise UserError(str(err)) from err
    logger.info(f"model: {detector}")
    return detector
