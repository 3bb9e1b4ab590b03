"""The dataset doctor as a library: inspect `<data_path>/images` + `<data_path>/labels` before training does.

Fatal (the image cannot be used as is): unreadable/truncated image, a label line with the wrong number of fields,
non-numeric values, a class id not in label_to_name, coordinates far outside [0, 1], zero/negative width or
height, two images with the same stem (they would share one label file); YOLO-seg polygon lines with an odd
coordinate count, fewer than 3 points, NaN, points far outside the image or zero area.
Warnings: coordinates clipped (within check.clip_tolerance), boxes under a pixel, a polygon crossing itself,
orphan label files, exact duplicate images, unsupported files in images/. Images without labels are
background (counted). A segmentation data set (some polygon line) gets its polygon / box-only object counts
per split, and a warning naming label files with box lines (no mask to learn).
The check stage (src/etl/check.py), split, tile and training call `check_dataset(cfg)`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from loguru import logger
from omegaconf import DictConfig

from src.common.config import label_names
from src.common.images import IMAGE_EXTS, ImageReadError, list_images, parallel_map, read_image_rgb
from src.common.io import atomic_write_csv, atomic_write_json
from src.etl.data_quality import segmentation_summary, write_quality_reports
from src.etl.doctor_report import MAX_PROBLEMS_SHOWN, DatasetError, ImageRecord, Report
from src.etl.labels import (
    FATAL,
    UNNAMED_CLASS,
    WARNING,
    LabelFile,
    Problem,
    images_dir,
    label_path_for,
    labels_dir,
    read_yolo_labels,
)
from src.etl.near_duplicates import (
    Fingerprint,
    NearDuplicateSettings,
    fingerprint,
    leaking_groups,
    merge_groups,
    near_duplicate_groups,
)
from src.etl.splits import split_membership
from src.etl.tiling import tile_groups

__all__ = ["DatasetError", "ImageRecord", "NearDuplicateSettings", "Report", "check_dataset", "diagnose"]


def _inspect_image(
    path: Path, find_duplicates: bool, near: NearDuplicateSettings | None
) -> tuple[int, int, str, Fingerprint | None] | str:
    """(width, height, pixel digest, near-duplicate fingerprint) of a readable image, else the error message.

    The image is decoded in full once (a truncated file fails here) and only its small fingerprint is kept.
    """
    try:
        rgb = read_image_rgb(path)
    except (ImageReadError, OSError) as err:
        return str(err)
    # Digest of the decoded pixels: finds copies even when the files differ in metadata.
    digest = hashlib.blake2b(rgb.tobytes(), digest_size=16).hexdigest() if find_duplicates else ""
    return rgb.shape[1], rgb.shape[0], digest, fingerprint(rgb) if near else None


def _tiny_box_warnings(labels: LabelFile, width: int, height: int) -> list[Problem]:
    # A box under one pixel cannot be learned at any input size; usually a slip of the labelling tool.
    tiny = int(((labels.boxes[:, 2] * width < 1) | (labels.boxes[:, 3] * height < 1)).sum())
    if not tiny:
        return []
    return [Problem(str(labels.path), None, WARNING, f"{tiny} box(es) smaller than one pixel")]


def _stray_files(folder: Path) -> list[Problem]:
    """Files in images/ that no stage reads (PDFs, GIFs, ...): probably forgotten, worth a word."""
    stray = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_EXTS
    ]
    hint = "; run `python -m src.etl.preprocess` to turn PDF pages into images"
    return [
        Problem(
            str(p),
            None,
            WARNING,
            "not a supported image type, ignored" + (hint if p.suffix.lower() == ".pdf" else ""),
        )
        for p in stray
    ]


def _same_stem_problems(images: list[Path]) -> list[Problem]:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in images:
        by_stem[path.stem].append(path)
    problems = []
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            for path in paths:
                problems.append(
                    Problem(
                        str(path),
                        None,
                        FATAL,
                        f"images {names} share the stem {stem!r} and so one label file; rename or remove one",
                    )
                )
    return problems


def diagnose(
    data_path: str | Path,
    class_names: list[str],
    clip_tolerance: float = 0.01,
    find_duplicates: bool = True,
    skip_bad: bool = False,
    workers: int = 1,
    near_duplicates: NearDuplicateSettings | None = None,
) -> Report:
    """Inspect a data set folder and return the report. Bad files are findings in the report, not exceptions;
    DatasetError only when there is nothing to inspect (no images folder, no images). See check_dataset."""
    data_path = Path(data_path)
    img_dir, lbl_dir = images_dir(data_path), labels_dir(data_path)
    if not img_dir.is_dir():
        raise DatasetError(
            f"no images folder: {img_dir} (expected <data_path>/images and <data_path>/labels)"
        )
    images = list_images(img_dir)
    if not images:
        raise DatasetError(f"empty data set: no images ({', '.join(sorted(IMAGE_EXTS))}) in {img_dir}")

    problems = _stray_files(img_dir) + _same_stem_problems(images)
    if not lbl_dir.is_dir():
        problems.append(Problem(str(lbl_dir), None, WARNING, "no labels folder: every image is background"))
    records = [ImageRecord(image=p.name) for p in images]
    inspected = parallel_map(
        lambda p: _inspect_image(p, find_duplicates, near_duplicates), images, workers, "checking images"
    )
    prints: list[Fingerprint | None] = []
    for path, record, info in zip(images, records, inspected, strict=True):
        if isinstance(info, str):
            problems.append(Problem(str(path), None, FATAL, info))
            prints.append(None)
            continue
        record.width, record.height, record.digest, print_ = info
        prints.append(print_)
        labels = read_yolo_labels(label_path_for(path, lbl_dir), len(class_names), clip_tolerance)
        record.has_label_file = labels.exists
        record.class_ids = labels.class_ids.tolist()
        record.box_wh = labels.boxes[:, 2:4].copy()
        record.num_polygons = sum(p is not None for p in labels.polygons)
        problems += labels.problems + _tiny_box_warnings(labels, record.width, record.height)

    stems = {p.stem for p in images}
    orphans = sorted(p.name for p in lbl_dir.glob("*.txt") if p.stem not in stems) if lbl_dir.is_dir() else []
    problems += [
        Problem(str(lbl_dir / name), None, WARNING, "label file without an image (orphan), ignored")
        for name in orphans
    ]

    duplicate_groups = _duplicate_groups(records) if find_duplicates else []
    for group in duplicate_groups:
        problems.append(
            Problem(str(img_dir / group[0]), None, WARNING, f"exact duplicate images: {', '.join(group)}")
        )

    bad_stems = {Path(p.file).stem for p in problems if p.severity == FATAL}
    for record in records:
        record.usable = Path(record.image).stem not in bad_stems
    near_groups = []
    if near_duplicates is not None:
        names = [r.image for r in records]
        near_groups = near_duplicate_groups(names, prints, near_duplicates)
    return Report(
        str(data_path), class_names, records, problems, orphans, duplicate_groups, skip_bad, near_groups
    )


def _duplicate_groups(records: list[ImageRecord]) -> list[list[str]]:
    by_digest: dict[str, list[str]] = defaultdict(list)
    for record in records:
        if record.digest:
            by_digest[record.digest].append(record.image)
    return sorted(group for group in by_digest.values() if len(group) > 1)


def write_report(report: Report, report_dir: str | Path) -> Path:
    report_dir = Path(report_dir)
    atomic_write_json(report_dir / "report.json", report.to_json())
    frame = pd.DataFrame(
        [asdict(p) for p in report.problems], columns=["file", "line", "severity", "message"]
    )
    atomic_write_csv(report_dir / "report.csv", frame)
    return report_dir


def fatal_error_message(report: Report, report_dir: str | Path) -> str:
    fatal = report.fatal
    listed = "\n".join(f"  {p}" for p in fatal[:MAX_PROBLEMS_SHOWN])
    more = f"\n  ... and {len(fatal) - MAX_PROBLEMS_SHOWN} more" if len(fatal) > MAX_PROBLEMS_SHOWN else ""
    return (
        f"{len(fatal)} fatal problem(s) in data set {report.data_path} "
        f"(full list: {Path(report_dir) / 'report.csv'}):\n{listed}{more}\n"
        "Fix them, or set check.skip_bad=true to leave those images out."
    )


def unnamed_class_message(report: Report) -> str | None:
    """The stop message for class ids that label_to_name does not name (None when there are none).

    Not skippable: leaving those images out would quietly train without a class the user labelled.
    """
    unnamed = [p for p in report.problems if p.kind == UNNAMED_CLASS]
    if not unnamed:
        return None
    ids = sorted({int(p.message.split()[2]) for p in unnamed})
    files = sorted({p.file for p in unnamed})
    listed = ", ".join(f"{p.file}:{p.line}" for p in unnamed[:MAX_PROBLEMS_SHOWN])
    more = f" ... and {len(unnamed) - MAX_PROBLEMS_SHOWN} more" if len(unnamed) > MAX_PROBLEMS_SHOWN else ""
    named = ", ".join(f"{i}: {n}" for i, n in enumerate(report.class_names))
    return (
        f"class id(s) {', '.join(map(str, ids))} in {len(unnamed)} label line(s) of {len(files)} file(s) are not "
        f"named in label_to_name ({{{named}}}): {listed}{more}. Name every class in label_to_name "
        f"(ids 0..N-1) or fix those labels; check.skip_bad does not skip this."
    )


def unused_class_warning(report: Report) -> str | None:
    """A warning naming classes of label_to_name that no usable image contains (the model would still
    learn an output for each of them, and report them at mAP 0)."""
    unused = [f"{i}: {name}" for i, (name, n) in enumerate(report.boxes_per_class().items()) if n == 0]
    if not unused:
        return None
    return (
        f"label_to_name names {len(unused)} class(es) that no label uses: {', '.join(unused)}; the model will "
        f"still have {len(report.class_names)} outputs. Remove unused names from label_to_name (ids 0..N-1) "
        "unless those classes are coming."
    )


def keep_together_groups(report: Report, data_path: str | Path) -> list[list[str]]:
    """Images that must share one split: exact duplicates, near-duplicate groups, the tiles of one image."""
    return merge_groups(report.duplicate_groups, report.near_duplicate_groups, tile_groups(data_path))


def leaking_split_message(cfg: DictConfig, report: Report) -> str | None:
    """Why training must not use cfg's split (None: it keeps every group in one split)."""
    split_of = split_membership(cfg)
    leaks = leaking_groups(keep_together_groups(report, cfg.data_path), split_of)
    if not leaks:
        return None
    example = ", ".join(f"{n} ({split_of[n]})" for n in leaks[0] if split_of.get(n))
    return (
        f"the split in {cfg.splits_dir} leaks: {len(leaks)} group(s) of (near-)duplicate images or tiles of one "
        f"image span splits, e.g. {example}; val/test would hold copies of training images and flatter the model. "
        "Fix the split with `make split ARGS=split.fix_leaks=true` (moves whole groups), or set "
        "train.allow_leaks=true to train on it as it is"
    )


