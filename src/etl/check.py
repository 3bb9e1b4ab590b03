"""Dataset doctor: find everything wrong with `<data_path>/images` + `<data_path>/labels` before training does.

    python -m src.etl.check                      # report; stop on fatal problems
    python -m src.etl.check check.skip_bad=true  # report; leave bad images out (split/train then use the rest)

Fatal (the image cannot be used as is): unreadable/truncated image, a label line with the wrong number of fields,
non-numeric values, a class id not in label_to_name, coordinates far outside [0, 1], zero/negative width or
height, two images with the same stem (they would share one label file); YOLO-seg polygon lines with an odd
coordinate count, fewer than 3 points, NaN, points far outside the image or zero area.
Warnings: coordinates clipped (within check.clip_tolerance), boxes under a pixel, a polygon crossing itself,
orphan label files, exact duplicate images, unsupported files in images/. Images without labels are
background (counted). A segmentation data set (some polygon line) gets its polygon / box-only object counts
per split, and a warning naming label files with box lines (no mask to learn).
split and train call `check_dataset(cfg)` themselves.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from loguru import logger
from omegaconf import DictConfig

from src.common.config import label_names, stage_main
from src.common.errors import UserError
from src.common.images import IMAGE_EXTS, ImageReadError, list_images, parallel_map, read_image_rgb
from src.common.io import atomic_write_csv, atomic_write_json
from src.etl.data_quality import segmentation_summary, write_quality_reports
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
from src.etl.near_duplicates import Fingerprint, fingerprint, near_duplicate_groups

MAX_PROBLEMS_SHOWN = 20


class DatasetError(UserError, ValueError):
    """The data set cannot be used as is; the message lists the problems (file and line)."""


@dataclass
class ImageRecord:
    """What the doctor learned about one image (file name relative to images/)."""

    image: str
    width: int = 0
    height: int = 0
    class_ids: list[int] = field(default_factory=list)
    has_label_file: bool = False
    usable: bool = True
    digest: str = ""
    box_wh: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # (N, 2) normalised w, h
    num_polygons: int = 0  # objects given as YOLO-seg polygon lines (the rest are box lines)

    @property
    def num_boxes(self) -> int:
        return len(self.class_ids)

    @property
    def num_box_only(self) -> int:
        """Objects given as box lines: no mask to learn in a segmentation run."""
        return self.num_boxes - self.num_polygons

    @property
    def background(self) -> bool:
        return not self.class_ids


@dataclass
class Report:
    data_path: str
    class_names: list[str]
    records: list[ImageRecord]
    problems: list[Problem]
    orphan_labels: list[str]
    duplicate_groups: list[list[str]]
    skip_bad: bool
    near_duplicate_groups: list[list[str]] = field(default_factory=list)

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == FATAL]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def usable_images(self) -> list[str]:
        return [r.image for r in self.records if r.usable]

    @property
    def excluded_images(self) -> list[str]:
        return [r.image for r in self.records if not r.usable]

    @property
    def is_segmentation(self) -> bool:
        """Some usable image has a polygon label: a segmentation data set (it can also train a detector)."""
        return any(r.num_polygons for r in self.records if r.usable)

    @property
    def box_only_images(self) -> list[str]:
        """Usable images whose label file has box lines (objects without a polygon)."""
        return [r.image for r in self.records if r.usable and r.num_box_only]

    def record(self, image: str) -> ImageRecord:
        return self._by_name[image]

    @functools.cached_property
    def _by_name(self) -> dict[str, ImageRecord]:
        return {r.image: r for r in self.records}

    def boxes_per_class(self, images: list[str] | None = None) -> dict[str, int]:
        by_name = self._by_name
        counts = Counter(
            c
            for name in (images if images is not None else self.usable_images)
            for c in by_name[name].class_ids
        )
        return {name: counts.get(i, 0) for i, name in enumerate(self.class_names)}

    def summary(self) -> dict:
        usable = [r for r in self.records if r.usable]
        return {
            "data_path": self.data_path,
            "images": len(self.records),
            "usable_images": len(usable),
            "excluded_images": len(self.records) - len(usable),
            "labelled_images": sum(not r.background for r in usable),
            "background_images": sum(r.background for r in usable),
            "boxes": sum(r.num_boxes for r in usable),
            "polygons": sum(r.num_polygons for r in usable),
            "box_only_objects": sum(r.num_box_only for r in usable),
            "boxes_per_class": self.boxes_per_class(),
            "fatal_problems": len(self.fatal),
            "warnings": len(self.warnings),
            "orphan_labels": len(self.orphan_labels),
            "duplicate_groups": len(self.duplicate_groups),
            "near_duplicate_groups": len(self.near_duplicate_groups),
        }

    def to_json(self) -> dict:
        return {
            "summary": self.summary(),
            "skip_bad": self.skip_bad,
            "usable_images": self.usable_images,
            "excluded_images": {
                r.image: [str(p) for p in self.problems if p.severity == FATAL and _concerns(p, r.image)]
                for r in self.records
                if not r.usable
            },
            "orphan_labels": self.orphan_labels,
            "duplicate_groups": self.duplicate_groups,
            "near_duplicate_groups": self.near_duplicate_groups,
            "problems": [asdict(p) for p in self.problems],
            "images": [
                {
                    "image": r.image,
                    "width": r.width,
                    "height": r.height,
                    "boxes": r.num_boxes,
                    "polygons": r.num_polygons,
                    "usable": r.usable,
                }
                for r in self.records
            ],
        }

    def text(self) -> str:
        """Readable console summary."""
        s = self.summary()
        lines = [
            f"Dataset {s['data_path']}: {s['images']} images, {s['usable_images']} usable "
            f"({s['labelled_images']} labelled, {s['background_images']} background), {s['boxes']} boxes",
            "  boxes per class: " + ", ".join(f"{k}={v}" for k, v in s["boxes_per_class"].items()),
            f"  {s['fatal_problems']} fatal problem(s), {s['warnings']} warning(s), "
            f"{s['orphan_labels']} orphan label file(s), {s['duplicate_groups']} group(s) of duplicate images, "
            f"{s['near_duplicate_groups']} group(s) of near-duplicates",
        ]
        shown = sorted(self.problems, key=lambda p: p.severity != FATAL)[:MAX_PROBLEMS_SHOWN]
        lines += [f"  {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more (see report.json / report.csv)")
        if self.excluded_images:
            lines.append(f"  not usable (fatal problems): {', '.join(self.excluded_images)}")
        return "\n".join(lines)


def _concerns(problem: Problem, image: str) -> bool:
    return Path(problem.file).stem == Path(image).stem


@dataclass(frozen=True)
class NearDuplicateSettings:
    max_distance: int  # pHash bits
    min_similarity: float  # band-pass thumbnail correlation


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
        near_groups = near_duplicate_groups(
            names, prints, near_duplicates.max_distance, near_duplicates.min_similarity
        )
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


def check_dataset(cfg: DictConfig, write: bool = True) -> Report:
    """Run the doctor on cfg.data_path with cfg.check settings; split and train call this first.

    Raises DatasetError (naming file and line) on fatal problems unless check.skip_bad, and when no usable
    image is left. Writes report.json / report.csv to check.report_dir (write=False: don't).
    """
    c = cfg.check
    near = (
        NearDuplicateSettings(int(c.near_duplicate_distance), float(c.near_duplicate_similarity))
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
    return report


def run(cfg: DictConfig) -> Report:
    report = check_dataset(cfg)
    logger.info(f"report written to {Path(cfg.check.report_dir) / 'report.json'} and report.csv")
    return report


main = stage_main(run)

if __name__ == "__main__":
    main()
