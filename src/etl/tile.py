"""Cut large images into overlapping tiles at the network size, once, as a data set the usual stages read.

    python -m src.etl.tile                                   # data_path -> tile.out (default <data_path>_tiles)
    python -m src.etl.tile tile.size=[640,640] tile.overlap=0.25

Small objects survive: a 1920x1080 image shrunk to 640 px loses two thirds of every object's size, a
640x640 tile cut from it loses nothing. For each of the doctor's usable images:
- tiles of tile.size (default model.img_size) overlapping by tile.overlap; an image smaller than a tile is
  one tile (the image itself);
- labels clipped to the tile; a box keeping less than tile.min_visible of its area in a tile is dropped there
  (it is whole in a neighbouring tile when it is no larger than the overlap); a YOLO-seg polygon is clipped to
  the tile (Sutherland-Hodgman, etl/polygons.py), kept by the share of its own area inside, and written as a
  polygon line (its box is the clipped outline's extent);
- tiles without any box are kept at the rate tile.background_rate (seeded): most tiles of a sparse image
  are background, and all of them would drown the objects.
Writes <out>/images, <out>/labels, <out>/tiles.csv (tile, source, x0, y0, x1, y1, boxes), <out>/tiled_from.json
(the full images' data_path and splits_dir: bench and check_errors score on them). When data_path has a
split, each tile goes to its source image's split (<out>/train.csv ...), so tiles of one image never land in
train and val; without one, `make split data_path=<out>` keeps the tiles of one image together (tiles.csv).
A re-run with tile.overwrite=true replaces exactly the tiles tiles.csv lists (files it did not write stay,
with a warning: split refuses a tiled set holding images tiles.csv does not list).
Infer on full images with sliced inference (slicing.enabled, src/runtime/slicing.py).
"""

from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from loguru import logger
from omegaconf import DictConfig

from src.common.config import stage_main
from src.common.draw import save_image_rgb
from src.common.errors import UserError
from src.common.images import list_images, parallel_map, read_image_rgb
from src.common.io import atomic_write_csv, atomic_write_json
from src.etl.doctor import check_dataset
from src.etl.labels import (
    images_dir,
    label_path_for,
    labels_dir,
    polygon_area,
    read_yolo_labels,
    write_yolo_labels,
)
from src.etl.polygons import clip_polygon_to_rect
from src.etl.splits import SPLIT_NAMES, split_membership
from src.etl.tiling import (
    TILE_COLUMNS,
    TILED_FROM,
    boxes_in_window,
    orphan_images,
    replace_tiles,
    staging_folder,
    tile_name,
    tile_windows,
)


@dataclass(frozen=True)
class TileSettings:
    size: tuple[int, int]  # (h, w)
    overlap: float
    min_visible: float
    background_rate: float
    seed: int
    jpg_quality: int


def objects_in_window(
    boxes: np.ndarray, outlines: list[np.ndarray | None], window: np.ndarray, min_visible: float
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
    """The objects kept in a window: (indices (K,), boxes (K, 4) xyxy and outlines (M, 2) or None, both in
    window pixels). Boxes (N, 4) xyxy and outlines (polygon objects, else None) are in image pixels. A box
    line is kept by its box's visible share; a polygon by its clipped outline's share of its area."""
    kept_boxes, window_boxes = boxes_in_window(boxes, window, min_visible)
    found = {int(i): (b, None) for i, b in zip(kept_boxes, window_boxes) if outlines[i] is None}
    offset = window[:2].astype(np.float64)
    for index, outline in enumerate(outlines):
        clipped = clip_polygon_to_rect(outline, window) if outline is not None else None
        if clipped is None or polygon_area(clipped) < min_visible * polygon_area(outline):
            continue
        clipped = clipped - offset
        found[index] = (np.concatenate([clipped.min(0), clipped.max(0)]), clipped)
    kept = np.array(sorted(found), np.int64)
    window_boxes = np.array([found[i][0] for i in kept], np.float64).reshape(-1, 4)
    return kept, window_boxes, [found[i][1] for i in kept]


def tile_image(
    source: Path, label_path: Path, num_classes: int, out: Path, settings: TileSettings
) -> list[dict]:
    """Write the kept tiles of one image (+ labels); their tiles.csv rows."""
    rgb = read_image_rgb(source)  # (H, W, 3)
    height, width = rgb.shape[:2]
    labels = read_yolo_labels(label_path, num_classes)
    cx, cy, bw, bh = (labels.boxes.astype(np.float64) * [width, height, width, height]).T
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1).reshape(-1, 4)
    outlines = [p * [width, height] if p is not None else None for p in labels.polygons]  # image pixels
    # One generator per image (seed + name): the same tiles are kept whatever the worker order.
    rng = np.random.default_rng([settings.seed, zlib.crc32(source.name.encode())])
    rows = []
    for window in tile_windows(width, height, settings.size[1], settings.size[0], settings.overlap):
        kept, tile_boxes, tile_outlines = objects_in_window(boxes, outlines, window, settings.min_visible)
        if not len(kept) and rng.random() >= settings.background_rate:
            continue
        x0, y0, x1, y1 = (int(v) for v in window)
        tw, th = x1 - x0, y1 - y0
        name = tile_name(source.name, window)
        save_image_rgb(out / "images" / name, rgb[y0:y1, x0:x1], settings.jpg_quality)
        normalised = np.stack(
            [
                (tile_boxes[:, 0] + tile_boxes[:, 2]) / 2 / tw,
                (tile_boxes[:, 1] + tile_boxes[:, 3]) / 2 / th,
                (tile_boxes[:, 2] - tile_boxes[:, 0]) / tw,
                (tile_boxes[:, 3] - tile_boxes[:, 1]) / th,
            ],
            axis=1,
        ).reshape(-1, 4)
        polygons = [p / [tw, th] if p is not None else None for p in tile_outlines]
        write_yolo_labels(label_path_for(name, out / "labels"), labels.class_ids[kept], normalised, polygons)
        rows.append(dict(zip(TILE_COLUMNS, [name, source.name, x0, y0, x1, y1, len(kept)], strict=True)))
    return rows


