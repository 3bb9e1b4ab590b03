"""Small real data sets and configs for the training tests (detection images with YOLO labels, split CSVs)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from src.common.config import load_config

CLASSES = ("circle", "square", "triangle", "star")


def assert_same_weights(a: dict, b: dict, ema: bool = True) -> None:
    """Two last.pt checkpoints hold bit-identical model (and, with `ema`, EMA) weights."""
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    if ema:
        for key, value in a["ema"]["module"].items():
            assert torch.equal(value, b["ema"]["module"][key]), key


def draw_objects(
    rng: np.random.Generator, width: int, height: int, count: int
) -> tuple[np.ndarray, list[str]]:
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    lines = []
    for _ in range(count):
        w, h = (int(v) for v in rng.integers(12, max(14, min(width, height) // 2), size=2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        class_id = int(rng.integers(0, len(CLASSES)))
        color = tuple(int(c) for c in rng.integers(120, 256, size=3))
        cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), color, thickness=-1)
        lines.append(
            f"{class_id} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} {(w - 1) / width:.6f} {(h - 1) / height:.6f}"
        )
    return image, lines


def write_splits(root: Path, splits: dict[str, int], make_sample) -> Path:
    """root/images + root/labels + one CSV per split; make_sample(rng, name) -> (BGR image, YOLO lines)
    draws each image from one seeded generator (no lines: no label file)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for split, count in splits.items():
        names = [f"{split}_{index}.jpg" for index in range(count)]
        for name in names:
            image, lines = make_sample(rng, name)
            cv2.imwrite(str(root / "images" / name), image)
            if lines:
                (root / "labels" / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")
        pd.DataFrame({"image": names}).to_csv(root / f"{split}.csv", index=False)
    return root


def make_detection_data(root: Path, splits: dict[str, int], backgrounds: tuple[str, ...] = ()) -> Path:
    """root/images + root/labels + train/val/test CSVs. Names in `backgrounds` get no objects."""

    def sample(rng, name):
        width, height = int(rng.integers(80, 140)), int(rng.integers(80, 140))
        return draw_objects(rng, width, height, 0 if name in backgrounds else int(rng.integers(1, 4)))

    return write_splits(root, splits, sample)


def train_overrides(tmp_path: Path, data: Path, *overrides: str) -> list[str]:
    """Command-line overrides for a tiny, fast run (also used by the torchrun test)."""
    return [
        f"data_path={data}",
        f"output_dir={tmp_path / 'output'}",
        "exp_name=run",
        "device=cpu",
        "model.name=n",
        "model.img_size=[64,64]",
        "model.num_queries=10",
        "train.epochs=1",
        "train.batch_size=2",
        "train.num_workers=0",
        "train.threads=1",  # tiny tensors gain nothing from a second thread; a fixed count, never re-decided
        "train.max_steps_per_epoch=2",
        "train.debug_images=2",
        "train.eval_images=2",
        "train.checkpoint_every_minutes=0",
        "train.ema_warmups=2",
        "train.eval_every=1",  # the tests judge every epoch (config.yaml validates every 2nd)
        "check.find_duplicates=false",
        *overrides,
    ]


def train_config(tmp_path: Path, data: Path, *overrides: str):
    return load_config(train_overrides(tmp_path, data, *overrides))


# ---------------------------------------------------------------- the dataset tests' five images

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # one per class id

# name -> (height, width, [(class, x1, y1, x2, y2) in pixels])
IMAGES = {
    "wide.png": (60, 120, [(0, 10, 10, 50, 40), (2, 70, 20, 110, 55)]),
    "tall.png": (130, 50, [(1, 5, 20, 45, 70)]),
    "square.png": (80, 80, [(3, 20, 20, 60, 60), (0, 0, 0, 15, 15)]),
    "odd.png": (37, 101, [(2, 30, 5, 90, 30)]),
    "empty.png": (70, 90, []),  # background only
}


def make_dataset_images(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, (height, width, objects) in IMAGES.items():
        image = np.zeros((height, width, 3), np.uint8)
        lines = []
        for cls, x1, y1, x2, y2 in objects:
            image[y1:y2, x1:x2] = COLORS[cls]
            cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
            lines.append(f"{cls} {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n")
        Image.fromarray(image).save(root / "images" / name)
        if objects:
            (root / "labels" / f"{Path(name).stem}.txt").write_text("".join(lines))
    names = list(IMAGES)
    for split, chosen in {"train": names, "val": names, "test": names[:2]}.items():
        pd.DataFrame({"image": chosen}).to_csv(root / f"{split}.csv", index=False)
    return root


def dataset_config(data_root: Path, *overrides: str):
    no_augs = [f"train.augs.{k}=0" for k in ("left_right_flip", "rotation_p", "brightness_contrast", "gamma")]
    no_augs += [f"train.augs.{k}=0" for k in ("blur", "noise", "to_gray")]
    return load_config(
        [
            f"data_path={data_root}",
            f"output_dir={data_root.parent / 'out'}",
            "model.img_size=[64,96]",
            "train.mosaic.prob=0",
            *no_augs,
            *overrides,
        ]
    )
