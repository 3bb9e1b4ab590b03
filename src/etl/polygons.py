"""Polygon geometry for the data stages: clipping to a rectangle (tiles, the image) and joining the parts
of a multi-part outline into the one polygon a YOLO-seg line holds.

Polygons are (K, 2) float arrays of x, y in any one unit (pixels or normalised), implicitly closed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from src.etl.labels import polygon_area


def _clip_half_plane(points: np.ndarray, axis: int, bound: float, keep_below: bool) -> np.ndarray:
    """One Sutherland-Hodgman pass: the part of the closed polygon (K, 2) with points[:, axis] <= bound
    (keep_below) or >= bound; an edge crossing the line is cut where it crosses."""
    inside = points[:, axis] <= bound if keep_below else points[:, axis] >= bound
    out: list[np.ndarray] = []
    for index in range(len(points)):
        previous, current = points[index - 1], points[index]
        if inside[index] != inside[index - 1]:  # the edge previous -> current crosses the line
            t = (bound - previous[axis]) / (current[axis] - previous[axis])
            cut = previous + t * (current - previous)
            cut[axis] = bound  # exactly on the line, whatever the rounding
            out.append(cut)
        if inside[index]:
            out.append(current)
    return np.array(out, np.float64).reshape(-1, 2)


def _drop_repeats(points: np.ndarray) -> np.ndarray:
    """Points equal to their predecessor (cyclically) removed: the cuts can land on an existing vertex."""
    if len(points) < 2:
        return points
    keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
    return points[keep] if keep.any() else points[:1]


def clip_polygon_to_rect(polygon: np.ndarray, rect: Sequence[float]) -> np.ndarray | None:
    """The part of polygon (K, 2) inside rect (x0, y0, x1, y1) by Sutherland-Hodgman, (M, 2) float64, or
    None when less than a sliver with area is left. A concave outline cut into several pieces stays one
    polygon whose pieces are joined along the rectangle's edge (zero-width seams: it rasterises to the
    pieces)."""
    x0, y0, x1, y1 = (float(v) for v in rect)
    points = np.asarray(polygon, np.float64).reshape(-1, 2)
    low, high = points.min(0), points.max(0)
    if high[0] <= x0 or low[0] >= x1 or high[1] <= y0 or low[1] >= y1:
        return None  # wholly outside (most objects, seen from one tile)
    if low[0] < x0 or low[1] < y0 or high[0] > x1 or high[1] > y1:  # else wholly inside: kept as it is
        for axis, bound, keep_below in ((0, x0, False), (0, x1, True), (1, y0, False), (1, y1, True)):
            points = _clip_half_plane(points, axis, bound, keep_below)
            if len(points) < 3:
                return None
    points = _drop_repeats(points)
    if len(points) < 3 or polygon_area(points) <= 0:
        return None
    return points


def _closest_points(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Indices (i, j) of the closest pair a[i], b[j] (vertices)."""
    distance = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # (Ka, Kb)
    i, j = np.unravel_index(int(np.argmin(distance)), distance.shape)
    return int(i), int(j)


def merge_polygon_parts(parts: Sequence[np.ndarray]) -> np.ndarray | None:
    """The parts of one object (each (K_i, 2), >= 3 points; smaller ones are ignored) as one polygon: part
    i + 1 is joined to part i where their vertices come closest, by a zero-width bridge walked there and
    back, so the outline visits every part and still rasterises to their union (the idea of Ultralytics'
    merge_multi_segment, our own code). None when no part has 3 points."""
    parts = [np.asarray(p, np.float64).reshape(-1, 2) for p in parts]
    parts = [p for p in parts if len(p) >= 3]
    if not parts:
        return None
    links = [_closest_points(a, b) for a, b in zip(parts, parts[1:])]  # (exit of part i, entry of i + 1)
    entry = 0
    forward: list[np.ndarray] = []  # each part from its entry to its exit, in order
    back: list[np.ndarray] = []  # each part from its exit round to its entry, walked after the later parts
    for index, part in enumerate(parts):
        rolled = np.roll(part, -entry, axis=0)  # starts at the entry vertex
        if index == len(parts) - 1:
            forward.append(np.concatenate([rolled, rolled[:1]]))  # all round, back to the entry
            break
        exit_at = (links[index][0] - entry) % len(part)
        forward.append(rolled[: exit_at + 1])
        back.append(np.concatenate([rolled[exit_at:], rolled[:1]]))
        entry = links[index][1]
    outline = np.concatenate(forward + back[::-1])[:-1]  # the last point is the first again
    return _drop_repeats(outline)
