"""The one YOLO-txt label reader/validator/writer (used by check, split, convert, demo data and the training dataset).

Layout: `<data_path>/images/<stem>.<ext>` has its labels in `<data_path>/labels/<stem>.txt`, one object per line:
    class cx cy w h                  (box, all normalised to [0, 1] by the image width/height)
    class x1 y1 x2 y2 x3 y3 ...      (YOLO-seg polygon, >= 3 points; turned into its bounding box)
A missing or empty label file means a background image (no objects).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from src.common.io import atomic_write_text

Severity = Literal["fatal", "warning"]
FATAL: Severity = "fatal"
WARNING: Severity = "warning"

# Problem.kind of a class id that label_to_name does not name: a config mismatch, not a bad image, so it
# stops check/split even with check.skip_bad (leaving those images out would silently drop a class).
UNNAMED_CLASS = "unnamed_class"

IMAGES_DIR = "images"
LABELS_DIR = "labels"
LABEL_EXT = ".txt"


@dataclass(frozen=True)
class Problem:
    """One finding about one file. line is 1-based, None for the whole file."""

    file: str
    line: int | None
    severity: Severity
    message: str
    kind: str = ""  # a machine-readable category where a stage treats it specially (UNNAMED_CLASS)

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.severity}: {self.message}"


@dataclass
class LabelFile:
    """Parsed labels of one image. Lines with a fatal problem contribute no box (the rest still do)."""

    path: Path
    boxes: np.ndarray  # (N, 4) float32 normalised cx, cy, w, h
    class_ids: np.ndarray  # (N,) int64
    problems: list[Problem] = field(default_factory=list)
    exists: bool = True

    @property
    def has_fatal(self) -> bool:
        return any(p.severity == FATAL for p in self.problems)

    @property
    def is_background(self) -> bool:
        return len(self.class_ids) == 0


def images_dir(data_path: str | Path) -> Path:
    return Path(data_path) / IMAGES_DIR


def labels_dir(data_path: str | Path) -> Path:
    return Path(data_path) / LABELS_DIR


def label_path_for(image_path: str | Path, labels_folder: str | Path | None = None) -> Path:
    """labels/<stem>.txt for an image; by default the `labels` folder beside the image's `images` folder."""
    image_path = Path(image_path)
    folder = Path(labels_folder) if labels_folder is not None else image_path.parent.parent / LABELS_DIR
    return folder / f"{image_path.stem}{LABEL_EXT}"


def _empty(path: Path, problems: list[Problem], exists: bool) -> LabelFile:
    return LabelFile(path, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), problems, exists)


def _parse_class_id(token: str, num_classes: int | None, report) -> int | None:
    try:
        value = float(token)
    except ValueError:
        report(FATAL, f"class id {token!r} is not a number")
        return None
    if not math.isfinite(value) or value != int(value):
        report(FATAL, f"class id {token!r} is not a whole number")
        return None
    class_id = int(value)
    if "." in token or "e" in token.lower():
        report(WARNING, f"class id written as {token!r}; read as {class_id}")
    if class_id < 0 or (num_classes is not None and class_id >= num_classes):
        valid = f"0..{num_classes - 1}" if num_classes else "none"
        report(FATAL, f"class id {class_id} is not in label_to_name (valid ids: {valid})", UNNAMED_CLASS)
        return None
    return class_id


def _parse_coords(tokens: Sequence[str], report) -> np.ndarray | None:
    try:
        values = np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError:
        bad = next(t for t in tokens if not _is_float(t))
        report(FATAL, f"coordinate {bad!r} is not a number")
        return None
    if not np.isfinite(values).all():
        report(FATAL, "coordinates contain nan or inf")
        return None
    return values


