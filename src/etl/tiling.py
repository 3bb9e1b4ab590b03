"""Tiles of the tiling data stage (src/etl/tile.py): label geometry, and the files of a tiled data set. Where
the windows go is src/common/windows.py, shared with sliced inference (src/runtime/slicing.py).

A tiled data set's `tiles.csv` is its manifest: every tile the tiling stage wrote into images/ (+ labels/)
with its source image. A re-tiling writes its tiles into a staging folder, then replaces exactly the tiles
the manifest lists (`replace_tiles`); an image in images/ that the manifest does not list is an orphan,
whose source is unknown, and split refuses the set while one is there (`orphan_images`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from src.common.io import atomic_write_csv, atomic_write_json, read_json
from src.common.windows import tile_starts, tile_windows
from src.etl.labels import images_dir, label_path_for, labels_dir

TILES_CSV = "tiles.csv"
TILE_COLUMNS = ["tile", "source", "x0", "y0", "x1", "y1", "boxes"]
# {"data_path", "splits_dir"} of the full images the tiles were cut from: bench and check_errors score a
# model trained on tiles on those full images (sliced), in the same split.
TILED_FROM = "tiled_from.json"
# {"previous": [...], "new": [...]} while a re-tiling swaps its tiles in: a run stopped in between leaves it,
# and the next run removes both lists' tiles (all of them written by tiling).
REPLACING = "tiles.replacing.json"
STAGING = ".tiling-staging"  # <out>/.tiling-staging/{images,labels}: a run's tiles before they are swapped in

# the windows are re-exported for the stage
__all__ = [
    "TILED_FROM", "TILES_CSV", "TILE_COLUMNS", "boxes_in_window", "interrupted_replacement", "orphan_images",
    "read_tiles", "replace_tiles", "staging_folder", "tile_groups", "tile_name", "tile_starts", "tile_windows",
]  # fmt: skip


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


# ---------------------------------------------------------------------------------------------- tiled data set


def tile_name(source: str, window: np.ndarray) -> str:
    return f"{Path(source).stem}__x{int(window[0])}_y{int(window[1])}.jpg"


def read_tiles(folder: str | Path) -> pd.DataFrame | None:
    """<folder>/tiles.csv (None for a data set that is not tiled)."""
    path = Path(folder) / TILES_CSV
    if not path.exists():
        return None
    return pd.read_csv(path, dtype={"tile": str, "source": str}, keep_default_na=False)


def tile_groups(data_path: str | Path) -> list[list[str]]:
    """Tiles of one source image (from <data_path>/tiles.csv; [] for a data set that is not tiled)."""
    tiles = read_tiles(data_path)
    if tiles is None:
        return []
    groups = tiles.groupby("source")["tile"].apply(sorted).tolist()
    return [g for g in groups if len(g) > 1]


def orphan_images(data_path: str | Path, images: list[str]) -> list[str]:
    """Images of a tiled data set that its tiles.csv does not list ([] for a data set that is not tiled)."""
    tiles = read_tiles(data_path)
    if tiles is None:
        return []
    listed = set(tiles["tile"])
    return sorted(name for name in images if name not in listed)


def interrupted_replacement(folder: str | Path) -> bool:
    return (Path(folder) / REPLACING).exists()


def staging_folder(out: Path) -> Path:
    """An empty <out>/.tiling-staging (a stopped run's is removed: only tiling writes there)."""
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    (staging / "labels").mkdir()
    return staging


def _previous_tiles(out: Path) -> set[str]:
    """Every tile an earlier run wrote into out: its manifest's, and both lists of a stopped replacement."""
    tiles = read_tiles(out)
    previous = set(tiles["tile"]) if tiles is not None else set()
    if interrupted_replacement(out):
        stopped = read_json(out / REPLACING)
        previous |= set(stopped["previous"]) | set(stopped["new"])
    return previous


def _remove_tile(folder: Path, name: str) -> None:
    (images_dir(folder) / name).unlink(missing_ok=True)
    label_path_for(name, labels_dir(folder)).unlink(missing_ok=True)


def replace_tiles(out: Path, staging: Path, tiles: pd.DataFrame) -> int:
    """Swap the staged tiles (tiles.csv rows) into out, removing exactly the earlier runs' tiles; then write
    the manifest. Returns how many earlier tiles were removed. Files tiling did not write are left."""
    new = tiles["tile"].tolist()
    stale = sorted(_previous_tiles(out) - set(new))
    atomic_write_json(out / REPLACING, {"previous": stale, "new": new})
    for name in stale:
        _remove_tile(out, name)
    for folder in (images_dir(out), labels_dir(out)):
        folder.mkdir(parents=True, exist_ok=True)
    for name in new:
        os.replace(images_dir(staging) / name, images_dir(out) / name)
        label = label_path_for(name, labels_dir(staging))
        os.replace(label, labels_dir(out) / label.name)
    atomic_write_csv(out / TILES_CSV, tiles)
    (out / REPLACING).unlink()
    return len(stale)
