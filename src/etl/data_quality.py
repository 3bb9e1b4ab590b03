"""The doctor's data-quality reports: near-duplicate groups and leaks across splits, small objects.

Written next to report.json (check.report_dir):
    near_duplicates.csv     group, image, split (of the existing split files; "" = in none), leak
    near_duplicates/        group_0001.jpg ... one contact sheet per group, leaking groups first
    box_sizes.csv           image, class, box width/height in original pixels and at the network input
    box_sizes.png           histogram of sqrt(w*h) at the network input, the small-object line marked
and logs, for a segmentation data set (some YOLO-seg polygon line), polygons vs box-only objects per split.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from loguru import logger
from omegaconf import DictConfig

from src.common.draw import save_image_rgb
from src.common.io import atomic_write, atomic_write_csv
from src.etl.doctor_report import ImageRecord, Report
from src.etl.labels import LABEL_EXT, images_dir
from src.etl.near_duplicates import contact_sheet, leaking_groups
from src.etl.splits import SPLIT_NAMES, split_membership

NEAR_DUPLICATES_CSV = "near_duplicates.csv"
CONTACT_SHEETS_DIR = "near_duplicates"
BOX_SIZES_CSV = "box_sizes.csv"
BOX_SIZES_PNG = "box_sizes.png"
SIZE_STEP = 32  # img_size suggestions are multiples of this (the model's stride)
BOX_ONLY_NAMED = 5  # box-only label files named in the warning


def write_quality_reports(cfg: DictConfig, report: Report) -> None:
    report_dir = Path(cfg.check.report_dir)
    write_near_duplicates(cfg, report, report_dir)
    write_box_sizes(cfg, report, report_dir)


# ---------------------------------------------------------------- polygons vs box lines


def polygon_counts(records: list[ImageRecord]) -> str:
    polygons = sum(r.num_polygons for r in records)
    box_only = sum(r.num_box_only for r in records)
    files = sum(not r.background for r in records)
    return f"{polygons} polygons, {box_only} box-only objects in {files} files"


def segmentation_summary(cfg: DictConfig, report: Report) -> str | None:
    """The counts of a segmentation data set (None for a detection one), per split when a split exists; a
    warning naming a few label files with box lines, which have no mask to learn."""
    if not report.is_segmentation:
        return None
    usable = [r for r in report.records if r.usable]
    split_of = split_membership(cfg)
    lines = [f"segmentation data set: {polygon_counts(usable)}"]
    for split in SPLIT_NAMES if split_of else ():
        members = [r for r in usable if split_of.get(r.image) == split]
        lines.append(f"  {split}: {polygon_counts(members)}")
    text = "\n".join(lines)
    logger.info(text)
    box_only = report.box_only_images
    if box_only:
        named = ", ".join(f"{Path(name).stem}{LABEL_EXT}" for name in box_only[:BOX_ONLY_NAMED])
        more = f" and {len(box_only) - BOX_ONLY_NAMED} more" if len(box_only) > BOX_ONLY_NAMED else ""
        logger.warning(
            f"{len(box_only)} label file(s) of this segmentation data set have box lines without a polygon "
            f"({sum(r.num_box_only for r in usable)} objects), e.g. {named}{more}: a segmentation run refuses "
            "them unless train.allow_box_only=true (those objects then get no mask loss); a detection run uses "
            "every object"
        )
    return text


# ---------------------------------------------------------------- near-duplicates


def near_duplicate_rows(groups: list[list[str]], split_of: dict[str, str]) -> pd.DataFrame:
    leaks = {tuple(g) for g in leaking_groups(groups, split_of)}
    rows = [
        {"group": n, "image": name, "split": split_of.get(name, ""), "leak": tuple(group) in leaks}
        for n, group in enumerate(groups, start=1)
        for name in group
    ]
    return pd.DataFrame(rows, columns=["group", "image", "split", "leak"])


def write_near_duplicates(cfg: DictConfig, report: Report, report_dir: Path) -> None:
    groups = report.near_duplicate_groups
    split_of = split_membership(cfg)
    frame = near_duplicate_rows(groups, split_of)
    atomic_write_csv(report_dir / NEAR_DUPLICATES_CSV, frame)
    if not groups:
        return
    leaks = leaking_groups(groups, split_of)
    drawn = _draw_contact_sheets(cfg, groups, leaks, split_of, report_dir / CONTACT_SHEETS_DIR)
    members = sum(len(g) for g in groups)
    message = (
        f"{len(groups)} group(s) of near-duplicate images ({members} images), list in "
        f"{report_dir / NEAR_DUPLICATES_CSV}, {drawn} contact sheet(s) in {report_dir / CONTACT_SHEETS_DIR}/"
    )
    if leaks:
        examples = "; ".join(
            ", ".join(f"{n} ({split_of.get(n) or 'no split'})" for n in g[:3]) for g in leaks[:3]
        )
        message += (
            f". LEAK: {len(leaks)} group(s) span splits, e.g. {examples}: val/test hold copies of other "
            "splits' images and would inflate their metrics. `make split ARGS=split.fix_leaks=true` moves whole "
            "groups into one split"
        )
    logger.warning(message)


def _draw_contact_sheets(
    cfg: DictConfig, groups: list[list[str]], leaks: list[list[str]], split_of: dict[str, str], folder: Path
) -> int:
    """group_NNNN.jpg per group (numbered as in the CSV), leaking groups first, at most check.contact_sheets."""
    limit = int(cfg.check.contact_sheets)
    leak_set = {tuple(g) for g in leaks}
    order = sorted(range(len(groups)), key=lambda i: tuple(groups[i]) not in leak_set)[:limit]
    folder_images = images_dir(cfg.data_path)
    for index in order:
        group = groups[index]
        captions = [f"{name} [{split_of.get(name) or '-'}]" for name in group]
        sheet = contact_sheet([folder_images / name for name in group], captions)
        save_image_rgb(folder / f"group_{index + 1:04d}.jpg", sheet, jpg_quality=85)
    return len(order)


# ---------------------------------------------------------------- small objects


def network_scale(
    width: int, height: int, img_size: tuple[int, int], keep_ratio: bool
) -> tuple[float, float]:
    """(x, y) factors from original pixels to network-input pixels (src/common/network_input.py's geometry)."""
    net_h, net_w = img_size
    if keep_ratio:
        scale = min(net_w / width, net_h / height)
        return scale, scale
    return net_w / width, net_h / height


def box_size_table(report: Report, img_size: tuple[int, int], keep_ratio: bool) -> pd.DataFrame:
    """One row per box of the usable images: sizes in original pixels and at the network input."""
    parts = []
    for record in report.records:
        if not record.usable or not len(record.box_wh):
            continue
        w_px = record.box_wh[:, 0] * record.width  # (N,)
        h_px = record.box_wh[:, 1] * record.height
        sx, sy = network_scale(record.width, record.height, img_size, keep_ratio)
        parts.append(
            pd.DataFrame(
                {
                    "image": record.image,
                    "class": [report.class_names[c] for c in record.class_ids],
                    "width_px": w_px,
                    "height_px": h_px,
                    "net_width": w_px * sx,
                    "net_height": h_px * sy,
                }
            )
        )
    columns = ["image", "class", "width_px", "height_px", "net_width", "net_height"]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    frame["net_size"] = np.sqrt(frame["net_width"].astype(float) * frame["net_height"].astype(float))
    frame["size_px"] = np.sqrt(frame["width_px"].astype(float) * frame["height_px"].astype(float))
    return frame.round(2)


def small_object_advice(
    sizes: pd.DataFrame, img_size: tuple[int, int], small_px: float, small_share: float
) -> str | None:
    """The warning with numbers when at least small_share of the boxes are under small_px at the network
    input: a larger img_size that would bring the share under the limit, and what tiling would give."""
    if sizes.empty:
        return None
    net = sizes["net_size"].to_numpy(float)
    share = float((net < small_px).mean())
    if share < small_share:
        return None
    # Every box grows with img_size. For a share under small_share, at most ceil(share * n) - 1 boxes may stay
    # small: the next smallest box has to reach small_px.
    allowed = max(0, math.ceil(small_share * len(net)) - 1)
    factor = small_px / max(float(np.sort(net)[allowed]), 1e-6)
    suggested = [int(math.ceil(side * factor / SIZE_STEP) * SIZE_STEP) for side in img_size]
    share_suggested = float((net * suggested[0] / img_size[0] + 1e-6 < small_px).mean())
    share_native = float((sizes["size_px"].to_numpy(float) < small_px).mean())
    return (
        f"{share:.0%} of the boxes ({int((net < small_px).sum())} of {len(net)}) are under {small_px:g} px at the "
        f"network input {img_size[0]}x{img_size[1]} (median {np.median(net):.1f} px, at full resolution "
        f"{sizes['size_px'].median():.1f} px). Small objects vanish when images are shrunk: use "
        f"model.img_size=[{suggested[0]}, {suggested[1]}] ({share_suggested:.0%} small), or tile the images at "
        f"full resolution (`python -m src.etl.tile`: {share_native:.0%} small) and infer sliced "
        "(slicing.enabled=true)."
    )


def write_box_sizes(cfg: DictConfig, report: Report, report_dir: Path) -> pd.DataFrame:
    img_size = (int(cfg.model.img_size[0]), int(cfg.model.img_size[1]))
    sizes = box_size_table(report, img_size, bool(cfg.model.keep_ratio))
    atomic_write_csv(report_dir / BOX_SIZES_CSV, sizes)
    small_px = float(cfg.check.small_object_px)
    if not sizes.empty:
        plot_box_sizes(sizes["net_size"].to_numpy(float), small_px, img_size, report_dir / BOX_SIZES_PNG)
    advice = small_object_advice(sizes, img_size, small_px, float(cfg.check.small_object_share))
    if advice:
        logger.warning(advice)
    return sizes


def plot_box_sizes(net_sizes: np.ndarray, small_px: float, img_size: tuple[int, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(float(net_sizes.max()), small_px * 2)
    bins = np.geomspace(max(0.5, float(net_sizes.min()) * 0.9), top * 1.1, 40)
    ax.hist(net_sizes, bins=bins, color="#4c72b0")
    ax.axvline(small_px, color="red", linestyle="--", label=f"small: < {small_px:g} px")
    ax.set_xscale("log")
    ax.set_xlabel(f"box size sqrt(w*h) in pixels at the network input {img_size[0]}x{img_size[1]}")
    ax.set_ylabel("boxes")
    ax.set_title(f"{len(net_sizes)} boxes, {(net_sizes < small_px).mean():.0%} small")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
