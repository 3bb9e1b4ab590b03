"""What the demo does with a request, without Gradio: the models (found in output_dir, loaded and cached),
detection on images (instance masks drawn for segmentation models), the table and the files written for
download (annotated images, YOLO txt labels, predictions.json, one zip). Videos: src/demo/video.py; the
page around it: src/demo/app.py.
"""

from __future__ import annotations

import tempfile
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from loguru import logger
from omegaconf import DictConfig

from src.common.draw import save_image_rgb
from src.common.errors import ExperimentError
from src.common.experiment import ARTIFACTS, Experiment
from src.common.images import IMAGE_EXTS, ImageReadError, is_image, read_image_rgb
from src.common.io import atomic_write, atomic_write_json, atomic_write_text
from src.dl.artifacts import best_artifact, load_artifact
from src.runtime import Detections, Detector
from src.runtime.outputs import OutputNames, draw, yolo_text

TABLE_COLUMNS = ["file", "frame", "track_id", "class_id", "class_name", "score", "x1", "y1", "x2", "y2"]
OPTIONAL_COLUMNS = ("frame", "track_id")  # shown only when a row has one (video frames; tracked videos)
MAX_TABLE_ROWS = 2000  # rows shown in the page; the downloads hold every detection


# ---------------------------------------------------------------- models


def find_models(output_dir: str | Path) -> list[Path]:
    """Every artifact (src.common.experiment.ARTIFACTS) in the experiment folders directly under output_dir, sorted."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += [folder / name for name in ARTIFACTS.values() if (folder / name).is_file()]
    return found


def model_choices(output_dir: str | Path) -> list[tuple[str, str]]:
    """(label, path) pairs for the model list: "experiment/file"."""
    return [(f"{p.parent.name}/{p.name}", str(p)) for p in find_models(output_dir)]


def default_model(cfg: DictConfig) -> str | None:
    """demo_ui.model_path, else the fastest artifact of exp_name for `device`, else the first one found."""
    if cfg.demo_ui.model_path:
        return str(cfg.demo_ui.model_path)
    try:
        return str(best_artifact(Experiment.of(cfg).root, str(cfg.device)))
    except ExperimentError as err:  # a stale export: say so, offer another model
        logger.warning(str(err))
        models = find_models(cfg.output_dir)
        return str(models[0]) if models else None
    except FileNotFoundError:
        models = find_models(cfg.output_dir)
        return str(models[0]) if models else None


class ModelCache:
    """Loaded Detectors by path (src/dl/artifacts.py: a stale export of an experiment is refused); keeps the
    `size` most recently used (each holds a whole model)."""

    def __init__(
        self,
        device: str = "auto",
        precision: str | None = None,
        size: int = 1,
        wrap=lambda detector: detector,
    ):
        self.device, self.precision, self.size = device, precision, max(1, size)
        self.wrap = wrap  # e.g. sliced inference (src/runtime/slicing.py)
        self._models: dict[str, Detector] = {}
        self._lock = threading.Lock()

    def get(self, path: str | Path) -> Detector:
        key = str(Path(path).expanduser())
        with self._lock:
            if key in self._models:
                self._models[key] = self._models.pop(key)  # most recently used goes last
                return self._models[key]
            detector = self.wrap(load_artifact(key, device=self.device, precision=self.precision))
            logger.info(f"demo: loaded {detector}")
            self._models[key] = detector
            while len(self._models) > self.size:
                self._models.pop(next(iter(self._models)))
            return detector


def describe_model(detector: Detector) -> str:
    """Markdown: backend, file, input size, classes, default thresholds."""
    meta = detector.meta
    h, w = meta.img_size
    path = Path(str(detector.path)).absolute()
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    task = " · instance masks" if meta.task == "segment" else ""
    text = (
        f"**{detector.backend}** `{shown}`{task} · input {w}×{h} · {meta.num_classes} classes · "
        f"default threshold {meta.conf_thresh:.3g}"
    )
    if meta.class_thresholds:
        per_class = ", ".join(f"{name} {value:.3g}" for name, value in meta.class_thresholds.items())
        text += f" (per class: {per_class}; used while the slider stays at the default)"
    return text


def slider_conf(detector: Detector, value: float | None, step: float = 0.01) -> float | None:
    """The slider's value as a `conf`: at the model's default (within half a step) -> None, i.e. the
    model's own global + per-class thresholds; anywhere else -> one threshold for every class."""
    if value is None or abs(float(value) - detector.meta.conf_thresh) <= step / 2 + 1e-9:
        return None
    return float(value)


