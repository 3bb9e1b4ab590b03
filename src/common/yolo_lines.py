"""YOLO txt lines from normalised boxes or polygons: the one writer of the label format, for the data stages
(src/etl/labels.py, which also reads and checks it) and for the runtime's predictions (src/runtime/outputs.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def format_yolo_lines(
    class_ids: Iterable[int],
    boxes: Iterable[Sequence[float]],
    polygons: Sequence[np.ndarray | None] | None = None,
) -> str:
    """YOLO txt text for normalised cxcywh boxes (6 decimals: sub-pixel even for 10k-pixel images); an
    object with a polygon (normalised (K, 2)) is written as a YOLO-seg polygon line instead of its box."""
    class_ids, boxes = list(class_ids), list(boxes)
    polygons = list(polygons) if polygons is not None else [None] * len(class_ids)
    lines = []
    for c, b, polygon in zip(class_ids, boxes, polygons, strict=True):
        if polygon is None:
            coords = (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
        else:
            coords = np.asarray(polygon, np.float64).reshape(-1).tolist()
        lines.append(" ".join([str(int(c)), *(f"{v:.6f}" for v in coords)]))
    return "".join(line + "\n" for line in lines)
