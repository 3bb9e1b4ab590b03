"""What the dataset doctor learns: one ImageRecord per image, the Report of a data set, DatasetError.

The doctor (src/etl/doctor.py) fills them; its reports (src/etl/data_quality.py), split, tile and training
read them.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from src.common.errors import UserError
from src.etl.labels import FATAL, WARNING, Problem

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
