"""Run a model on a file or a folder of images and videos; write what it found.

    python -m src.dl.infer exp_name=my_run infer.input=path/to/folder_or_file [infer.model_path=...onnx]

Output in output/<exp>/infer/<input name>/: annotated images (images/), annotated videos (videos/, same fps
and size), YOLO txt predictions (labels/, optionally with a score column), crops per class (crops/<class>/),
predictions.csv (one row per detection) and predictions.json (summary). Every output keeps the input's
path relative to the input folder; when two inputs share a stem (a.jpg, a.png) their outputs keep the
extension too (labels/a.jpg.txt, labels/a.png.txt), so nothing overwrites anything.

A segmentation model's masks are drawn under the boxes, its label lines are YOLO-seg polygons (a detection
whose mask is empty keeps its box line), and infer.save_masks writes masks/<image>.png: one instance-id PNG
per image (0 = background, i = the i-th detection of the image's label file and predictions.csv rows;
uint16 when more than 255).

A run is written into a temp folder and then replaces the previous outputs of the same input as a whole:
no stale file of an earlier run stays mixed in, outputs of other inputs are untouched, and the inputs
themselves are never written to. Folders are searched recursively, any extension case; unreadable files
are reported and skipped. Frames are processed as they are read (memory stays bounded).

infer.input may also be a webcam index (0) or a stream URL (rtsp://...): Ctrl-C stops it and keeps what
was written. infer.track=true tracks objects through every video (src.runtime.tracking): ids drawn, and
tracks/<video>.txt (MOT challenge) + tracks/<video>.csv.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from loguru import logger
from omegaconf import DictConfig
from tqdm import tqdm

from src.common.config import stage_main
from src.common.draw import draw_detections, draw_masks, save_image_rgb
from src.common.errors import UserError
from src.common.experiment import Experiment, stage_config
from src.common.images import ImageReadError, is_image, is_video, list_images, list_videos, read_image_rgb
from src.common.io import atomic_write, atomic_write_json, atomic_write_text, read_json
from src.common.masks import mask_to_polygon
from src.common.video import (
    VideoOutput,
    VideoReadError,
    display_name,
    is_live,
    open_video,
    parse_source,
    source_name,
    stop_on_ctrl_c,
)
from src.etl.labels import format_yolo_lines
from src.runtime.detector import BOX_DECIMALS, SCORE_DECIMALS, Detections, Detector, rounded
from src.runtime.evaluate import load_experiment_model
from src.runtime.tracking import TrackerSettings, VideoTracks

CSV_COLUMNS = [
    "file",
    "frame",
    "class_id",
    "class_name",
    "score",
    "x1",
    "y1",
    "x2",
    "y2",
    "image_w",
    "image_h",
]
# Annotated images keep their format when OpenCV can write it; anything else (HEIC, TIFF...) becomes JPG.
WRITABLE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
VIDEO_FOURCC = "mp4v"  # annotated videos: .mp4 (OpenCV's wheels have no H.264 encoder)
SUMMARY = "predictions.json"  # marks a folder as an infer output (only such folders are ever replaced)


def find_inputs(source: Path, recursive: bool = True) -> tuple[list[Path], list[Path], Path]:
    """(images, videos, root the output paths are relative to) for a file or a folder."""
    if not source.exists():
        raise UserError(f"infer.input not found: {source}")
    if source.is_file():
        if not (is_image(source) or is_video(source)):
            raise UserError(f"infer.input={source}: not an image or video file (by its extension)")
        return ([source], [], source.parent) if is_image(source) else ([], [source], source.parent)
    return list_images(source, recursive), list_videos(source, recursive), source


def output_keys(paths: list[Path], root: Path) -> dict[Path, Path]:
    """Input -> the name its outputs take (relative, no suffix): the relative path without its extension,
    or with it (sub/a.png) when another input shares that stem, so a.jpg and a.png keep apart."""
    relative = {path: relative_to(path, root) for path in paths}
    stems = Counter(rel.with_suffix("") for rel in relative.values())
    return {
        path: rel.with_suffix("") if stems[rel.with_suffix("")] == 1 else rel
        for path, rel in relative.items()
    }


def relative_to(path: Path | int | str, root: Path) -> Path:
    if is_live(path):  # a webcam index or stream URL: its file-name-safe name
        return Path(source_name(path))
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


def with_extra_suffix(key: Path, suffix: str) -> Path:
    """sub/a + .txt -> sub/a.txt; sub/a.png + .txt -> sub/a.png.txt (the kept extension stays)."""
    return key.with_name(key.name + suffix)


def crop_box(box: np.ndarray, width: int, height: int, padding: int | float) -> tuple[int, int, int, int]:
    """Pixel crop around a box with padding: int = pixels, float = fraction of the box's width/height."""
    x1, y1, x2, y2 = (float(v) for v in box)
    pad_x = padding * (x2 - x1) if isinstance(padding, float) else padding
    pad_y = padding * (y2 - y1) if isinstance(padding, float) else padding
    left, top = max(0, int(np.floor(x1 - pad_x))), max(0, int(np.floor(y1 - pad_y)))
    right, bottom = min(width, int(np.ceil(x2 + pad_x))), min(height, int(np.ceil(y2 + pad_y)))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def yolo_text(dets: Detections, with_scores: bool) -> str:
    """YOLO txt lines (normalised cx cy w h) for detections in pixels, or YOLO-seg polygon lines for
    detections with masks (common.masks.mask_to_polygon: the largest part's outline; an empty mask keeps
    the box line); optional trailing score column."""
    height, width = dets.image_size
    x1, y1, x2, y2 = dets.boxes.astype(np.float64).T if len(dets) else np.zeros((4, 0))
    boxes = np.stack(
        [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height], 1
    )
    polygons = None if dets.masks is None else [mask_to_polygon(mask) for mask in dets.masks]
    text = format_yolo_lines(dets.labels, boxes, polygons)
    if not with_scores:
        return text
    return "".join(
        f"{line} {score:.{SCORE_DECIMALS}f}\n"
        for line, score in zip(text.splitlines(), dets.scores, strict=True)
    )