def check_dataset(cfg: DictConfig, write: bool = True, refuse_leaks: bool = False) -> Report:
    """Run the doctor on cfg.data_path with cfg.check settings; split, tile and train call this first.

    Raises DatasetError (naming file and line) on fatal problems unless check.skip_bad, and when no usable
    image is left; refuse_leaks: also when the existing split leaks (training). Writes report.json /
    report.csv and the data-quality reports to check.report_dir (write=False: don't).
    """
    c = cfg.check
    near = (
        NearDuplicateSettings(
            int(c.near_duplicate_distance), float(c.near_duplicate_similarity), float(c.near_duplicate_detail)
        )
        if c.near_duplicates
        else None
    )
    report = diagnose(
        cfg.data_path,
        label_names(cfg),
        clip_tolerance=float(c.clip_tolerance),
        find_duplicates=bool(c.find_duplicates),
        skip_bad=bool(c.skip_bad),
        workers=int(c.workers),
        near_duplicates=near,
    )
    if write:
        write_report(report, c.report_dir)
        write_quality_reports(cfg, report)
    (logger.warning if report.problems else logger.info)("\n" + report.text())
    segmentation_summary(cfg, report)
    unnamed = unnamed_class_message(report)
    if unnamed:
        raise DatasetError(unnamed)
    unused = unused_class_warning(report)
    if unused:
        logger.warning(unused)
    if report.fatal and not report.skip_bad:
        raise DatasetError(fatal_error_message(report, c.report_dir))
    if not report.usable_images:
        raise DatasetError(
            f"no usable image left in {report.data_path}:\n{fatal_error_message(report, c.report_dir)}"
        )
    leak = leaking_split_message(cfg, report) if refuse_leaks else None
    if leak:
        raise DatasetError(leak)
    return report