def class_thresholds(
    detector: Detector, conf: float | dict | None = None, classes: Sequence[str] | None = None
) -> dict[int, float]:
    """Per-class thresholds {class id: value} for `conf`; classes left out of `classes` get +inf (hidden).

    classes None: every class. Names the model does not have are ignored.
    """
    thresholds = detector.thresholds(conf)
    wanted = None if classes is None else set(map(str, classes))
    return {
        i: (float(thresholds[i]) if wanted is None or name in wanted else float("inf"))
        for i, name in enumerate(detector.class_names)
    }


# ---------------------------------------------------------------- images


@dataclass
class Results:
    """What one request produced: gallery (annotated image path, caption) pairs or the annotated video,
    the detections table, files to download, and messages about inputs that could not be used."""

    gallery: list[tuple[str, str]] = field(default_factory=list)
    table: pd.DataFrame = field(default_factory=lambda: make_table([]))
    downloads: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    video: str | None = None  # browser-playable annotated preview (WebM)
    detections: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. "video cut at 300 frames"

    def __iter__(self) -> Iterator[Any]:
        """`gallery, table, downloads = predict_images(...)` (problems: `.problems`)."""
        return iter((self.gallery, self.table, self.downloads))


def file_path(item: Any) -> Path:
    """A Gradio upload (a path string, or an object with .name / .path) as a Path."""
    if isinstance(item, (str, Path)):
        return Path(item)
    for attribute in ("path", "name"):
        value = getattr(item, attribute, None)
        if isinstance(value, str):
            return Path(value)
    raise TypeError(f"not a file: {item!r}")


def unique_names(names: Sequence[str]) -> list[str]:
    """The uploads' file names, made distinct: a second a.jpg becomes a_2.jpg (a_3.jpg, ... when taken)."""
    used: set[str] = set()
    unique = []
    for name in names:
        path, candidate, n = Path(name), name, 1
        while candidate in used:
            n += 1
            candidate = f"{path.stem}_{n}{path.suffix}"
        used.add(candidate)
        unique.append(candidate)
    return unique


def table_rows(
    file: str, frame: int | None, dets: Detections, track_ids: np.ndarray | None = None
) -> list[list[Any]]:
    """TABLE_COLUMNS rows; track_ids (N,): -1 or None = no track."""
    ids = [None] * len(dets) if track_ids is None else [int(i) if i >= 0 else None for i in track_ids]
    return [
        [file, frame, track_id, int(label), name, round(float(score), 4), *(round(float(v), 1) for v in box)]
        for box, score, label, name, track_id in zip(
            dets.boxes, dets.scores, dets.labels, dets.names, ids, strict=True
        )
    ]


def make_table(rows: list[list[Any]]) -> pd.DataFrame:
    """Detections as a table; the frame and track_id columns only when a row has one (images have none)."""
    rows = rows[:MAX_TABLE_ROWS]
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    # Their text comes from the rows themselves: pandas would turn a 3 next to a None into 3.0.
    for column in OPTIONAL_COLUMNS:
        at = TABLE_COLUMNS.index(column)
        values = ["" if row[at] is None else str(row[at]) for row in rows]
        table = table.assign(**{column: values}) if any(values) else table.drop(columns=column)
    return table