def instance_id_image(dets: Detections) -> np.ndarray:
    """(H, W) instance ids of a segmentation model's detections: 0 = background, i = detection i (1-based,
    in score order); where masks overlap the higher score wins. uint8, or uint16 above 255 detections."""
    height, width = dets.image_size
    ids = np.zeros((height, width), np.uint8 if len(dets) <= 255 else np.uint16)
    for i in range(len(dets) - 1, -1, -1):  # lowest score first: higher scores overwrite it
        ids[dets.masks[i]] = i + 1
    return ids


def save_id_png(path: Path, ids: np.ndarray) -> None:
    """A one-channel PNG (8 or 16 bit, the array's dtype), written atomically."""
    ok, encoded = cv2.imencode(".png", ids)
    if not ok:
        raise ValueError(f"cannot encode the instance-id PNG {path}")
    atomic_write(path, lambda tmp: tmp.write_bytes(encoded.tobytes()))


def draw(image_rgb: np.ndarray, dets: Detections, class_names: list[str]) -> np.ndarray:
    """Masks (filled, semi-transparent, with contours; segmentation models) and then the boxes with tags."""
    if dets.masks is not None:
        image_rgb = draw_masks(image_rgb, dets.masks, dets.labels)
    return draw_detections(image_rgb, dets.boxes, dets.labels, dets.scores, class_names)


