"""Instance masks <-> polygons, the one conversion every stage uses (training targets, evaluation ground
truth, infer's YOLO-seg output, COCO conversion).

    masks = polygons_to_masks(polygons, height, width)     # polygons: normalised (K, 2) each, or None
    polygon = mask_to_polygon(mask)                         # (K, 2) normalised, None for an empty mask

Rasterisation keeps the pixels a polygon covers at least half (normalised (x, y) is pixel coordinate
(x * W, y * H), pixel i spans [i, i + 1]); an object without a polygon (a box line) gets an empty mask, and its
`has_mask` flag (see polygons_has_mask) says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# cv2.fillPoly fills both ends of every span (a polygon 20 px wide covers 21 pixels), a bias that
# matters for small objects. Filling at a finer resolution inside the object's box and keeping the pixels
# at least half covered cuts it to 1/factor px: 4x for objects up to 128 px, 2x up to 512 px, then 1x
# (where 1 px is under 0.2% of the size and 16x the pixels would cost tens of ms).
SUPERSAMPLE_STEPS = ((128, 4), (512, 2))


def _supersample(box_px: float) -> int:
    return next((factor for limit, factor in SUPERSAMPLE_STEPS if box_px <= limit), 1)


_SHIFT = 4  # fixed-point bits of the vertices handed to fillPoly (1/16 sub-pixel)


def polygon_to_mask(polygon: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """One normalised polygon (K, 2) -> (height, width) bool mask of the pixels it covers at least half
    (all False for None)."""
    mask = np.zeros((height, width), bool)
    if polygon is None or len(polygon) < 3:
        return mask
    points = np.asarray(polygon, np.float64).reshape(-1, 2) * [width, height]  # pixel units, edges at ints
    x0, y0 = np.floor(points.min(0)).astype(int).clip(0, [width, height])
    x1, y1 = np.ceil(points.max(0)).astype(int).clip(0, [width, height])
    if x1 <= x0 or y1 <= y0:
        return mask
    factor = _supersample(max(x1 - x0, y1 - y0))
    fine = np.zeros(((y1 - y0) * factor, (x1 - x0) * factor), np.uint8)
    local = (points - [x0, y0]) * factor - 0.5  # fine pixel j is centred at j + 0.5
    cv2.fillPoly(fine, [np.round(local * (1 << _SHIFT)).astype(np.int32)], 1, cv2.LINE_8, shift=_SHIFT)
    coverage = fine.reshape(y1 - y0, factor, x1 - x0, factor).mean(axis=(1, 3))
    mask[y0:y1, x0:x1] = coverage >= 0.5
    return mask


def polygons_to_masks(polygons: Sequence[np.ndarray | None], height: int, width: int) -> np.ndarray:
    """Normalised polygons (one per object, None for a box-only object) -> (N, height, width) bool."""
    if len(polygons) == 0:
        return np.zeros((0, height, width), bool)
    return np.stack([polygon_to_mask(p, height, width) for p in polygons])


def polygons_has_mask(polygons: Sequence[np.ndarray | None]) -> np.ndarray:
    """(N,) bool: which objects have a polygon (the others are box lines: no mask to learn or score)."""
    return np.array([p is not None for p in polygons], dtype=bool)


def mask_to_polygon(mask: np.ndarray, min_area_px: float = 1.0) -> np.ndarray | None:
    """(H, W) bool mask -> its largest outer contour as a normalised polygon (K, 2) float32, or None when
    the mask is empty or its largest part is smaller than min_area_px. Holes and smaller parts are not
    kept: a YOLO-seg line is one simple polygon."""
    mask = np.asarray(mask, bool)
    height, width = mask.shape
    # Contours run through the centres of the boundary pixels, half a pixel inside the object's edge; on
    # a 2x (nearest) copy they run a quarter pixel inside: the polygon covers the boundary pixels 3/4 and
    # rasterises back (polygon_to_mask) to the same pixels.
    doubled = np.repeat(np.repeat(mask.astype(np.uint8), 2, axis=0), 2, axis=1)
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    if len(largest) < 3 or cv2.contourArea(largest) < 4 * min_area_px:
        return None
    points = (largest.reshape(-1, 2).astype(np.float64) + 0.5) / 2  # fine pixel centres, original px
    return (points / [width, height]).clip(0.0, 1.0).astype(np.float32)
