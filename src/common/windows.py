"""Overlapping windows covering an image: the geometry the tiling data stage (src/etl/tiling.py) and sliced
inference (src/runtime/slicing.py) share, so that a model trained on tiles is sliced the way it was tiled.

A side of `length` px is covered by windows of `tile` px whose starts are spread evenly from 0 to
length - tile, as few as keep neighbours overlapping by at least `overlap` (a fraction of the window). An
object no larger than overlap * tile therefore lies whole inside at least one window.
"""

from __future__ import annotations

import math

import numpy as np


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets along one side; one window (start 0) when the side is not longer than the window."""
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
