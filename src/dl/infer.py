"""Run a model on a file or a folder of images and videos; write what it found.

    python -m src.dl.infer exp_name=my_run infer.input=path/to/folder_or_file [infer.model_path=...onnx]

Output in output/<exp>/infer/: annotated images (images/), annotated videos (videos/, same fps and size),
YOLO txt predictions (labels/, optionally with a score column), crops per class (crops/<class>/),
predictions.csv (one row per detection) and predictions.json (summary). Folders are searched
recursively, any extension case; unreadable files are reported and skipped. Frames are processed as they
are read (memory stays bounded however long the video).

infer.input may also be a webcam index (0) or a stream URL (rtsp://...): Ctrl-C stops it and keeps what
was written. infer.track=true tracks objects through every video (src.runtime.tracking): ids drawn, and
tracks/<video>.txt (MOT challenge) + tracks/<video>.csv.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from omegaconf import DictConfig
from tqdm import tqdm

from src.common.config import exp_dir, stage_main, with_saved_model_keys
from src.common.draw import draw_detections, save_image_rgb
from src.common.errors import UserError
from src.common.images import ImageReadError, is_image, is_video, list_images, list_videos, read_image_rgb
from src.common.io import atomic_write, atomic_write_json, atomic_write_text
from src.etl.labels import format_yolo_lines
from src.runtime.detector import BOX_DECIMALS, SCORE_DECIMALS, Detections, Detector, rounded
from src.runtime.evaluate import load_experiment_model
from src.runtime.tracking import (
    TrackerSettings,
    VideoTracks,
    is_live,
    open_source,
    parse_source,
    source_name,
    stop_on_ctrl_c,
)

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


def find_inputs(source: Path, recursive: bool = True) -> tuple[list[Path], list[Path], Path]:
    """(images, videos, root the output paths are relative to) for a file or a folder."""
    if not source.exists():
        raise FileNotFoundError(f"infer.input not found: {source}")
    if source.is_file():
        if not (is_image(source) or is_video(source)):
            raise ValueError(f"{source}: not an image or video file (by its extension)")
        return ([source], [], source.parent) if is_image(source) else ([], [source], source.parent)
    return list_images(source, recursive), list_videos(source, recursive), source


def crop_box(box: np.ndarray, width: int, height: int, padding: int | float) -> tuple[int, int, int, int]:
    """Pixel crop around a box with padding: int = pixels, float = fraction of the box's width/height."""
    x1, y1, x2, y2 = (float(v) for v in box)
    pad_x = padding * (x2 - x1) if isinstance(padding, float) else padding
    pad_y = padding * (y2 - y1) if isinstance(padding, float) else padding
    left, top = max(0, int(np.floor(x1 - pad_x))), max(0, int(np.floor(y1 - pad_y)))
    right, bottom = min(width, int(np.ceil(x2 + pad_x))), min(height, int(np.ceil(y2 + pad_y)))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def yolo_text(dets: Detections, with_scores: bool) -> str:
    """YOLO txt lines (normalised cx cy w h) for detections in pixels; optional trailing score column."""
    height, width = dets.image_size
    x1, y1, x2, y2 = dets.boxes.astype(np.float64).T if len(dets) else np.zeros((4, 0))
    boxes = np.stack(
        [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height], 1
    )
    text = format_yolo_lines(dets.labels, boxes)
    if not with_scores:
        return text
    return "".join(
        f"{line} {score:.{SCORE_DECIMALS}f}\n"
        for line, score in zip(text.splitlines(), dets.scores, strict=True)
    )


