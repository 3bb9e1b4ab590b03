"""The labelled images of a split, as the deployment stages score a model on them (bench, check_errors,
export's parity, ov_int8): ground truth in original pixels from the split CSVs and YOLO labels
(src/etl/splits.py), and for a model trained on tiles with sliced inference, the full images the tiles
were cut from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from loguru import logger
from omegaconf import DictConfig, OmegaConf

from src.common.config import label_names
from src.common.images import image_size
from src.dl.artifacts import slicing_enabled
from src.etl.splits import load_labels, read_split
from src.etl.tiling import TILED_FROM
from src.runtime.evaluate import LabelledImage


def load_split_samples(cfg: DictConfig, split: str, limit: int | None = None) -> list[LabelledImage]:
    """Images and labels of <splits_dir>/<split>.csv ([] when the split file is missing or empty).

    With model.use_one_class every ground-truth box gets class 0, the one class such a model predicts.
    """
    paths = read_split(cfg, split)
    if not paths:
        return []
    if limit is not None and limit > 0:
        paths = paths[:limit]
    labels = load_labels(paths, Path(cfg.data_path), len(label_names(cfg)))
    samples = []
    for index, (path, boxes, ids, polygons) in enumerate(zip(paths, *labels, strict=True)):
        width, height = image_size(path) if len(ids) else (1, 1)  # header only; no decode
        cx, cy, w, h = (np.asarray(boxes, np.float64).reshape(-1, 4) * [width, height, width, height]).T
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        ids = np.zeros(len(ids), np.int64) if cfg.model.use_one_class else np.asarray(ids, np.int64)
        samples.append(LabelledImage(path, xyxy, ids, split, index, list(polygons)))
    return samples


def full_image_config(cfg: DictConfig) -> DictConfig:
    """The config to read evaluation images with: for sliced inference on an experiment trained on tiles,
    the full images the tiles were cut from (their data_path and split, from the tiled set's
    tiled_from.json), so bench and check_errors score what sliced inference is for; otherwise cfg."""
    link = Path(cfg.data_path) / TILED_FROM
    if not (slicing_enabled(cfg) and link.exists()):  # only a tiled set has the link
        return cfg
    source = json.loads(link.read_text(encoding="utf-8"))
    if not Path(source["data_path"]).is_dir():
        logger.warning(f"{link}: the full images at {source['data_path']} are gone; scoring the tiles")
        return cfg
    full = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    full.data_path, full.splits_dir = source["data_path"], source["splits_dir"]
    logger.info(f"trained on tiles: scoring sliced inference on the full images of {source['data_path']}")
    return full