@dataclass
class InferOutputs:
    """Writes everything for one run; predictions.csv rows are streamed, never held in memory."""

    out_dir: Path
    detector: Detector
    root: Path
    options: DictConfig
    keys: dict[Path, Path] = field(default_factory=dict)  # input -> output name (see output_keys)
    csv_writer: Any = None
    per_class: Counter = field(default_factory=Counter)
    per_file: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    frames: int = 0
    tracks: dict[str, int] = field(default_factory=dict)  # video -> number of track ids

    def relative(self, path: Path) -> Path:
        return relative_to(path, self.root)

    def key(self, path: Path) -> Path:
        return self.keys.get(path) or self.relative(path).with_suffix("")

    def record(self, name: str, frame: int | None, dets: Detections) -> None:
        height, width = dets.image_size
        boxes, scores = rounded(dets.boxes, BOX_DECIMALS), rounded(dets.scores, SCORE_DECIMALS)
        for box, score, label, class_name in zip(boxes, scores, dets.labels, dets.names, strict=True):
            self.csv_writer.writerow(
                [name, "" if frame is None else frame, int(label), class_name, score, *box, width, height]
            )
        self.per_class.update(dets.names)
        self.per_file[name] = self.per_file.get(name, 0) + len(dets)

    def save_crops(self, image_rgb: np.ndarray, dets: Detections, stem: str) -> None:
        padding = self.options.crop_padding
        padding = float(padding) if isinstance(padding, float) else int(padding)
        height, width = image_rgb.shape[:2]
        for i, (box, class_name) in enumerate(zip(dets.boxes, dets.names, strict=True)):
            left, top, right, bottom = crop_box(box, width, height, padding)
            save_image_rgb(
                self.out_dir / "crops" / class_name / f"{stem}_{i}.jpg", image_rgb[top:bottom, left:right]
            )

    def image(self, path: Path, image_rgb: np.ndarray, dets: Detections) -> None:
        rel, key = self.relative(path), self.key(path)
        self.record(str(rel), None, dets)
        if self.options.save_images:
            # a.jpg -> images/a.jpg (its own name); a.heic -> images/a.jpg, or images/a.heic.jpg beside an a.jpg
            name = rel if rel.suffix.lower() in WRITABLE_EXTS else with_extra_suffix(key, ".jpg")
            save_image_rgb(self.out_dir / "images" / name, draw(image_rgb, dets, self.detector.class_names))
        if self.options.save_labels:
            atomic_write_text(
                self.out_dir / "labels" / with_extra_suffix(key, ".txt"),
                yolo_text(dets, self.options.label_scores),
            )
        if self.options.save_masks and dets.masks is not None:
            save_id_png(self.out_dir / "masks" / with_extra_suffix(key, ".png"), instance_id_image(dets))
        if self.options.save_crops:
            self.save_crops(image_rgb, dets, str(key).replace(os.sep, "__"))

    def video_tracks(self, path: Path | int | str) -> VideoTracks | None:
        """The tracker and track files (tracks/<key>.txt, .csv) of one video; None when infer.track is off."""
        if not self.options.track:
            return None
        settings = TrackerSettings.from_config(self.options.tracker)
        base = self.out_dir / "tracks" / self.key(path)
        return VideoTracks(settings, self.detector.thresholds(), self.detector.class_names, base)

    def video_frame(
        self,
        path: Path | int | str,
        frame_index: int,
        frame_rgb: np.ndarray,
        dets: Detections,
        tracks: VideoTracks | None,
    ) -> np.ndarray:
        annotated = tracks.frame(frame_index, frame_rgb, dets) if tracks is not None else None
        dets = tracks.confident(dets) if tracks is not None else dets  # the tracker's low scores stay out
        rel, key = self.relative(path), self.key(path)
        self.record(str(rel), frame_index, dets)
        self.frames += 1
        stem = f"{str(key).replace(os.sep, '__')}_f{frame_index:06d}"
        if self.options.video_labels:
            label_path = self.out_dir / "labels" / key / f"{frame_index:06d}.txt"
            atomic_write_text(label_path, yolo_text(dets, self.options.label_scores))
        if self.options.save_crops and self.options.video_crops:
            self.save_crops(frame_rgb, dets, stem)
        if annotated is not None:
            return annotated
        return draw(frame_rgb, dets, self.detector.class_names)


def process_images(paths: list[Path], outputs: InferOutputs, conf: Any) -> None:
    detector = outputs.detector
    batch: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        for (path, image), dets in zip(batch, detector.predict([img for _, img in batch], conf), strict=True):
            outputs.image(path, image, dets)
        batch.clear()

    for path in tqdm(paths, desc="images", dynamic_ncols=True, disable=not paths):
        try:
            batch.append((path, read_image_rgb(path)))
        except (ImageReadError, OSError, ValueError) as err:
            logger.warning(f"skipped unreadable image: {err}")
            outputs.failed[str(path)] = str(err)
            continue
        if len(batch) >= detector.max_batch:
            flush()
    if batch:
        flush()


def process_video(path: Path | int | str, outputs: InferOutputs, conf: Any) -> None:
    """Annotate a video, webcam or stream frame by frame (batched by the model's batch size); same fps and
    frame size. A live input runs until it ends or Ctrl-C, and keeps what was written."""
    live = is_live(path)
    try:
        video = open_video(path, display_name(path))
    except VideoReadError as err:
        logger.warning(f"skipped unreadable video: {err}")
        outputs.failed[display_name(path)] = str(err)
        return
    final = outputs.out_dir / "videos" / with_extra_suffix(outputs.key(path), ".mp4")
    writer = (
        VideoOutput([(final, VIDEO_FOURCC)], video.fps, video.size) if outputs.options.save_videos else None
    )
    tracks = outputs.video_tracks(path)
    conf = tracks.detector_conf if tracks is not None else conf  # the tracker uses low scores too
    detector, batch, index = outputs.detector, [], 0

    def flush() -> None:
        nonlocal index
        for frame_rgb, dets in zip(batch, detector.predict(batch, conf), strict=True):
            annotated = outputs.video_frame(path, index, frame_rgb, dets, tracks)
            if writer is not None:
                writer.write(annotated)
            index += 1
        batch.clear()

    try:
        with (
            video,
            tqdm(total=video.total, desc=f"video {outputs.relative(path)}", leave=False) as bar,
            stop_on_ctrl_c(video.name) if live else nullcontext(),  # a file: Ctrl-C stops the whole run
        ):
            for _, frame_rgb in video.frames():
                batch.append(frame_rgb)
                if len(batch) >= detector.max_batch:
                    bar.update(len(batch))
                    flush()
            bar.update(len(batch))
            if batch:
                flush()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if tracks is not None:
            tracks.close()
            outputs.tracks[str(outputs.relative(path))] = len(tracks.tracker.by_id)
    if live:  # a stream that stops sending frames ends like this too: say so, keep what was written
        logger.warning(f"{video.name}: stopped after {index} frames (end of stream, dead stream or Ctrl-C)")
    if writer is not None and index > 0:
        writer.finish()
    elif writer is not None:
        writer.abort()
    if index == 0:
        outputs.failed[display_name(path)] = "no frames"