@dataclass
class InferOutputs:
    """Writes everything for one run; predictions.csv rows are streamed, never held in memory."""

    out_dir: Path
    detector: Detector
    root: Path
    options: DictConfig
    csv_writer: Any = None
    per_class: Counter = field(default_factory=Counter)
    per_file: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    frames: int = 0
    tracks: dict[str, int] = field(default_factory=dict)  # video -> number of track ids

    def relative(self, path: Path) -> Path:
        try:
            return path.relative_to(self.root)
        except ValueError:
            return Path(path.name)

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
        rel = self.relative(path)
        self.record(str(rel), None, dets)
        if self.options.save_images:
            suffix = rel.suffix if rel.suffix.lower() in WRITABLE_EXTS else ".jpg"
            picture = draw_detections(
                image_rgb, dets.boxes, dets.labels, dets.scores, self.detector.class_names
            )
            save_image_rgb(self.out_dir / "images" / rel.with_suffix(suffix), picture)
        if self.options.save_labels:
            atomic_write_text(
                self.out_dir / "labels" / rel.with_suffix(".txt"), yolo_text(dets, self.options.label_scores)
            )
        if self.options.save_crops:
            self.save_crops(image_rgb, dets, str(rel.with_suffix("")).replace(os.sep, "__"))

    def video_tracks(self, rel: Path) -> VideoTracks | None:
        """The tracker and track files of one video (None when infer.track is off)."""
        if not self.options.track:
            return None
        settings = TrackerSettings.from_config(self.options.tracker)
        base = self.out_dir / "tracks" / rel.with_suffix("")
        return VideoTracks(settings, self.detector.thresholds(), self.detector.class_names, base)

    def video_frame(
        self, rel: Path, frame_index: int, frame_rgb: np.ndarray, dets: Detections, tracks: VideoTracks | None
    ) -> np.ndarray:
        annotated = tracks.frame(frame_index, frame_rgb, dets) if tracks is not None else None
        dets = tracks.confident(dets) if tracks is not None else dets
        self.record(str(rel), frame_index, dets)
        self.frames += 1
        stem = f"{str(rel.with_suffix('')).replace(os.sep, '__')}_f{frame_index:06d}"
        if self.options.video_labels:
            label_path = self.out_dir / "labels" / rel.with_suffix("") / f"{frame_index:06d}.txt"
            atomic_write_text(label_path, yolo_text(dets, self.options.label_scores))
        if self.options.save_crops and self.options.video_crops:
            self.save_crops(frame_rgb, dets, stem)
        if annotated is not None:
            return annotated
        return draw_detections(frame_rgb, dets.boxes, dets.labels, dets.scores, self.detector.class_names)


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


def process_video(source: Path | int | str, outputs: InferOutputs, conf: Any) -> None:
    """Annotate a video file, webcam or stream frame by frame (batched by the model's batch size); same fps
    and frame size. A live input runs until it ends or Ctrl-C, and keeps what was written."""
    import cv2

    live = is_live(source)
    try:
        video = open_source(source)
    except UserError as err:
        logger.warning(f"skipped: {err}")
        outputs.failed[str(source)] = str(err)
        return
    rel = Path(source_name(source)) if live else outputs.relative(source)
    final = outputs.out_dir / "videos" / rel.with_suffix(".mp4")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp.mp4")  # cv2 picks the container from the suffix
    writer = (
        cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), video.fps, video.size)
        if outputs.options.save_videos
        else None
    )
    if writer is not None and not writer.isOpened():
        video.close()
        raise RuntimeError(f"OpenCV cannot write an mp4v video to {tmp} (codec unavailable?)")
    tracks = outputs.video_tracks(rel)
    conf = tracks.detector_conf if tracks is not None else conf  # the tracker uses low scores too
    detector, batch, index = outputs.detector, [], 0

    def flush() -> None:
        nonlocal index
        for frame_rgb, dets in zip(batch, detector.predict(batch, conf), strict=True):
            annotated = outputs.video_frame(rel, index, frame_rgb, dets, tracks)
            if writer is not None:
                writer.write(np.ascontiguousarray(annotated[..., ::-1]))
            index += 1
        batch.clear()

    try:
        with (
            tqdm(total=video.total, desc=f"video {rel}", dynamic_ncols=True, leave=False) as bar,
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
    finally:
        video.close()
        if writer is not None:
            writer.release()  # also after Ctrl-C or an error: the mp4 is finalised, hence playable
        if tracks is not None:
            tracks.close()
            outputs.tracks[str(rel)] = len(tracks.tracker.by_id)
    if writer is not None and index > 0:
        os.replace(tmp, final)
    elif writer is not None:
        tmp.unlink(missing_ok=True)
    if index == 0:
        outputs.failed[str(source)] = "no frames"


def run(cfg: DictConfig) -> dict[str, Any]:
    cfg = with_saved_model_keys(cfg)
    options = cfg.infer
    detector = load_experiment_model(cfg, options.model_path, options.precision, options.conf)
    source = parse_source(options.input)
    if is_live(source):
        images, videos, root = [], [source], Path.cwd()
    else:
        images, videos, root = find_inputs(source, bool(options.recursive))
    logger.info(f"infer: {len(images)} image(s), {len(videos)} video(s) from {options.input}")
    out_dir = exp_dir(cfg) / "infer"
    outputs = InferOutputs(out_dir, detector, root, options)

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
        "precision": detector.runner.precision,
        "input": str(options.input),
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
    atomic_write_json(out_dir / "predictions.json", summary)
    if outputs.failed:
        logger.warning(
            f"{len(outputs.failed)} file(s) could not be read (listed in predictions.json 'failed')"
        )
    logger.info(f"infer: {summary['detections']} detections -> {out_dir}")
    return summary


main = stage_main(run)

if __name__ == "__main__":
    main()
