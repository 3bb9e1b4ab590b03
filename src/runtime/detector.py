"""The one inference API over every backend: images in, thresholded detections in original pixels out.

The shared geometry (src/common/network_input.py) is used for every backend: each image is letterboxed or
resized to the network input, the fused postprocessing gets the NETWORK size (w, h) as its target size,
and `boxes_to_original` maps the boxes back. A segmentation model's 4th output (low-resolution mask logits
of the top-K queries) becomes, for the kept detections only, bool masks of the original image
(`masks_in_boxes`: `masks_to_original` inside each box only). A backend runner only runs the graph.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from loguru import logger

from src.common.images import ImageReadError, read_image_rgb
from src.common.masks import mask_to_polygon
from src.common.network_input import Letterbox, boxes_to_original, masks_in_boxes, preprocess_images
from src.runtime.backend import Outputs
from src.runtime.meta import ModelMeta


class Runner(Protocol):
    backend: str  # torch | onnx | openvino | tensorrt
    meta: ModelMeta
    batch_size: int | None  # fixed batch of the artifact, None = dynamic
    device: Any
    precision: str

    def __call__(self, images: np.ndarray, sizes: np.ndarray) -> Outputs: ...


Key = TypeVar("Key")  # what a stream's caller tells its items apart by: a path, a frame index, a sample
Result = TypeVar("Result")

# Decimals written to JSON/CSV: boxes in pixels (1/100 px is far below any model's precision), scores,
# normalised polygon coordinates (1e-5: a tenth of a pixel on a 10 000 px image).
BOX_DECIMALS = 2
SCORE_DECIMALS = 4
POLYGON_DECIMALS = 5


def rounded(values, decimals: int) -> list:
    """Nested Python floats rounded for serialisation. Rounding happens in float64: a float32 0.3 rounded
    in float32 would still print as 0.30000001192092896."""
    return np.round(np.asarray(values, np.float64), decimals).tolist()


@dataclass
class Detections:
    """Detections of one image, sorted by score (descending)."""

    boxes: np.ndarray  # (N, 4) float32 xyxy in original image pixels
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64 class ids
    names: list[str]  # (N,) class name of each detection
    image_size: tuple[int, int]  # original (h, w)
    masks: np.ndarray | None = (
        None  # segmentation models: (N, h, w) bool instance masks of the original image
    )

    def __len__(self) -> int:
        return len(self.labels)

    def held_to(self, conf: float | np.ndarray) -> np.ndarray:
        """(N,) the threshold each detection is held to: conf is one float or per-class thresholds (C,)."""
        per_class = np.asarray(conf, np.float32)
        return per_class[self.labels] if per_class.ndim else np.full(len(self), float(per_class), np.float32)

    def filter(self, conf: float | np.ndarray) -> Detections:
        """The detections scoring >= conf (one float or per-class thresholds (C,)), masks included."""
        return self.select(self.scores >= self.held_to(conf))

    def select(self, keep: np.ndarray) -> Detections:
        """A subset (keep: (N,) bool or indices, in the order given), masks included when present."""
        index = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
        return Detections(
            self.boxes[index], self.scores[index], self.labels[index], [self.names[i] for i in index],
            self.image_size, None if self.masks is None else self.masks[index],
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (JSON-ready): boxes rounded to BOX_DECIMALS, scores to SCORE_DECIMALS (the arrays
        themselves are untouched). A segmentation model's detections add "polygons": per detection its
        mask's largest outer contour as normalised [[x, y], ...] (common.masks.mask_to_polygon; None for a
        mask too small to outline)."""
        out = {
            "boxes": rounded(self.boxes.reshape(-1, 4), BOX_DECIMALS),
            "scores": rounded(self.scores, SCORE_DECIMALS),
            "labels": self.labels.tolist(),
            "names": list(self.names),
            "image_size": list(self.image_size),
        }
        if self.masks is not None:
            polygons = (mask_to_polygon(mask) for mask in self.masks)
            out["polygons"] = [None if p is None else rounded(p, POLYGON_DECIMALS) for p in polygons]
        return out


ImageLike = np.ndarray | str | Path