def input_identity(source: Path | int | str) -> tuple[str, str]:
    """(output folder name, the input as predictions.json records it) of a path, webcam or stream URL."""
    if is_live(source):
        return source_name(source), display_name(source)
    return source.resolve().name or "input", str(source.resolve())


def output_folder(cfg: DictConfig, source: Path | int | str) -> Path:
    """infer/<input name>/ of the experiment; another input of the same name gets <name>-2, -3, ..."""
    infer_dir = Experiment.of(cfg).file("infer")
    name, identity = input_identity(source)
    for n in range(1, 1000):
        folder = infer_dir / (name if n == 1 else f"{name}-{n}")
        summary = folder / SUMMARY
        if not folder.exists() or (summary.exists() and read_json(summary).get("input") == identity):
            return folder
    raise UserError(f"{infer_dir}: too many outputs named {name}; remove some")


def replace_folder(staging: Path, final: Path) -> None:
    """Put a finished run's folder in place of the previous run's outputs of the same input."""
    if final.exists():
        if not (final / SUMMARY).exists():
            raise UserError(
                f"{final} exists and is not an infer output ({SUMMARY} missing): not replacing it"
            )
        old = staging.with_name(staging.name + ".old")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)


def run(cfg: DictConfig) -> dict[str, Any]:
    cfg = stage_config(cfg)
    options = cfg.infer
    source = parse_source(options.input)
    if is_live(source):
        images, videos, root = [], [source], Path.cwd()
    else:
        images, videos, root = find_inputs(source, bool(options.recursive))
    final = output_folder(cfg, source)
    if not is_live(source) and (
        final.resolve().is_relative_to(source.resolve()) or source.resolve().is_relative_to(final.resolve())
    ):
        raise UserError(
            f"infer.input={source} and the output folder {final} overlap: pick an input elsewhere"
        )
    detector = load_experiment_model(cfg, options.model_path, options.precision, options.conf)
    if options.save_masks and detector.meta.task != "segment":
        logger.warning(f"infer.save_masks: {detector.path} is a detection model (no masks): no PNG masks")
    logger.info(f"infer: {len(images)} image(s), {len(videos)} video(s) from {source} -> {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        summary = infer_into(staging, detector, images, videos, root, options)
        replace_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"infer: {summary['detections']} detections -> {final}")
    return summary | {"out_dir": str(final)}


def infer_into(
    out_dir: Path, detector: Detector, images: list[Path], videos: list[Path], root: Path, options: DictConfig
) -> dict[str, Any]:
    """Every output of one run into out_dir; returns the summary (also written as predictions.json)."""
    outputs = InferOutputs(out_dir, detector, root, options, output_keys(images + videos, root))

    def write_rows(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            outputs.csv_writer = csv.writer(handle)
            outputs.csv_writer.writerow(CSV_COLUMNS)
            process_images(images, outputs, None)
            for video in tqdm(videos, desc="videos", dynamic_ncols=True, disable=len(videos) < 2):
                process_video(video, outputs, None)

    atomic_write(out_dir / "predictions.csv", write_rows)
    summary = {
        "model": str(detector.path),
        "backend": detector.backend,
        "task": detector.meta.task,
        "precision": detector.runner.precision,
        "input": input_identity(parse_source(options.input))[1],
        "images": len(images) - sum(1 for f in outputs.failed if Path(f) in set(images)),
        "videos": len(videos),
        "video_frames": outputs.frames,
        "detections": sum(outputs.per_file.values()),
        "per_class": dict(sorted(outputs.per_class.items())),
        "thresholds": dict(
            zip(detector.class_names, rounded(detector.thresholds(), SCORE_DECIMALS), strict=True)
        ),
        "per_file": outputs.per_file,
        "failed": outputs.failed,
    }
    if options.track:
        summary["tracks"] = outputs.tracks
    atomic_write_json(out_dir / SUMMARY, summary)
    if outputs.failed:
        logger.warning(f"{len(outputs.failed)} file(s) could not be read (listed in {SUMMARY} 'failed')")
    return summary


main = stage_main(run)

if __name__ == "__main__":
    main()
