"""Small data sets the ETL tests build in tmp_path (shared by tests/test_etl_*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from src.common.config import load_config


def etl_config(tmp_path: Path, data_path: Path, *overrides: str):
    """The repo config pointed at data_path, with every output inside tmp_path."""
    return load_config(
        [
            f"data_path={data_path}",
            f"output_dir={tmp_path / 'output'}",
            f"check.report_dir={tmp_path / 'report'}",
            "check.workers=2",
            *overrides,
        ]
    )


def save_image(path: Path, size=(32, 24), color=(200, 30, 30), seed: int | None = None) -> Path:
    """An RGB image of size (w, h): plain colour, or random pixels when seed is given (distinct images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        image = Image.new("RGB", size, color)
    else:
        image = Image.fromarray(
            np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        )
    image.save(path, quality=95)
    return path


def make_dataset(root: Path, labels: dict[str, str | None], size=(32, 24)) -> Path:
    """root/images/<name> (distinct random pixels) + root/labels/<stem>.txt with the given text (None: no file)."""
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for index, (name, text) in enumerate(sorted(labels.items())):
        save_image(root / "images" / name, size=size, seed=index)
        if text is not None:
            (root / "labels" / f"{Path(name).stem}.txt").write_text(text)
    return root
