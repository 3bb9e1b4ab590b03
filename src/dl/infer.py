"""Run a model on a file or a folder of images and videos; write what it found.

    python -m src.dl.infer exp_name=my_run infer.input=path/to/folder_or_file [infer.model_path=...onnx]

Output in output/<exp>/infer/<input name>/: annotated images (images/), annotated videos (videos/, same fps
and size), YOLO txt predictions (labels/, optionally with a score column), crops per class (crops/<class>/),
predictions.csv (one row per detection) and predictions.json (summary). Every output is named after its
input's path relative to the input folder by one rule (src/runtime/outputs.py, OutputNames): sub/a.jpg ->
labels/sub/a.txt; when two inputs share a stem (a.jpg, a.png) their outputs keep the extension
(labels/a.jpg.txt, labels/a.png.txt); a video's frame labels and crops lie in <video>_frames/. No two
inputs ever share an output file.

A segmentation model's masks are drawn under the boxes, its label lines are YOLO-seg polygons (a detection
whose mask is empty keeps its box line), and infer.save_masks writes masks/<image>.png: one instance-id PNG
per image (0 = background, i = the i-th detection of the image's label file and predictions.csv rows;
uint16 when more than 255).

A run is written into a temp folder and then replaces exactly the files the previous run of the same input
wrote (listed in written.txt, src/dl/stage_outputs.py): no stale file of an earlier run stays mixed in, a
file the stage did not write stays (the log names it), outputs of other inputs are untouched, and the
inputs themselves are never written to. Folders are searched recursively, any extension case; unreadable
files are reported and skipped ("failed"). A video whose decoder stops before the frame count its container
announces (a cut or corrupt file) is kept as far as it was read, with a warning, and listed as "partial".
Frames are processed as they are read (memory stays bounded).

infer.input may also be a webcam index (0) or a stream URL (rtsp://...): Ctrl-C stops it and keeps what
was written. infer.track=true tracks objects through every video (src.runtime.tracking): ids drawn, and
tracks/<video>.txt (MOT challenge) + tracks/<video>.csv.
"""

from __future__ import annotations

import csv
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from omegaconf import DictConfig
from tqdm import tqdm

from src.common.config import stage_main
from src.common.draw import save_image_rgb
from src.common.errors import UserError
from src.common.experiment import Experiment, stage_config
from src.common.images import is_image, is_video, list_images, list_videos
from src.common.io import atomic_write, atomic_write_json, atomic_write_text, read_json
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
from src.dl.artifacts import load_experiment_model
from src.dl.stage_outputs import StagedOutputs
from src.runtime.detector import BOX_DECIMALS, SCORE_DECIMALS, Detections, Detector, read_each, rounded
from src.runtime.outputs import OutputNames, crops, draw, instance_id_image, save_id_png, yolo_text
from src.runtime.tracking import AnnotatedFrame, TrackerSettings, VideoTracks, annotated_frames

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
VIDEO_FOURCC = "mp4v"  # annotated videos: .mp4 (OpenCV's wheels have no H.264 encoder)
SUMMARY = "predictions.json"  # marks a folder as an infer output (only such folders are ever written to)


def find_inputs(source: Path, recursive: bool = True) -> tuple[list[Path], list[Path], Path]:
    """(images, videos, root the output paths are relative to) for a file or a folder."""
    if not source.exists():
        raise UserError(f"infer.input not found: {source}")
    if source.is_file():
        if not (is_image(source) or is_video(source)):
            raise UserError(f"infer.input={source}: not an image or video file (by its extension)")
        return ([source], [], source.parent) if is_image(source) else ([], [source], source.parent)
    return list_images(source, recursive), list_videos(source, recursive), source


def relative_to(path: Path | int | str, root: Path) -> Path:
    if is_live(path):  # a webcam index or stream URL: its file-name-safe name
        return Path(source_name(path))
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