def _is_float(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _clip_edges(x1y1x2y2: np.ndarray, clip_tolerance: float, report) -> np.ndarray | None:
    """Clip edges that stick out of the image by <= clip_tolerance (warning); reject larger excursions."""
    excursion = float(max(0.0, -x1y1x2y2.min(), x1y1x2y2.max() - 1.0))
    if excursion == 0.0:
        return x1y1x2y2
    if excursion > clip_tolerance:
        hint = " (these look like pixel coordinates: YOLO needs them divided by the image width/height)"
        report(
            FATAL,
            f"coordinates outside [0, 1] by {excursion:.4g} (more than check.clip_tolerance={clip_tolerance})"
            + (hint if x1y1x2y2.max() > 2.0 else ""),
        )
        return None
    report(WARNING, f"coordinates outside [0, 1] by {excursion:.4g}; clipped")
    return np.clip(x1y1x2y2, 0.0, 1.0)


def _box_from_line(tokens: list[str], clip_tolerance: float, report) -> np.ndarray | None:
    """Tokens after the class id -> normalised cxcywh, or None if the line is unusable."""
    coords = _parse_coords(tokens, report)
    if coords is None:
        return None
    if len(tokens) == 4:
        cx, cy, w, h = coords
        if w <= 0 or h <= 0:
            report(FATAL, f"box width/height must be > 0, got w={w:g} h={h:g}")
            return None
        edges = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    else:  # polygon: its bounding box
        points = coords.reshape(-1, 2)
        edges = np.concatenate([points.min(0), points.max(0)])
    edges = _clip_edges(edges, clip_tolerance, report)
    if edges is None:
        return None
    x1, y1, x2, y2 = edges
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        kind = "polygon" if len(tokens) != 4 else "box"
        report(FATAL, f"{kind} has zero width or height (w={x2 - x1:g}, h={y2 - y1:g})")
        return None
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dtype=np.float32)


def parse_yolo_text(
    text: str, path: str | Path, num_classes: int | None, clip_tolerance: float = 0.01
) -> LabelFile:
    """Parse the text of one YOLO label file (see the module docstring for the format)."""
    path = Path(path)
    problems: list[Problem] = []
    boxes: list[np.ndarray] = []
    class_ids: list[int] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.replace(",", " ").split()  # some exporters separate with commas
        if not tokens:
            continue

        def report(severity: Severity, message: str, kind: str = "", _line=line_no) -> None:
            problems.append(Problem(str(path), _line, severity, message, kind))

        n_coords = len(tokens) - 1
        if n_coords != 4 and (n_coords < 6 or n_coords % 2):
            report(
                FATAL,
                f"expected 5 fields (class cx cy w h) or a polygon (class x1 y1 x2 y2 x3 y3 ...), "
                f"got {len(tokens)}: {raw.strip()[:80]!r}",
            )
            continue
        class_id = _parse_class_id(tokens[0], num_classes, report)
        box = _box_from_line(tokens[1:], clip_tolerance, report)
        if class_id is None or box is None:
            continue
        class_ids.append(class_id)
        boxes.append(box)
    if not boxes:
        return _empty(path, problems, exists=True)
    return LabelFile(path, np.stack(boxes), np.array(class_ids, dtype=np.int64), problems)


def read_yolo_labels(path: str | Path, num_classes: int | None, clip_tolerance: float = 0.01) -> LabelFile:
    """Read and validate one YOLO label file. A missing file is a background image (no boxes, no problem).

    num_classes: class ids must be 0..num_classes-1 (None: not checked).
    Tiny excursions outside [0, 1] (<= clip_tolerance) are clipped with a warning; larger ones are fatal.
    """
    path = Path(path)
    if not path.exists():
        return _empty(path, [], exists=False)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except UnicodeDecodeError:
        return _empty(path, [Problem(str(path), None, FATAL, "not a UTF-8 text file")], exists=True)
    except OSError as err:
        return _empty(path, [Problem(str(path), None, FATAL, f"cannot read: {err}")], exists=True)
    return parse_yolo_text(text, path, num_classes, clip_tolerance)


def format_yolo_lines(class_ids: Iterable[int], boxes: Iterable[Sequence[float]]) -> str:
    """YOLO txt text for normalised cxcywh boxes (6 decimals: sub-pixel even for 10k-pixel images)."""
    lines = [
        f"{int(c)} {float(b[0]):.6f} {float(b[1]):.6f} {float(b[2]):.6f} {float(b[3]):.6f}"
        for c, b in zip(class_ids, boxes, strict=True)
    ]
    return "".join(line + "\n" for line in lines)


def write_yolo_labels(path: str | Path, class_ids: Iterable[int], boxes: Iterable[Sequence[float]]) -> Path:
    """Write one label file atomically (an empty file for a background image)."""
    return atomic_write_text(path, format_yolo_lines(class_ids, boxes))
