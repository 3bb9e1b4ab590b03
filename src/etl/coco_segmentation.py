"""COCO segmentation <-> YOLO-seg outlines (used by src/etl/convert.py).

COCO -> YOLO-seg, an annotation's `segmentation`:
- polygons `[[x1, y1, x2, y2, ...], ...]` in pixels: one part as it is; an object in several parts (cut
  by an occluder) becomes one outline joining the parts by zero-width bridges (etl.polygons.
  merge_polygon_parts, as Ultralytics merges them): it rasterises to the union of the parts;
- RLE `{"size": [h, w], "counts": ...}`, compressed (a string) or uncompressed (a list of run lengths, how
  COCO stores crowd regions): decoded with faster_coco_eval, each connected part traced with
  common.masks.mask_to_polygon (holes are not kept: a YOLO-seg line is one outline), the parts merged the
  same way;
- absent or empty: the object stays a box line, so a detection-only COCO file converts as before.
  An unreadable segmentation also keeps the box line, with a warning naming the annotation.
YOLO-seg -> COCO: a polygon line gets `segmentation` [[x1, y1, ...]] in pixels, `area` the polygon's area and
`bbox` its extent; a box line gets bbox and area of the box and no segmentation.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from loguru import logger

from src.common.masks import mask_to_polygon
from src.etl.labels import polygon_area
from src.etl.polygons import merge_polygon_parts

NAMED = 10  # unreadable annotations named in the warning
DECIMALS = 3  # pixel coordinates written to COCO


def rle_mask(segmentation: dict) -> np.ndarray:
    """(h, w) bool mask of a compressed or uncompressed COCO RLE."""
    from faster_coco_eval.core import mask as mask_utils

    height, width = (int(v) for v in segmentation["size"])
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed run lengths
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def mask_parts(mask: np.ndarray) -> list[np.ndarray]:
    """The outline of each connected part of a (H, W) bool mask, normalised (K, 2) (specks under a pixel
    dropped)."""
    height, width = mask.shape
    count, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    parts = []
    for label in range(1, count):
        x, y, w, h = (int(v) for v in stats[label, :4])
        # each part traced in its own box, padded by a pixel so its contour never touches the crop's edge
        crop = np.pad(components[y : y + h, x : x + w] == label, 1)
        outline = mask_to_polygon(crop)
        if outline is not None:
            parts.append((outline * [w + 2, h + 2] + [x - 1, y - 1]) / [width, height])
    return parts


def polygon_parts(segmentation: list) -> list[np.ndarray]:
    """COCO polygon parts (pixels) of at least 3 points."""
    parts = [np.asarray(part, np.float64) for part in segmentation]
    return [part.reshape(-1, 2) for part in parts if part.ndim == 1 and len(part) >= 6 and len(part) % 2 == 0]


class Outlines:
    """Reads the annotations' outlines (pixels) and counts what it found, for one log line at the end."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.unreadable: list[str] = []

    def read(self, annotation: dict, width: int, height: int) -> np.ndarray | None:
        """The object's outline (K, 2) in image pixels, or None (keep the box line)."""
        segmentation = annotation.get("segmentation")
        if not segmentation:
            return None
        try:
            if isinstance(segmentation, dict):
                kind, parts = "RLE", [p * [width, height] for p in mask_parts(rle_mask(segmentation))]
            else:
                kind, parts = "polygon", polygon_parts(segmentation)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            self.unreadable.append(f"{annotation.get('id')} ({type(err).__name__}: {err})")
            return None
        outline = merge_polygon_parts(parts)
        if outline is None:
            self.unreadable.append(f"{annotation.get('id')} (no part with 3 points)")
            return None
        self.counts[kind] += 1
        self.counts["merged"] += len(parts) > 1
        return outline

    def log(self, source: Path) -> None:
        if self.counts:
            logger.info(
                f"{source}: outlines from {self.counts['polygon']} polygon and {self.counts['RLE']} RLE "
                f"segmentation(s), {self.counts['merged']} of them multi-part (parts joined into one outline)"
            )
        if self.unreadable:
            more = f" ... and {len(self.unreadable) - NAMED} more" if len(self.unreadable) > NAMED else ""
            logger.warning(
                f"{source}: {len(self.unreadable)} annotation(s) with an unusable segmentation keep only their "
                f"box: {', '.join(self.unreadable[:NAMED])}{more}"
            )


def coco_annotation(
    ann_id: int,
    image_id: int,
    class_id: int,
    box: np.ndarray,
    polygon: np.ndarray | None,
    width: int,
    height: int,
) -> dict:
    """One COCO annotation from a normalised cxcywh box and, for a polygon line, its normalised outline."""
    cx, cy, w, h = (float(v) for v in box)
    bbox = [
        round((cx - w / 2) * width, DECIMALS),
        round((cy - h / 2) * height, DECIMALS),
        round(w * width, DECIMALS),
        round(h * height, DECIMALS),
    ]
    annotation: dict = {"id": ann_id, "image_id": image_id, "category_id": class_id}
    if polygon is None:
        return annotation | {"bbox": bbox, "area": round(bbox[2] * bbox[3], DECIMALS), "iscrowd": 0}
    pixels = np.asarray(polygon, np.float64) * [width, height]
    annotation["segmentation"] = [np.round(pixels, DECIMALS).reshape(-1).tolist()]
    return annotation | {"bbox": bbox, "area": round(polygon_area(pixels), DECIMALS), "iscrowd": 0}