def settings_from(cfg: DictConfig) -> TileSettings:
    t = cfg.tile
    size = t.size if t.size is not None else cfg.model.img_size
    size = [size, size] if isinstance(size, int) else size  # one int: a square
    return TileSettings(
        (int(size[0]), int(size[1])),
        float(t.overlap),
        float(t.min_visible),
        float(t.background_rate),
        int(cfg.seed),
        int(t.jpg_quality),
    )


def output_folder(cfg: DictConfig) -> Path:
    """tile.out, refused when it is the data set itself or a non-empty folder (unless tile.overwrite)."""
    out, data = Path(cfg.tile.out), Path(cfg.data_path)
    if out.resolve() == data.resolve():
        raise UserError(f"tile.out ({out}) must not be data_path: the tiles would mix with the full images")
    if out.exists() and any(out.iterdir()) and not cfg.tile.overwrite:
        raise UserError(f"tile.out {out} is not empty; choose another tile.out or set tile.overwrite=true")
    return out


def write_tile_splits(cfg: DictConfig, out: Path, tiles: pd.DataFrame) -> None:
    """Each tile in its source's split, when data_path has one."""
    split_of = split_membership(cfg)
    if not split_of:
        logger.info(
            f"no split in {cfg.splits_dir}: run `make split ARGS=data_path={out}` (tiles of one image stay together)"
        )
        return
    for split in SPLIT_NAMES:
        names = tiles.loc[tiles["source"].map(split_of) == split, "tile"].tolist()
        atomic_write_csv(out / f"{split}.csv", pd.DataFrame({"image": names}, dtype=str))
    logger.info(
        f"tile splits written to {out}/{{train,val,test}}.csv (each tile in its source image's split)"
    )


def run(cfg: DictConfig) -> pd.DataFrame:
    out = output_folder(cfg)
    settings = settings_from(cfg)
    report = check_dataset(cfg, write=False)
    data = Path(cfg.data_path)
    sources = [images_dir(data) / name for name in report.usable_images]
    num_classes = len(report.class_names)
    staging = staging_folder(out)

    def one(source: Path) -> list[dict]:
        return tile_image(source, label_path_for(source, labels_dir(data)), num_classes, staging, settings)

    try:
        rows = [row for rows in parallel_map(one, sources, int(cfg.tile.workers), "tiling") for row in rows]
        tiles = pd.DataFrame(rows, columns=TILE_COLUMNS)
        removed = replace_tiles(out, staging, tiles)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(
        out / TILED_FROM,
        {"data_path": str(data.resolve()), "splits_dir": str(Path(cfg.splits_dir).resolve())},
    )
    write_tile_splits(cfg, out, tiles)
    background = int((tiles["boxes"] == 0).sum())
    logger.info(
        f"{len(tiles)} tiles of {settings.size[1]}x{settings.size[0]} (overlap {settings.overlap:g}) from "
        f"{len(sources)} images in {out}: {int(tiles['boxes'].sum())} objects, {background} background tiles "
        f"(kept at rate {settings.background_rate:g})"
        + (f"; {removed} earlier tile(s) removed" if removed else "")
    )
    warn_about_orphans(out)
    return tiles


def warn_about_orphans(out: Path) -> None:
    """Images in <out>/images that tiling did not write (kept: not ours to delete); split refuses them."""
    present = [p.name for p in list_images(images_dir(out))]
    orphans = orphan_images(out, present)
    if orphans:
        logger.warning(
            f"{len(orphans)} file(s) in {images_dir(out)} are not tiles of this run (not in its tiles.csv), e.g. "
            f"{', '.join(orphans[:3])}: left as they are; `make split` refuses this folder until they are moved out"
        )


main = stage_main(run)

if __name__ == "__main__":
    main()
