"""Run any Detector over a split and score it with src/metrics/validator.py (export parity, bench, check_errors,
ov_int8 all use this one loop). Ground truth comes from the split CSVs and YOLO labels (src/etl/splits.py);
a model trained with model.use_one_class=true is scored against every box as its one class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from omegaconf import DictConfig
from tqdm import tqdm

from src.common.images import ImageReadError, image_size, read_image_rgb
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

    def read_image(self) -> np.ndarray:
        return read_image_rgb(self.path)

    def ground_truth(self, width: int, height: int) -> dict[str, Any]:
        return {"boxes": self.boxes, "labels": self.labels, "width": width, "height": height,
                "image_id": self.image_id, "path": str(self.path)}  # fmt: skip


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
    boxes_norm, class_ids, _ = load_labels(paths, Path(cfg.data_path), len(label_names(cfg)))
    samples = []
    for index, (path, boxes, ids) in enumerate(zip(paths, boxes_norm, class_ids, strict=True)):
        width, height = image_size(path) if len(ids) else (1, 1)  # header only; no decode
        cx, cy, w, h = (np.asarray(boxes, np.float64).reshape(-1, 4) * [width, height, width, height]).T
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        ids = np.zeros(len(ids), np.int64) if cfg.model.use_one_class else np.asarray(ids, np.int64)
        samples.append(LabelledImage(path, xyxy, ids, split, index))
    return samples


@dataclass
class EvalResult:
    detections: list[Detections]  # per sample, every top-K detection with score >= the evaluation's min_conf
    samples: list[LabelledImage]
    metrics: dict[str, float]  # validator metrics (mAP_50, mAP_50_95, precision, recall, f1, ...)
    latencies_ms: list[float] = field(default_factory=list)  # per image: pre + inference + post (no decode)
    conf_thresh: float = 0.5  # the threshold P/R/F1 were computed at
    failed: list[str] = field(default_factory=list)  # unreadable images (skipped)

    def above(self, conf: float | np.ndarray) -> list[Detections]:
        """Detections filtered at a threshold (float, or per-class array)."""
        return [filter_detections(d, conf) for d in self.detections]

    def latency_stats(self) -> dict[str, float]:
        lat = np.asarray(self.latencies_ms or [np.nan])
        median = float(np.median(lat))
        return {
            "latency_ms_median": median,
            "latency_ms_p90": float(np.percentile(lat, 90)),
            "throughput_img_s": 1000.0 / median if median > 0 else float("nan"),
        }

    def summary(self) -> dict[str, float]:
        keys = ("mAP_50", "mAP_50_95", "precision", "recall", "f1")
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
    keep = dets.scores >= detection_thresholds(dets, conf)
    return Detections(
        dets.boxes[keep], dets.scores[keep], dets.labels[keep], [n for n, k in zip(dets.names, keep) if k],
        dets.image_size,
    )  # fmt: skip


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
    detections, latencies, kept, failed = [], [], [], []
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
        detections.append(dets)
        latencies.append(ms)
        kept.append(sample)
    metrics = score(detections, kept, detector.class_names, conf, iou_thresh)
    return EvalResult(detections, kept, metrics, latencies, conf, failed)


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