@dataclass
class InferOutputs:
    """Writes everything for one run; predictions.csv rows are streamed, never held in memory."""

    out_dir: Path
    detector: Detector
    root: Path
    options: DictConfig
    names: OutputNames
    csv_writer: Any = None
    per_class: Counter = field(default_factory=Counter)
    per_file: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)  # videos read only in part -> what was read
    frames: int = 0
    tracks: dict[str, int] = field(default_factory=dict)  # video -> number of track ids

    def relative(self, path: Path | int | str) -> Path:
        return relative_to(path, self.root)

    def path_of(self, name) -> Path:
        """Where an output name (OutputNames) lies in this run's folder."""
        return self.out_dir / name

    def record(self, name: str, frame: int | None, dets: Detections) -> None:
        height, width = dets.image_size
        boxes, scores = rounded(dets.boxes, BOX_DECIMALS), rounded(dets.scores, SCORE_DECIMALS)
        for box, score, label, class_name in zip(boxes, scores, dets.labels, dets.names, strict=True):
            self.csv_writer.writerow(
                [name, "" if frame is None else frame, int(label), class_name, score, *box, width, height]
            )
        self.per_class.update(dets.names)
        self.per_file[name] = self.per_file.get(name, 0) + len(dets)

    def save_crops(self, image_rgb, dets: Detections, rel: Path, frame: int | None = None) -> None:
        padding = self.options.crop_padding
        padding = float(padding) if isinstance(padding, float) else int(padding)
        for index, (crop, class_name) in enumerate(zip(crops(image_rgb, dets, padding), dets.names)):
            save_image_rgb(self.path_of(self.names.crop(rel, class_name, index, frame)), crop)

    def image(self, path: Path, image_rgb, dets: Detections) -> None:
        rel = self.relative(path)
        self.record(rel.as_posix(), None, dets)
        if self.options.save_images:
            picture = draw(image_rgb, dets, self.detector.class_names)
            save_image_rgb(self.path_of(self.names.drawing(rel)), picture)
        if self.options.save_labels:
            atomic_write_text(self.path_of(self.names.label(rel)), yolo_text(dets, self.options.label_scores))
        if self.options.save_masks and dets.masks is not None:
            save_id_png(self.path_of(self.names.mask(rel)), instance_id_image(dets))
        if self.options.save_crops:
            self.save_crops(image_rgb, dets, rel)

    def video_tracks(self, path: Path | int | str) -> VideoTracks | None:
        """The tracker and track files (tracks/<key>.txt, .csv) of one video; None when infer.track is off."""
        if not self.options.track:
            return None
        settings = TrackerSettings.from_config(self.options.tracker)
        base = self.path_of(self.names.tracks(self.relative(path)))
        return VideoTracks(settings, self.detector.thresholds(), self.detector.class_names, base)

    def video_frame(self, path: Path | int | str, frame: AnnotatedFrame) -> None:
        rel = self.relative(path)
        self.record(rel.as_posix(), frame.index, frame.dets)
        self.frames += 1
        if self.options.video_labels:
            label_path = self.path_of(self.names.frame_label(rel, frame.index))
            atomic_write_text(label_path, yolo_text(frame.dets, self.options.label_scores))
        if self.options.save_crops and self.options.video_crops:
            self.save_crops(frame.image, frame.dets, rel, frame.index)


def process_images(paths: list[Path], outputs: InferOutputs) -> None:
    """Every readable image through the model (batched by the model's batch size) into the outputs."""

    def failed(path: Path, err: Exception) -> None:
        outputs.failed[str(path)] = str(err)

    progress = tqdm(paths, desc="images", dynamic_ncols=True, disable=not paths)
    for path, image, dets in outputs.detector.stream(read_each(progress, on_error=failed)):
        outputs.image(path, image, dets)


def process_video(path: Path | int | str, outputs: InferOutputs) -> None:
    """Annotate a video, webcam or stream frame by frame (batched by the model's batch size); same fps and
    frame size. A live input runs until it ends or Ctrl-C, and keeps what was written. A file that stops
    early (fewer frames than its container says) keeps its frames so far and is listed as partial."""
    live = is_live(path)
    try:
        video = open_video(path, display_name(path))
    except VideoReadError as err:
        logger.warning(f"skipped unreadable video: {err}")
        outputs.failed[display_name(path)] = str(err)
        return
    final = outputs.path_of(outputs.names.video(outputs.relative(path)))
    writer = (
        VideoOutput([(final, VIDEO_FOURCC)], video.fps, video.size) if outputs.options.save_videos else None
    )
    tracks = outputs.video_tracks(path)
    read = 0
    try:
        with (
            video,
            tqdm(total=video.total, desc=f"video {outputs.relative(path)}", leave=False) as bar,
            stop_on_ctrl_c(video.name) if live else nullcontext(),  # a file: Ctrl-C stops the whole run
        ):
            thresholds = outputs.detector.thresholds()
            for frame in annotated_frames(outputs.detector, video.frames(), thresholds, tracks):
                outputs.video_frame(path, frame)
                if writer is not None:
                    writer.write(frame.picture)
                read += 1
                bar.update(1)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if tracks is not None:
            tracks.close()
            outputs.tracks[outputs.relative(path).as_posix()] = len(tracks.tracker.by_id)
    finish_video(path, video, read, writer, outputs)


