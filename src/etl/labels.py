"""The one YOLO-txt label reader/validator/writer (used by check, split, convert, demo data and the training dataset).

Layout: `<data_path>/images/<stem>.<ext>` has its labels in `<data_path>/labels/<stem>.txt`, one object per line:
    class cx cy w h                  (box, all normalised to [0, 1] by the image width/height)
    class x1 y1 x2 y2 x3 y3 ...      (YOLO-seg polygon, >= 3 points; its bounding box is the object's box)
A missing or empty label file means a background image (no objects). One file may mix both kinds of line:
a polygon line gives a box and a polygon, a box line a box only (LabelFile.polygons[i] is None).
Polygon checks: >= 3 points (an even number of coordinates), finite, inside the image within
check.clip_tolerance (clipped), area > 0 (else fatal); a self-intersecting outline is a warning (it still
rasterises, as even-odd fill, but is usually a labelling slip).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from src.common.io import atomic_write_text
from src.common.yolo_lines import format_yolo_lines

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
    # (N,) per object: its polygon (K, 2) float32 normalised x, y (clipped to [0, 1]), or None (box line)
    polygons: list[np.ndarray | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.polygons:
            self.polygons = [None] * len(self.class_ids)

    @property
    def has_polygons(self) -> bool:
        return any(p is not None for p in self.polygons)

    @property
    def has_boxes_only(self) -> bool:
        """Some object has no polygon (a box line)."""
        return any(p is None for p in self.polygons)

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


def polygon_area(points: np.ndarray) -> float:
    """Area of a closed polygon (K, 2) by the shoelace formula (absolute, same units squared)."""
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (
        b[..., 0] - o[..., 0]
    )


def is_self_intersecting(points: np.ndarray, max_points: int = 1000) -> bool:
    """Whether two non-adjacent edges of the closed polygon (K, 2) properly cross (touching is not
    counted). All edge pairs at once, O(K^2): outlines over max_points points are not checked."""
    count = len(points)
    if count < 4 or count > max_points:
        return False
    starts, ends = points, np.roll(points, -1, axis=0)
    a1, a2 = starts[:, None], ends[:, None]  # (K, 1, 2)
    b1, b2 = starts[None], ends[None]  # (1, K, 2)
    d1, d2 = _cross(b1, b2, a1), _cross(b1, b2, a2)
    d3, d4 = _cross(a1, a2, b1), _cross(a1, a2, b2)
    crossing = (d1 * d2 < 0) & (d3 * d4 < 0)
    index = np.arange(count)
    gap = np.abs(index[:, None] - index[None])
    adjacent = (gap <= 1) | (gap == count - 1)
    return bool((crossing & ~adjacent).any())


def _box_from_line(
    tokens: list[str], clip_tolerance: float, report
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Tokens after the class id -> (normalised cxcywh, polygon (K, 2) or None), or None if unusable."""
    coords = _parse_coords(tokens, report)
    if coords is None:
        return None
    polygon = None
    if len(tokens) == 4:
        cx, cy, w, h = coords
        if w <= 0 or h <= 0:
            report(FATAL, f"box width/height must be > 0, got w={w:g} h={h:g}")
            return None
        edges = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    else:  # polygon: its bounding box
        polygon = coords.reshape(-1, 2)
        edges = np.concatenate([polygon.min(0), polygon.max(0)])
    clipped = _clip_edges(edges, clip_tolerance, report)
    if clipped is None:
        return None
    x1, y1, x2, y2 = clipped
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        kind = "polygon" if polygon is not None else "box"
        report(FATAL, f"{kind} has zero width or height (w={x2 - x1:g}, h={y2 - y1:g})")
        return None
    if polygon is not None:
        polygon = np.clip(polygon, 0.0, 1.0)  # _clip_edges already refused larger excursions
        # A crossing outline (a bow tie) can have a zero signed area and still cover pixels: warn only.
        if is_self_intersecting(polygon):
            report(WARNING, f"polygon of {len(polygon)} points crosses itself (check its point order)")
        elif polygon_area(polygon) <= 0:
            report(FATAL, f"polygon of {len(polygon)} points has zero area (all points on one line)")
            return None
        polygon = polygon.astype(np.float32)
    box = np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dtype=np.float32)
    return box, polygon


def parse_yolo_text(
    text: str, path: str | Path, num_classes: int | None, clip_tolerance: float = 0.01
) -> LabelFile:
    """Parse the text of one YOLO label file (see the module docstring for the format)."""
    path = Path(path)
    problems: list[Problem] = []
    boxes: list[np.ndarray] = []
    class_ids: list[int] = []
    polygons: list[np.ndarray | None] = []
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
        parsed = _box_from_line(tokens[1:], clip_tolerance, report)
        if class_id is None or parsed is None:
            continue
        class_ids.append(class_id)
        boxes.append(parsed[0])
        polygons.append(parsed[1])
    if not boxes:
        return _empty(path, problems, exists=True)
    return LabelFile(path, np.stack(boxes), np.array(class_ids, dtype=np.int64), problems, True, polygons)


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


def write_yolo_labels(
    path: str | Path,
    class_ids: Iterable[int],
    boxes: Iterable[Sequence[float]],
    polygons: Sequence[np.ndarray | None] | None = None,
) -> Path:
    """Write one label file atomically (an empty file for a background image); see format_yolo_lines."""
    return atomic_write_text(path, format_yolo_lines(class_ids, boxes, polygons))