def join_tables(*tables: pd.DataFrame) -> pd.DataFrame:
    """One request's tables (its images', its video's) as one, the optional columns blank where absent."""
    tables = tuple(table for table in tables if len(table))
    if not tables:
        return make_table([])
    table = pd.concat(tables, ignore_index=True)
    present = [column for column in TABLE_COLUMNS if column in table]
    return table[present].fillna({column: "" for column in OPTIONAL_COLUMNS if column in table})


def readable_error(err: Exception, path: Path, name: str) -> str:
    """The reader's message with the upload's temp path replaced by the name the user knows."""
    message = str(err).replace(str(path), name)
    return message if name in message else f"{name}: {message}"


def predict_images(
    detector: Detector,
    files: Sequence[Any],
    conf: float | dict | None = None,
    classes: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    max_images: int | None = None,
    label_scores: bool = False,
) -> Results:
    """Detect on image files and write annotated copies, YOLO txt labels, predictions.json and a zip.

    conf: None -> the model's thresholds; float; or {class: threshold}. classes: names to keep (None: all).
    Unreadable or non-image files are skipped with a message in `.problems`. Unpacks as
    (gallery [(annotated path, caption)], table DataFrame, download paths).
    """
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="dfine_demo_"))
    thresholds = class_thresholds(detector, conf, classes)
    paths = [file_path(item) for item in files]
    names = unique_names([path.name for path in paths])
    output_names = OutputNames(names)
    results, rows, entries = Results(), [], []
    annotated_files, label_files = [], []
    usable = usable_images(paths, names, max_images, results.problems)
    for (path, name), image, dets in detector.stream(usable, thresholds):
        annotated = save_image_rgb(out / output_names.drawing(name), draw(image, dets, detector.class_names))
        label_file = atomic_write_text(out / output_names.label(name), yolo_text(dets, label_scores))
        annotated_files.append(annotated)
        label_files.append(label_file)
        masks = " with masks" if dets.masks is not None else ""
        results.gallery.append((str(annotated), f"{path.name}: {len(dets)} detection(s){masks}"))
        rows += table_rows(path.name, None, dets)
        entries.append({"file": path.name, **dets.to_dict()})
        results.detections += len(dets)
    results.table = make_table(rows)
    if not entries:
        return results
    summary = {**model_summary(detector, thresholds), "images": entries, "failed": results.problems}
    predictions = atomic_write_json(out / "predictions.json", summary)
    bundle = write_zip(out / "predictions.zip", out, [predictions, *annotated_files, *label_files])
    results.downloads = [str(p) for p in (bundle, predictions, *annotated_files, *label_files)]
    return results


def usable_images(
    paths: Sequence[Path], names: Sequence[str], max_images: int | None, problems: list[str]
) -> Iterator[tuple[tuple[Path, str], np.ndarray]]:
    """((upload, its unique name), RGB image) for each upload that is a readable image, up to max_images;
    the others get a line in `problems`."""
    taken = 0
    for path, name in zip(paths, names, strict=True):
        if max_images is not None and taken >= max_images:
            problems.append(f"{path.name}: skipped, at most {max_images} images per request")
            continue
        if not is_image(path):
            problems.append(f"{path.name}: not a supported image ({', '.join(sorted(IMAGE_EXTS))})")
            continue
        try:
            image = read_image_rgb(path)
        except (ImageReadError, OSError, ValueError) as err:
            problems.append(readable_error(err, path, path.name))
            continue
        taken += 1
        yield (path, name), image


def model_summary(detector: Detector, thresholds: dict[int, float]) -> dict[str, Any]:
    shown = {
        detector.class_names[i]: (round(v, 4) if np.isfinite(v) else "hidden") for i, v in thresholds.items()
    }
    return {"model": str(detector.path), "backend": detector.backend, "thresholds": shown}


def write_zip(path: Path, root: Path, files: Sequence[Path]) -> Path:
    """One zip of `files` (names relative to root), for a single download."""

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as bundle:
            for file in files:
                bundle.write(file, file.relative_to(root).as_posix())

    return atomic_write(path, write)