class Detector:
    """`detector(images, conf=None, bgr=False)` on any backend; build with `src.runtime.load_model`.

    images: one image (uint8 (H, W, 3) array, or a file path) -> one Detections;
            a list of them or a uint8 (B, H, W, 3) array -> a list of Detections (one per image).
    Arrays are RGB by default (what `read_image_rgb` returns); pass bgr=True for OpenCV frames
    (cv2.imread / VideoCapture). Paths are always read correctly (as RGB).
    conf: None -> the artifact's thresholds (global + per-class, from training); a float -> one threshold
          for every class; a dict {class name or id: threshold} -> changes only those classes; an array
          (num_classes,) -> every class's threshold (np.inf: the class is never reported).
    Streams (folders, videos): `detector.stream(items)` (see `batched_predictions`).
    """

    def __init__(self, runner: Runner, conf: float | dict | None = None):
        self.runner = runner
        self.meta = runner.meta
        self.path = getattr(runner, "path", None)
        self.default_conf = conf

    # ------------------------------------------------------------------ info
    @property
    def backend(self) -> str:
        return self.runner.backend

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    @property
    def img_size(self) -> tuple[int, int]:
        return self.meta.img_size

    @property
    def max_batch(self) -> int:
        """Default chunk size for a list of images: the fixed batch of the artifact, else the largest batch
        it was exported for (torch: 8). predict(batch_size=...) overrides it for dynamic artifacts."""
        return self.runner.batch_size or max(
            1, getattr(self.runner, "max_batch_size", self.meta.max_batch_size)
        )

    def thresholds(self, conf: float | dict | np.ndarray | None = None) -> np.ndarray:
        """Per-class thresholds (num_classes,) that a call with `conf` applies."""
        if conf is None:
            conf = self.default_conf
        if isinstance(conf, dict) and isinstance(self.default_conf, dict) and conf is not self.default_conf:
            conf = {**self.default_conf, **conf}
        return self.meta.thresholds_array(conf)

    def __repr__(self) -> str:
        return (
            f"Detector(backend={self.backend}, path={self.path}, device={self.runner.device}, "
            f"precision={self.runner.precision}, classes={len(self.class_names)}, img_size={self.img_size})"
        )

    # ------------------------------------------------------------------ inference
    def __call__(
        self, images: ImageLike | Sequence[ImageLike], conf: float | dict | None = None, bgr: bool = False
    ) -> Detections | list[Detections]:
        single, image_list = _as_image_list(images, bgr)
        results = self.predict(image_list, conf)
        return results[0] if single else results

    def predict(
        self,
        images_rgb: Sequence[np.ndarray],
        conf: float | dict | np.ndarray | None = None,
        batch_size: int | None = None,
        masks: bool = True,
    ) -> list[Detections]:
        """RGB uint8 images -> one Detections per image, sent to the backend in chunks of `batch_size`
        (default `max_batch`). masks=False: a segmentation model's detections come without masks (making
        full-size masks is the costly part of its post-processing)."""
        thresholds = self.thresholds(conf)
        results: list[Detections] = []
        for chunk in iter_chunks(images_rgb, batch_size or self.max_batch):
            outputs, letterboxes = self.raw(chunk)
            outputs = outputs if masks else outputs[:3]
            results += [self.select(outputs, i, lb, thresholds) for i, lb in enumerate(letterboxes)]
        return results

    def stream(
        self,
        items: Iterable[tuple[Key, np.ndarray]],
        conf: float | dict | np.ndarray | None = None,
        masks: bool = True,
    ) -> Iterator[tuple[Key, np.ndarray, Detections]]:
        """(key, RGB image) pairs of any length (a folder's files, a video's frames) -> (key, image, its
        Detections), predicted `max_batch` at a time: memory holds one batch, whatever the stream's length."""
        return batched_predictions(
            items, lambda images: self.predict(images, conf, masks=masks), self.max_batch
        )

    def raw(self, images_rgb: Sequence[np.ndarray]) -> tuple[Outputs, list[Letterbox]]:
        """The backend's top-K outputs (boxes in network pixels) for up to `max_batch` RGB images."""
        batch, letterboxes = preprocess_images(images_rgb, self.meta.img_size, self.meta.keep_ratio)
        return self.run_batch(batch), letterboxes

    def run_batch(self, batch: np.ndarray) -> Outputs:
        """Run a preprocessed (B, 3, h, w) float32 batch; a fixed-batch artifact gets it zero-padded."""
        count = len(batch)
        fixed = self.runner.batch_size
        if fixed is not None and count != fixed:
            if count > fixed:
                raise ValueError(f"{self.path}: batch of {count} > the artifact's fixed batch {fixed}")
            batch = np.concatenate([batch, np.zeros((fixed - count, *batch.shape[1:]), batch.dtype)])
        h, w = self.meta.img_size
        sizes = np.tile(np.array([[w, h]], np.float32), (len(batch), 1))  # network size: see module doc
        outputs = self.runner(np.ascontiguousarray(batch, np.float32), sizes)
        if len(outputs) != len(self.meta.output_names):
            raise ValueError(
                f"{self.path}: {len(outputs)} outputs, a {self.meta.task} model has "
                f"{len(self.meta.output_names)} ({', '.join(self.meta.output_names)})"
            )
        return tuple(values[:count] for values in outputs)

    def select(
        self, outputs: Outputs, index: int, letterbox: Letterbox, thresholds: np.ndarray
    ) -> Detections:
        """Image `index` of a batch's raw outputs (from `raw`) -> its Detections: the detections at or above
        their class's threshold (`thresholds` (num_classes,)), by score, in original pixels; a segmentation
        model's masks only for those (original size)."""
        labels, boxes, scores, *mask_logits = (np.asarray(o[index]) for o in outputs)  # masks: (K, h, w)
        labels = labels.astype(np.int64)
        valid = (labels >= 0) & (labels < len(thresholds))
        keep = valid & (scores >= thresholds[np.clip(labels, 0, len(thresholds) - 1)])
        kept = np.nonzero(keep)[0][np.argsort(-scores[keep], kind="stable")]  # by score, descending
        labels, scores = labels[kept], scores[kept].astype(np.float32)
        boxes = boxes_to_original(boxes[kept].astype(np.float32), letterbox)
        names = [self.class_names[i] for i in labels]
        masks = None
        if mask_logits:  # only the kept detections' logits are resampled to the original size
            masks = masks_in_boxes(mask_logits[0][kept], letterbox, boxes)
        return Detections(boxes, scores, labels, names, (letterbox.orig_h, letterbox.orig_w), masks)

    def timed(
        self,
        images_rgb: Sequence[np.ndarray],
        conf: float | dict | None = None,
        batch_size: int | None = None,
    ) -> tuple[list[Detections], float]:
        """predict() and its wall time in ms (for benchmarks: decode excluded, pre/post-processing included)."""
        self.synchronize()
        start = time.perf_counter()
        results = self.predict(images_rgb, conf, batch_size)
        self.synchronize()
        return results, (time.perf_counter() - start) * 1000.0

    def synchronize(self) -> None:
        sync = getattr(self.runner, "synchronize", None)
        if sync is not None:
            sync()

    def warmup(self, runs: int = 3, batch: int = 1) -> None:
        h, w = self.meta.img_size
        dummy = np.full((h, w, 3), 114, np.uint8)
        for _ in range(runs):
            self.predict([dummy] * batch)


