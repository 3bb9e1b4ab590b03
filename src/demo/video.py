"""The demo's videos: detection frame by frame (one frame in memory at a time), optionally tracked
(ByteTrack, src/runtime/tracking, as `dl.infer` does with infer.track), masks drawn for segmentation models,
and the files written for download (annotated .mp4 + a WebM the page plays, per-frame predictions.json and
YOLO txt labels, the track files).
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from src.common.images import VIDEO_EXTS, is_video
from src.common.io import atomic_write
from src.common.video import VideoOutput, VideoReadError, open_video
from src.demo.processing import (
    MAX_TABLE_ROWS,
    Results,
    annotate,
    class_thresholds,
    file_path,
    make_table,
    model_summary,
    table_rows,
)
from src.dl.infer import yolo_text
from src.runtime import Detections, Detector
from src.runtime.evaluate import select_detections
from src.runtime.tracking import TrackerSettings, VideoTracks

PREVIEW_FOURCC = "VP80"  # browsers play VP8 WebM; OpenCV's wheels have no H.264 encoder
DOWNLOAD_FOURCC = "mp4v"  # the annotated .mp4 offered for download (same as src.dl.infer)


@dataclass
class VideoLimits:
    max_frames: int | None = None  # None / 0: no limit
    max_seconds: float | None = None

    def frame_cap(self, fps: float) -> int | None:
        caps = [int(self.max_frames)] if self.max_frames else []
        if self.max_seconds:
            caps.append(max(1, int(round(float(self.max_seconds) * fps))))
        return min(caps) if caps else None


@dataclass
class Frame:
    """One processed frame: the detections at or above the thresholds (what the table, labels and json
    hold), their track ids ((N,), -1 = not (yet) tracked; None without tracking) and the picture shown."""

    dets: Detections
    track_ids: np.ndarray | None
    picture: np.ndarray


class FrameDetector:
    """Detection of one video's frames, tracked when `tracker` settings are given.

    thresholds: {class id: threshold} (+inf: class hidden). With tracking the detector runs down to the
    tracker's low threshold (ByteTrack continues tracks with low-score detections, e.g. partly occluded
    objects) and the tracked boxes are drawn, as in `dl.infer`; hidden classes stay out entirely."""

    def __init__(
        self,
        detector: Detector,
        thresholds: dict[int, float],
        tracker: TrackerSettings | None,
        tracks_base: Path,
    ):
        self.detector, self.names = detector, detector.class_names
        self.thresholds = np.array([thresholds[i] for i in range(len(self.names))], np.float32)  # (C,)
        self.tracks = (
            None if tracker is None else VideoTracks(tracker, self.thresholds, self.names, tracks_base)
        )
        self.conf = thresholds
        if self.tracks is not None:
            low = self.tracks.detector_conf
            self.conf = {
                i: min(value, low) if np.isfinite(value) else value for i, value in thresholds.items()
            }

    def __call__(self, index: int, frame: np.ndarray) -> Frame:
        dets = self.detector.predict([frame], self.conf)[0]
        if self.tracks is None:
            return Frame(dets, None, annotate(frame, dets, self.names))
        ids, voted = self.tracks.update(index, dets)  # (N,) each
        tracked = np.flatnonzero(ids >= 0)
        picture = annotate(frame, select_detections(dets, tracked), self.names, ids[tracked], voted[tracked])
        confident = np.flatnonzero(dets.scores >= self.thresholds[dets.labels])
        return Frame(select_detections(dets, confident), ids[confident], picture)

    def files(self) -> list[Path]:
        """Close the track files (kept after an error too) -> [MOT txt, CSV]; [] without tracking."""
        return [] if self.tracks is None else list(self.tracks.close())

    def note(self, name: str) -> list[str]:
        return [] if self.tracks is None else [f"{name}: {len(self.tracks.tracker.by_id)} track(s)"]


def predict_video(
    detector: Detector,
    video: Any,
    conf: float | dict | None = None,
    classes: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    limits: VideoLimits | None = None,
    label_scores: bool = False,
    tracker: TrackerSettings | None = None,
) -> Results:
    """Detect frame by frame (one frame in memory at a time); write the annotated video (.mp4 to download,
    .webm to play in the page), <stem>_predictions.json (per frame) and <stem>_labels.zip (YOLO txt per frame).
    tracker: track objects (ids drawn and in the table; tracks/<stem>.txt (MOT) and .csv to download).

    Raises VideoReadError for a file that cannot be decoded. Frames past `limits` are not processed
    (a note says so)."""
    path = file_path(video)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="dfine_demo_"))
    if not is_video(path):
        raise VideoReadError(f"{path.name}: not a supported video ({', '.join(sorted(VIDEO_EXTS))})")
    video = open_video(path, path.name)
    fps, size, total = video.fps, video.size, video.total
    cap = (limits or VideoLimits()).frame_cap(fps)
    thresholds = class_thresholds(detector, conf, classes)
    frames_of = FrameDetector(detector, thresholds, tracker, out / "tracks" / path.stem)
    results, rows = Results(), []
    mp4, webm = out / "videos" / f"{path.stem}.mp4", out / "videos" / f"{path.stem}.webm"
    predictions, labels_zip = out / f"{path.stem}_predictions.json", out / f"{path.stem}_labels.zip"

    def stream(json_tmp: Path, zip_tmp: Path) -> int:
        """Every frame through the model into the writers; returns the frame count."""
        frames = 0
        writers = VideoOutput([(mp4, DOWNLOAD_FOURCC), (webm, PREVIEW_FOURCC)], fps, size)
        try:
            with open(json_tmp, "w", encoding="utf-8") as handle, zipfile.ZipFile(zip_tmp, "w") as labels:
                header = {**model_summary(detector, thresholds), "video": path.name, "fps": fps}
                handle.write(json.dumps(header)[:-1] + ', "frames": [\n')  # the frames follow, streamed
                for index, image in video.frames(cap):
                    frame = frames_of(index, image)
                    writers.write(frame.picture)
                    labels.writestr(f"{path.stem}/{index:06d}.txt", yolo_text(frame.dets, label_scores))
                    handle.write((",\n" if index else "") + json.dumps(frame_record(index, frame)))
                    if len(rows) < MAX_TABLE_ROWS:
                        rows.extend(table_rows(path.name, index, frame.dets, frame.track_ids))
                    results.detections += len(frame.dets)
                    frames += 1
                handle.write("\n]}\n")
        except BaseException:
            writers.abort()
            raise
        writers.finish()
        return frames

    counted: list[int] = []
    try:  # predictions.json and the labels zip appear only when complete (atomic_write)
        atomic_write(
            predictions,
            lambda json_tmp: atomic_write(
                labels_zip, lambda zip_tmp: counted.append(stream(json_tmp, zip_tmp))
            ),
        )
    finally:
        video.close()
        track_files = frames_of.files()
    frames = counted[0]
    if frames == 0:
        raise VideoReadError(f"{path.name}: no frame could be decoded")
    if cap is not None and (total is None or total > cap) and frames == cap:
        results.notes.append(f"{path.name}: processed the first {frames} frames only (demo_ui limits)")
    results.notes += frames_of.note(path.name)
    results.table = make_table(rows)
    results.video = str(webm)
    results.downloads = [str(mp4), str(predictions), str(labels_zip), *map(str, track_files)]
    return results


def frame_record(index: int, frame: Frame) -> dict[str, Any]:
    """One frame's entry in <stem>_predictions.json (track_ids: null where a detection has no track yet)."""
    record = {"frame": index, **frame.dets.to_dict()}
    if frame.track_ids is not None:
        record["track_ids"] = [int(i) if i >= 0 else None for i in frame.track_ids]
    return record
