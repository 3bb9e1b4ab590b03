"""The split files (train.csv / val.csv / test.csv) and the labels of the images they list.

A split CSV has one column, `image`: a path absolute, relative to <data_path>/images, or to <data_path>.
Every stage that reads a split (training, bench, export parity, check_errors, ov_int8) reads it here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from loguru import logger
from omegaconf import DictConfig

from src.etl.labels import images_dir, label_path_for, labels_dir, read_yolo_labels

SPLIT_COLUMN = "image"


def split_csv_path(cfg: DictConfig, split: str) -> Path:
    return Path(cfg.splits_dir) / f"{split}.csv"


def resolve_image_path(data_path: Path, entry: str) -> Path:
    """A split entry is an image path: absolute, relative to <data_path>/images, or to <data_path>."""
    path = Path(entry)
    if path.is_absolute():
        return path
    in_images = images_dir(data_path) / path
    if in_images.exists() or not (data_path / path).exists():
        return in_images
    return data_path / path


def read_split(cfg: DictConfig, split: str, exclude: Iterable[str] = ()) -> list[Path] | None:
    """Image paths listed in <splits_dir>/<split>.csv (None when the file does not exist).

    exclude: entries to leave out (names as written in the CSV / relative to images/, or absolute paths).
    """
    csv_path = split_csv_path(cfg, split)
    if not csv_path.exists():
        return None
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if SPLIT_COLUMN not in frame.columns:
        raise ValueError(
            f"{csv_path}: expected a column named {SPLIT_COLUMN!r} (got {list(frame.columns)}); "
            f"re-create the splits with `make split`"
        )
    data_path = Path(cfg.data_path)
    entries = [e.strip() for e in frame[SPLIT_COLUMN].tolist() if e.strip()]
    paths = [resolve_image_path(data_path, e) for e in entries]
    excluded = {resolve_image_path(data_path, str(e)) for e in exclude}
    kept = [p for p in paths if p not in excluded]
    if len(kept) < len(paths):
        logger.warning(
            f"{split}: {len(paths) - len(kept)} image(s) left out (excluded by the dataset doctor)"
        )
    return kept


class SplitLabels(NamedTuple):
    """The labels of a list of images, one entry per image (see etl/labels.py LabelFile)."""

    boxes: list[np.ndarray]  # (N_i, 4) float32 normalised cxcywh
    class_ids: list[np.ndarray]  # (N_i,) int64
    polygons: list[list[np.ndarray | None]]  # N_i entries: (K, 2) normalised polygon, or None (box line)


def load_labels(
    image_paths: list[Path], data_path: Path, num_classes: int, clip_tolerance: float = 0.01
) -> SplitLabels:
    """Read every label file once (they are small) -> per image boxes, class ids and polygons.

    A fatal label problem stops here with the file and line; warnings (small clipping) are summarised.
    """
    boxes, class_ids, polygons, warnings, fatal = [], [], [], [], []
    folder = labels_dir(data_path)
    for image_path in image_paths:
        label_file = read_yolo_labels(label_path_for(image_path, folder), num_classes, clip_tolerance)
        for problem in label_file.problems:
            (fatal if problem.severity == "fatal" else warnings).append(problem)
        boxes.append(label_file.boxes)
        class_ids.append(label_file.class_ids)
        polygons.append(label_file.polygons)
    if fatal:
        listed = "\n  ".join(str(p) for p in fatal[:10])
        more = f"\n  ... and {len(fatal) - 10} more" if len(fatal) > 10 else ""
        raise ValueError(
            f"{len(fatal)} label problem(s) would corrupt training:\n  {listed}{more}\n"
            "Fix the files, or run `make check` (check.skip_bad=true) and `make split` to leave them out."
        )
    if warnings:
        logger.warning(f"{len(warnings)} label warning(s), e.g. {warnings[0]}")
    return SplitLabels(boxes, class_ids, polygons)


SPLIT_NAMES = ("train", "val", "test")


def split_membership(cfg: DictConfig) -> dict[str, str]:
    """image name (relative to <data_path>/images) -> split, from the split files that exist ({} if none).

    Entries outside images/ keep their path as written; an image listed twice keeps its first split.
    """
    folder = images_dir(Path(cfg.data_path)).resolve()
    membership: dict[str, str] = {}
    for split in SPLIT_NAMES:
        for path in read_split(cfg, split) or []:
            resolved = path.resolve()
            name = str(resolved.relative_to(folder)) if resolved.is_relative_to(folder) else str(path)
            membership.setdefault(name, split)
    return membership
