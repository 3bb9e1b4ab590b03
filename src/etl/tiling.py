"""Tile geometry shared by the tiling data stage (src/etl/tile.py) and sliced inference (src/runtime/slicing.py).

A side of `length` px is covered by tiles of `tile` px whose starts are spread evenly from 0 to length - tile,
as few as keep neighbours overlapping by at least `overlap` (a fraction of the tile). An object no larger than
overlap * tile therefore lies whole inside at least one tile.
"""

from __future__ import annotations

import math

import numpy as np


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets along one side; one tile (start 0) when the side is not longer than the tile."""
    if not 0 <= overlap < 1:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    if length <= tile:
        return [0]
    stride = tile * (1 - overlap)
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_windows(width: int, height: int, tile_w: int, tile_h: int, overlap: float) -> np.ndarray:
    """(T, 4) int xyxy windows covering a width x height image, row by row; clipped to a smaller image."""
    windows = [
        (x, y, min(x + tile_w, width), min(y + tile_h, height))
        for y in tile_starts(height, tile_h, overlap)
        for x in tile_starts(width, tile_w, overlap)
    ]
    return np.array(windows, np.int64).reshape(-1, 4)


def boxes_in_window(
    boxes_xyxy: np.ndarray, window: np.ndarray, min_visible: float
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) xyxy in image pixels clipped to a window -> (kept indices (K,), boxes (K, 4) xyxy in window
    pixels). A box is kept when the part inside keeps at least min_visible of its area (and is not empty)."""
    x0, y0, x1, y1 = (float(v) for v in window)
    clipped = np.stack(
        [
            np.clip(boxes_xyxy[:, 0], x0, x1),
            np.clip(boxes_xyxy[:, 1], y0, y1),
            np.clip(boxes_xyxy[:, 2], x0, x1),
            np.clip(boxes_xyxy[:, 3], y0, y1),
        ],
        axis=1,
    ).reshape(-1, 4)
    area = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = np.nonzero((inside > 0) & (inside >= min_visible * np.maximum(area, 1e-12)))[0]
    return keep, clipped[keep] - np.array([x0, y0, x0, y0])
