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
    """COCO RLEs (src/metrics/masks.encode_masks) -> (N, H, W) bool; image_size (h, w) for N = 0."""
    from faster_coco_eval.core import mask as mask_utils

    if not rles:
        return np.zeros((0, *image_size), bool)
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1).astype(bool))


class _Lazy(Sequence):
    """A read-only sequence whose items are made when read: mask mAP reads one image's dense masks at a
    time, so a whole split's never sit in memory together."""

    def __init__(self, count: int, make):
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.make(i) for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return self.make(index % self.count)


def mask_scores(
    detections: Sequence[Detections],
    mask_rles: Sequence[list[dict]],
    samples: Sequence[LabelledImage],
    num_classes: int,
) -> dict[str, float]:
    """COCO mask mAP (mask_mAP_50, mask_mAP_50_95 and per-class mask_AP50 / mask_AP50_95 arrays) of the
    detections' masks against the samples' polygons; {} when no sample has a polygon (nothing to score)."""
    from src.metrics.masks import mask_map

    if not any(s.has_mask.any() for s in samples):
        logger.info("mask mAP not computed: no ground-truth polygons in these labels (box lines only)")
        return {}

    def pred(i: int) -> dict:
        dets = detections[i]
        return {"masks": decode_masks(mask_rles[i], dets.image_size), "labels": dets.labels,
                "scores": dets.scores}  # fmt: skip

    def gt(i: int) -> dict:
        sample = samples[i]
        return {"masks": sample.masks(*detections[i].image_size), "labels": sample.labels,
                "has_mask": sample.has_mask}  # fmt: skip

    count = len(samples)
    return mask_map(_Lazy(count, pred), _Lazy(count, gt), num_classes)


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
    from src.metrics.masks import encode_masks

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
        (dets,), ms = detector.timed([image], conf=min_conf)
        if dets.masks is not None:  # kept compact (see the module doc)
            mask_rles.append(encode_masks(dets.masks))
            dets = replace(dets, masks=None)
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
