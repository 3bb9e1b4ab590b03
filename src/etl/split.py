"""Split the doctor's usable images into train / val / test CSVs (one column "image": file names in images/).

    python -m src.etl.split                                  # 80/10/10, seed 42
    python -m src.etl.split split.val=0.2 split.test=0 split.stratify=true

Deterministic: images sorted by name, then shuffled with cfg.seed. Exact duplicate images (found by the
doctor) always land in the same split, so val/test never contain a copy of a training image.
split.stratify=true keeps class proportions alike across splits: every image is grouped by its rarest class
(background images form their own group) and each group is dealt out in the split ratios.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from loguru import logger
from omegaconf import DictConfig

from src.common.config import stage_main
from src.common.io import atomic_write_csv
from src.etl.check import Report, check_dataset

SPLITS = ("train", "val", "test")
BACKGROUND_GROUP = -1


def split_fractions(cfg: DictConfig) -> np.ndarray:
    """(train, val, test) fractions; must be >= 0 with train > 0, normalised if they don't sum to 1."""
    values = np.array([float(cfg.split[name]) for name in SPLITS])
    if (values < 0).any() or values[0] <= 0:
        raise ValueError(f"split.train must be > 0 and split.val/test >= 0, got {dict(zip(SPLITS, values))}")
    if abs(values.sum() - 1.0) > 1e-6:
        logger.warning(f"split fractions {dict(zip(SPLITS, values))} sum to {values.sum():g}; rescaled to 1")
    return values / values.sum()


def deal(count: int, fractions: np.ndarray, already: np.ndarray | None = None) -> list[int]:
    """Split indices for `count` items in a row: each goes to the split furthest below its share so far.

    Starting from `already` (counts dealt before) keeps the overall ratio exact while dealing groups one by one.
    """
    counts = np.zeros(len(fractions)) if already is None else already.astype(float).copy()
    out = []
    for _ in range(count):
        deficit = fractions * (counts.sum() + 1) - counts
        deficit[fractions == 0] = -np.inf
        choice = int(np.argmax(deficit))
        counts[choice] += 1
        out.append(choice)
    return out


def rarest_class_groups(report: Report, images: list[str]) -> list[int]:
    """Each image's rarest class over the data set (the class it is most precious for); -1 for background."""
    frequency = Counter(c for name in images for c in report.record(name).class_ids)
    return [
        min(set(report.record(name).class_ids), key=lambda c: (frequency[c], c))
        if report.record(name).class_ids
        else BACKGROUND_GROUP
        for name in images
    ]


def assign_splits(
    images: list[str], fractions: np.ndarray, rng: np.random.Generator | None, groups: list[int] | None
) -> dict[str, int]:
    """image -> split index. rng None: keep the sorted order. groups: stratify by these keys."""
    order = list(range(len(images)))
    if rng is not None:
        order = list(rng.permutation(len(images)))
    if groups is None:  # contiguous blocks of the (shuffled) order: unshuffled, val/test are the last images
        sizes = np.bincount(deal(len(order), fractions), minlength=len(fractions))
        split_of_position = np.repeat(np.arange(len(fractions)), sizes)
        return {images[i]: int(s) for i, s in zip(order, split_of_position)}
    assignment: dict[str, int] = {}
    dealt = np.zeros(len(fractions))
    for key in sorted(set(groups)):
        members = [i for i in order if groups[i] == key]
        for i, s in zip(members, deal(len(members), fractions, dealt)):
            assignment[images[i]] = s
            dealt[s] += 1
    return assignment


def keep_duplicates_together(assignment: dict[str, int], duplicate_groups: list[list[str]]) -> None:
    """Move every copy of an image into the split of its first copy (by name): no train/val leakage."""
    for group in duplicate_groups:
        present = sorted(name for name in group if name in assignment)
        for name in present[1:]:
            assignment[name] = assignment[present[0]]


def split_table(report: Report, splits: dict[str, list[str]]) -> pd.DataFrame:
    rows = []
    for name, images in splits.items():
        row = {
            "split": name,
            "images": len(images),
            "background": sum(report.record(i).background for i in images),
        }
        row["boxes"] = sum(report.record(i).num_boxes for i in images)
        row.update(report.boxes_per_class(images))
        rows.append(row)
    return pd.DataFrame(rows)


def run(cfg: DictConfig) -> dict[str, list[str]]:
    report = check_dataset(cfg)
    fractions = split_fractions(cfg)
    images = sorted(report.usable_images)
    if cfg.split.ignore_negatives:
        images = [name for name in images if not report.record(name).background]
    if not images:
        raise ValueError(
            f"no images to split in {cfg.data_path} (split.ignore_negatives={cfg.split.ignore_negatives})"
        )

    rng = np.random.default_rng(int(cfg.seed)) if cfg.split.shuffle else None
    groups = rarest_class_groups(report, images) if cfg.split.stratify else None
    assignment = assign_splits(images, fractions, rng, groups)
    keep_duplicates_together(assignment, report.duplicate_groups)

    splits = {
        name: sorted(img for img, s in assignment.items() if s == index) for index, name in enumerate(SPLITS)
    }
    if not splits["val"] and fractions[1] > 0:
        logger.warning(f"val split is empty: only {len(images)} usable image(s)")
    out_dir = Path(cfg.splits_dir)
    for name, names in splits.items():  # test.csv is written even when empty, so no stale one stays behind
        atomic_write_csv(out_dir / f"{name}.csv", pd.DataFrame({"image": names}, dtype=str))
    logger.info(
        f"splits written to {out_dir}/{{train,val,test}}.csv\n{split_table(report, splits).to_string(index=False)}"
    )
    return splits


main = stage_main(run)

if __name__ == "__main__":
    main()