def _as_image_list(images: ImageLike | Sequence[ImageLike], bgr: bool) -> tuple[bool, list[np.ndarray]]:
    """(single?, list of RGB uint8 arrays)."""
    if isinstance(images, (str, Path)):
        return True, [read_image_rgb(images)]
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            return True, [_to_rgb(images, bgr)]
        if images.ndim == 4:
            return False, [_to_rgb(image, bgr) for image in images]
        raise ValueError(f"expected an image (H, W, 3) or a batch (B, H, W, 3), got shape {images.shape}")
    return False, [read_image_rgb(i) if isinstance(i, (str, Path)) else _to_rgb(i, bgr) for i in images]


def _to_rgb(image: np.ndarray, bgr: bool) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (0..255), got {image.dtype}")
    if image.ndim == 2:  # grayscale frame
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., ::-1]) if bgr else image


def iter_chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def batched_predictions(
    items: Iterable[tuple[Key, np.ndarray]],
    predict: Callable[[list[np.ndarray]], list[Result]],
    batch_size: int,
) -> Iterator[tuple[Key, np.ndarray, Result]]:
    """The runtime's one prediction loop: (key, image) pairs gathered into batches of `batch_size`, each
    batch given to `predict` (images -> one result per image), every pair yielded again with its result, in
    order. Infer (files and frames), evaluation and the demo all run through it."""
    batch: list[tuple[Key, np.ndarray]] = []
    for item in items:
        batch.append(item)
        if len(batch) >= batch_size:
            yield from _with_results(batch, predict)
            batch = []
    if batch:
        yield from _with_results(batch, predict)


def _with_results(batch: list[tuple[Key, np.ndarray]], predict) -> Iterator[tuple[Key, np.ndarray, Result]]:
    results = predict([image for _, image in batch])
    for (key, image), result in zip(batch, results, strict=True):
        yield key, image, result


def read_each(
    items: Iterable[Key],
    read: Callable[[Key], np.ndarray] = read_image_rgb,
    on_error: Callable[[Key, Exception], None] | None = None,
) -> Iterator[tuple[Key, np.ndarray]]:
    """(item, decoded image) for every item that `read` can decode; an unreadable one is logged, handed to
    `on_error` (e.g. a run's "failed" list) and skipped."""
    for item in items:
        try:
            image = read(item)
        except (ImageReadError, OSError, ValueError) as err:
            logger.warning(f"skipped unreadable image: {err}")
            if on_error is not None:
                on_error(item, err)
            continue
        yield item, image