def finish_video(path, video, read: int, writer: VideoOutput | None, outputs: InferOutputs) -> None:
    """Keep the annotated video when a frame was read; say how the input ended (failed, partial, live)."""
    if writer is not None and read > 0:
        writer.finish()
    elif writer is not None:
        writer.abort()
    name = display_name(path)
    if read == 0:
        outputs.failed[name] = "no frames"
    elif is_live(
        path
    ):  # a stream that stops sending frames ends like this too: say so, keep what was written
        logger.warning(f"{video.name}: stopped after {read} frames (end of stream, dead stream or Ctrl-C)")
    elif video.missing_frames(read):
        outputs.partial[name] = f"read {read} of the {video.total} frames its container announces"
        logger.warning(f"{video.name}: only {read} of {video.total} frames could be read (cut or corrupt?)")


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
    with StagedOutputs(final, "infer", legacy_mark=SUMMARY) as staging:
        summary = infer_into(staging.path, detector, images, videos, root, options)
        staging.commit()
    logger.info(f"infer: {summary['detections']} detections -> {final}")
    return summary | {"out_dir": str(final)}


def infer_into(
    out_dir: Path, detector: Detector, images: list[Path], videos: list[Path], root: Path, options: DictConfig
) -> dict[str, Any]:
    """Every output of one run into out_dir; returns the summary (also written as predictions.json)."""
    names = OutputNames(relative_to(path, root) for path in images + videos)
    outputs = InferOutputs(out_dir, detector, root, options, names)

    def write_rows(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            outputs.csv_writer = csv.writer(handle)
            outputs.csv_writer.writerow(CSV_COLUMNS)
            process_images(images, outputs)
            for video in tqdm(videos, desc="videos", dynamic_ncols=True, disable=len(videos) < 2):
                process_video(video, outputs)

    atomic_write(out_dir / "predictions.csv", write_rows)
    summary = run_summary(outputs, images, videos, options)
    atomic_write_json(out_dir / SUMMARY, summary)
    if outputs.failed or outputs.partial:
        logger.warning(
            f"{len(outputs.failed)} file(s) could not be read, {len(outputs.partial)} video(s) only in part "
            f"(listed in {SUMMARY} 'failed' and 'partial')"
        )
    return summary


def run_summary(outputs: InferOutputs, images: list[Path], videos: list, options: DictConfig) -> dict:
    """predictions.json: what ran, and how many inputs were done, done in part (videos) or failed."""
    detector = outputs.detector
    failed_images = sum(1 for path in images if str(path) in outputs.failed)
    failed_videos = sum(1 for video in videos if display_name(video) in outputs.failed)
    summary = {
        "model": str(detector.path),
        "backend": detector.backend,
        "task": detector.meta.task,
        "precision": detector.runner.precision,
        "input": input_identity(parse_source(options.input))[1],
        "images": len(images) - failed_images,
        "failed_images": failed_images,
        "videos": len(videos) - failed_videos - len(outputs.partial),  # every frame read
        "partial_videos": len(outputs.partial),
        "failed_videos": failed_videos,
        "video_frames": outputs.frames,
        "detections": sum(outputs.per_file.values()),
        "per_class": dict(sorted(outputs.per_class.items())),
        "thresholds": dict(
            zip(detector.class_names, rounded(detector.thresholds(), SCORE_DECIMALS), strict=True)
        ),
        "per_file": outputs.per_file,
        "failed": outputs.failed,
        "partial": outputs.partial,
    }
    if options.track:
        summary["tracks"] = outputs.tracks
    return summary


main = stage_main(run)

if __name__ == "__main__":
    main()
