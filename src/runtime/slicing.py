"""Sliced inference (SAHI-style) over any Detector: overlapping slices at full resolution + the whole image.

    from src.runtime import load_model
    from src.runtime.slicing import SlicedDetector
    model = SlicedDetector(load_model("output/exp/model.onnx"), overlap=0.2)
    dets = model(image_rgb)                 # the same call API and Detections as Detector

A large image shrunk to the network input loses its small objects. Each slice is the network input size
cut from the ORIGINAL pixels (no shrinking), so a small object keeps its size; the whole image is also run
(slicing.full_image) for objects larger than a slice. Detections of all passes are shifted back into image
pixels and merged per class, greedily by score: a box matching a kept one (intersection over the smaller box,
or IoU) above the threshold is merged into it (union of the boxes, the higher score: a large object cut by
slice edges comes back whole) or, with merge="nms", dropped.
A segmentation model's masks are carried: each slice's masks are pasted into the full image at the slice's
place, a merged detection's mask is the union of the masks merged into it (nmm; nms: the kept one's).

sahi's own slicing was not used: the sahi wheel requires opencv-python (this project allows only the
headless build, both at once break each other), shapely, fire and requests; the slicing and merging here are
~100 lines on the windows the tiling stage cuts too (src/common/windows.py). Stages wrap their model
when the config asks for it (src/dl/artifacts.py: sliced_if_configured).
Each slice goes through the backend at the model's input size, so latency grows with the number of slices:
a 1920x1080 image at 640 px with 0.2 overlap is 4x3 = 12 slices + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from src.common.windows import tile_windows
from src.runtime.detector import Detections, Detector

METRICS = ("ios", "iou")
MERGES = ("nmm", "nms")


class SlicedDetector(Detector):
    """A Detector whose predict() runs overlapping slices (+ the whole image) and merges the detections.

    Everything else (thresholds, class names, meta, backend, timing, warm-up) is the wrapped detector's.
    raw() stays the plain whole-image pass (the backend's top-K for one input).
    """

    def __init__(
        self,
        base: Detector,
        overlap: float = 0.2,
        full_image: bool = True,
        match_metric: str = "ios",
        match_threshold: float = 0.5,
        merge: str = "nmm",
        slice_size: tuple[int, int] | None = None,
        grow_min_score: float | None = None,
    ):
        super().__init__(base.runner, base.default_conf)
        if match_metric not in METRICS or merge not in MERGES:
            raise ValueError(f"match_metric must be one of {METRICS} and merge one of {MERGES}")
        self.path = base.path
        self.overlap, self.full_image = float(overlap), bool(full_image)
        self.match_metric, self.match_threshold, self.merge = match_metric, float(match_threshold), merge
        self.slice_size = tuple(slice_size) if slice_size else tuple(self.meta.img_size)  # (h, w)
        # nmm: only detections scoring at least this grow a merged box (None: the model's global threshold)
        self.grow_min_score = float(self.meta.conf_thresh if grow_min_score is None else grow_min_score)

    def __repr__(self) -> str:
        return f"Sliced({super().__repr__()}, slice={self.slice_size}, overlap={self.overlap})"

    def windows(self, width: int, height: int) -> np.ndarray:
        """(S, 4) xyxy crops run for one image: the slices, then the whole image when it is larger than one."""
        slices = tile_windows(width, height, self.slice_size[1], self.slice_size[0], self.overlap)
        if self.full_image and len(slices) > 1:
            slices = np.concatenate([slices, [[0, 0, width, height]]])
        return slices

    def predict(
        self,
        images_rgb: Sequence[np.ndarray],
        conf: float | dict | np.ndarray | None = None,
        batch_size: int | None = None,
        masks: bool = True,
    ) -> list[Detections]:
        results = []
        for image in images_rgb:
            height, width = image.shape[:2]
            windows = self.windows(width, height)
            crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in windows]
            per_crop = super().predict(crops, conf, batch_size, masks)
            results.append(self._merge(per_crop, windows, (height, width)))
        return results

    def _merge(
        self, per_crop: list[Detections], windows: np.ndarray, image_size: tuple[int, int]
    ) -> Detections:
        offsets = np.concatenate(
            [np.tile(w[:2], 2)[None].repeat(len(d), 0) for d, w in zip(per_crop, windows)]
        )
        boxes = np.concatenate([d.boxes.reshape(-1, 4) for d in per_crop]) + offsets.reshape(-1, 4)
        scores = np.concatenate([d.scores for d in per_crop])
        labels = np.concatenate([d.labels for d in per_crop])
        merged, groups = merge_groups(
            boxes.astype(np.float32),
            scores,
            labels,
            self.match_metric,
            self.match_threshold,
            self.merge,
            self.grow_min_score,
        )
        kept = np.array([group[0] for group in groups], np.int64)
        masks = None
        if per_crop and per_crop[0].masks is not None:  # segmentation: every crop's Detections has masks
            masks = paste_masks(per_crop, windows, groups, image_size)
        labels = labels[kept]
        names = [self.class_names[i] for i in labels]
        return Detections(merged, scores[kept].astype(np.float32), labels, names, image_size, masks)


def paste_masks(
    per_crop: list[Detections], windows: np.ndarray, groups: list[np.ndarray], image_size: tuple[int, int]
) -> np.ndarray:
    """(K, H, W) bool masks of the merged detections: for each, the union of its members' crop masks
    pasted at their windows. groups index the detections of all crops in order (merge_groups)."""
    crop_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(per_crop)]).astype(np.int64)
    first = np.cumsum([0] + [len(d) for d in per_crop])  # index of each crop's first detection
    masks = np.zeros((len(groups), *image_size), bool)
    for out, group in zip(masks, groups):
        for index in group:
            crop = crop_of[index]
            x0, y0 = (int(v) for v in windows[crop][:2])
            mask = per_crop[crop].masks[index - first[crop]]  # (crop_h, crop_w)
            out[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] |= mask
    return masks


def pairwise_overlap(box: np.ndarray, others: np.ndarray, metric: str) -> np.ndarray:
    """Overlap of one xyxy box with (N, 4) others: IoU, or intersection over the smaller area (IoS)."""
    wh = np.clip(np.minimum(box[2:], others[:, 2:]) - np.maximum(box[:2], others[:, :2]), 0, None)  # (N, 2)
    inter = wh[:, 0] * wh[:, 1]
    area = float((box[2] - box[0]) * (box[3] - box[1]))
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    denominator = np.minimum(area, areas) if metric == "ios" else area + areas - inter
    return inter / np.maximum(denominator, 1e-9)


def merge_detections(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, *rule, **options
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-wise greedy merge, highest score first. boxes (N, 4) xyxy -> kept (K, 4), scores (K,), labels (K,),
    sorted by score. rule / options: merge_groups' metric, threshold, merge ("nmm": a kept box grows to the
    union of the boxes it absorbs; "nms": they are dropped) and grow_min_score (under nmm, boxes scoring below
    it never grow a box, nor grow themselves: they are dropped as under nms)."""
    merged, groups = merge_groups(boxes, scores, labels, *rule, **options)
    kept = np.array([group[0] for group in groups], np.int64)
    return merged, scores[kept].astype(np.float32), labels[kept].astype(np.int64)


def merge_groups(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    metric: str,
    threshold: float,
    merge: str,
    grow_min_score: float = 0.0,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """merge_detections' work: (merged boxes (K, 4) sorted by score, per merged detection the input indices
    merged into it, its own first; nms: only its own, the matched ones are dropped).

    Why grow_min_score: evaluation keeps every top-K detection down to a score near 0, and under nmm a true
    small object would absorb the low-score boxes around it and grow out of its overlap with the object
    (benchmarks/small_objects.py measures the difference)."""
    order = np.argsort(-scores, kind="stable")
    boxes, labels, sorted_scores = boxes[order], labels[order], scores[order]
    grows = sorted_scores >= grow_min_score
    taken = np.zeros(len(boxes), bool)
    kept_boxes, groups = [], []
    for i in range(len(boxes)):
        if taken[i]:
            continue
        taken[i] = True
        box, members = boxes[i].copy(), [i]
        while True:  # nmm: the grown box may now match pieces the first one did not (a block cut into slices)
            rest = np.nonzero(~taken & (labels == labels[i]))[0]
            matched = rest[pairwise_overlap(box, boxes[rest], metric) >= threshold]
            if not len(matched):
                break
            taken[matched] = True
            matched = matched[grows[matched]]  # the others are dropped, as under nms
            if merge == "nms" or not grows[i] or not len(matched):
                break
            members += matched.tolist()
            box = np.concatenate(
                [
                    np.minimum(box[:2], boxes[matched, :2].min(0)),
                    np.maximum(box[2:], boxes[matched, 2:].max(0)),
                ]
            )
        kept_boxes.append(box)
        groups.append(order[members])
    return np.array(kept_boxes, np.float32).reshape(-1, 4), groups
