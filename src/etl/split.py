"""Split the doctor's usable images into train / val / test CSVs (one column "image": file names in images/).

    python -m src.etl.split                                  # 80/10/10, seed 42
    python -m src.etl.split split.val=0.2 split.test=0 split.stratify=true

Deterministic: images sorted by name, then shuffled with cfg.seed. Exact duplicates and near-duplicate groups
(re-encoded / resized / cropped copies, video frames; found by the doctor) and the tiles of one image (a tiled
data set's tiles.csv) always land in one split, so val/test never contain a copy of a training image.
An existing split that leaks (a group across splits) is refused: split.fix_leaks=true moves each leaking
group whole into the split holding most of it (the rest of the split is kept as it is); delete the split
files for a fresh split.
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
from src.common.errors import UserError
from src.common.io import atomic_write_csv
from src.etl.data_quality import write_near_duplicates
from src.etl.doctor import Report, check_dataset, keep_together_groups
from src.etl.near_duplicates import home_split, leaking_groups
from src.etl.splits import split_membership
from src.etl.tiling import TILES_CSV, interrupted_replacement, orphan_images

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


def fix_existing_leaks(cfg: DictConfig, groups: list[list[str]]) -> dict[str, list[str]] | None:
    """None when there is no split yet, or one that does not leak (a fresh split follows). A leaking split is
    refused unless split.fix_leaks, which moves each leaking group whole into one split and keeps the rest."""
    split_of = split_membership(cfg)
    leaks = leaking_groups(groups, split_of)
    if not leaks:
        return None
    moved = {n: home_split(g, split_of, SPLITS) for g in leaks for n in g if split_of.get(n)}
    changed = {n: s for n, s in moved.items() if split_of[n] != s}
    if not cfg.split.fix_leaks:
        example = ", ".join(f"{n} ({split_of[n]})" for n in leaks[0] if split_of.get(n))
        raise UserError(
            f"the existing split in {cfg.splits_dir} leaks: {len(leaks)} group(s) of (near-)duplicate images span "
            f"splits, e.g. {example}; fixing it moves {len(changed)} image(s). Run with split.fix_leaks=true to "
            "move whole groups (the rest of the split stays), or delete train/val/test.csv for a fresh split"
        )
    split_of.update(changed)
    logger.warning(
        f"split.fix_leaks: moved {len(changed)} image(s) of {len(leaks)} leaking group(s) into one split each"
    )
    return {name: sorted(n for n, s in split_of.items() if s == name) for name in SPLITS}


def write_splits(cfg: DictConfig, report: Report, splits: dict[str, list[str]]) -> None:
    out_dir = Path(cfg.splits_dir)
    for name, names in splits.items():  # test.csv is written even when empty, so no stale one stays behind
        atomic_write_csv(out_dir / f"{name}.csv", pd.DataFrame({"image": names}, dtype=str))
    known = [n for n in sum(splits.values(), []) if n in report.usable_images]
    table = split_table(report, {k: [n for n in v if n in set(known)] for k, v in splits.items()})
    logger.info(f"splits written to {out_dir}/{{train,val,test}}.csv\n{table.to_string(index=False)}")
    # The doctor wrote near_duplicates.csv before this split existed: its split column now has values.
    write_near_duplicates(cfg, report, Path(cfg.check.report_dir))


def refuse_orphan_tiles(cfg: DictConfig, report: Report) -> None:
    """A tiled data set whose images/ holds images its tiles.csv does not list (their source image is
    unknown, so they could not be kept with their neighbours), or whose re-tiling was stopped: refused."""
    data = Path(cfg.data_path)
    if interrupted_replacement(data):
        raise UserError(
            f"{data}: a re-tiling was stopped half-way; run `make tile` again (tile.overwrite=true)"
        )
    orphans = orphan_images(data, report.usable_images)
    if orphans:
        raise UserError(
            f"{len(orphans)} image(s) in {data / 'images'} are not listed in {data / TILES_CSV} (e.g. "
            f"{', '.join(orphans[:3])}): their source image is unknown, so split cannot keep them with the other "
            "tiles of that image. Move them out of images/, or re-tile (tile.overwrite=true replaces its own tiles)"
        )


def run(cfg: DictConfig) -> dict[str, list[str]]:
    report = check_dataset(cfg)
    refuse_orphan_tiles(cfg, report)
    together = keep_together_groups(report, cfg.data_path)
    fixed = fix_existing_leaks(cfg, together)
    if fixed is not None:
        write_splits(cfg, report, fixed)
        return fixed
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
    keep_duplicates_together(assignment, together)

    splits = {
        name: sorted(img for img, s in assignment.items() if s == index) for index, name in enumerate(SPLITS)
    }
    if not splits["val"] and fractions[1] > 0:
        logger.warning(f"val split is empty: only {len(images)} usable image(s)")
    write_splits(cfg, report, splits)
    return splits


main = stage_main(run)

if __name__ == "__main__":
    main()
