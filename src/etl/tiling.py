"""Tile geometry of the tiling data stage (src/etl/tile.py). Where the windows go is src/common/windows.py,
shared with sliced inference (src/runtime/slicing.py).
"""

from __future__ import annotations

import numpy as np

from src.common.windows import tile_starts, tile_windows

__all__ = ["boxes_in_window", "tile_starts", "tile_windows"]  # the windows: re-exported for the stage


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
