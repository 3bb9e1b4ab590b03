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
from src.common.video import VideoInput, VideoOutput, VideoReadError, open_video
from src.demo.processing import (
    MAX_TABLE_ROWS,
    Results,
    class_thresholds,
    file_path,
    make_table,
    model_summary,
    table_rows,
)
from src.runtime import Detector
from src.runtime.outputs import OutputNames, yolo_text
from src.runtime.tracking import AnnotatedFrame, TrackerSettings, VideoTracks, annotated_frames

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
    fps, size = video.fps, video.size
    cap = (limits or VideoLimits()).frame_cap(fps)
    per_class = class_thresholds(detector, conf, classes)
    thresholds = np.array([per_class[i] for i in range(len(detector.class_names))], np.float32)  # (C,)
    names = OutputNames([path.name])
    tracks = None
    if tracker is not None:
        tracks = VideoTracks(tracker, thresholds, detector.class_names, out / names.tracks(path.name))
    results, rows = Results(), []
    mp4, webm = out / names.video(path.name), out / names.in_folder("videos", path.name, ".webm")
    predictions = out / names.in_folder(".", path.name, "_predictions.json")
    labels_zip = out / names.in_folder(".", path.name, "_labels.zip")

    def stream(json_tmp: Path, zip_tmp: Path) -> int:
        """Every frame through the model into the writers; returns the frame count."""
        frames = 0
        writers = VideoOutput([(mp4, DOWNLOAD_FOURCC), (webm, PREVIEW_FOURCC)], fps, size)
        try:
            with open(json_tmp, "w", encoding="utf-8") as handle, zipfile.ZipFile(zip_tmp, "w") as labels:
                header = {**model_summary(detector, per_class), "video": path.name, "fps": fps}
                handle.write(json.dumps(header)[:-1] + ', "frames": [\n')  # the frames follow, streamed
                for frame in annotated_frames(detector, video.frames(cap), thresholds, tracks):
                    writers.write(frame.picture)
                    labels.writestr(f"{path.stem}/{frame.index:06d}.txt", yolo_text(frame.dets, label_scores))
                    handle.write((",\n" if frame.index else "") + json.dumps(frame_record(frame)))
                    if len(rows) < MAX_TABLE_ROWS:
                        rows.extend(table_rows(path.name, frame.index, frame.dets, frame.track_ids))
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
        track_files = [] if tracks is None else list(tracks.close())
    frames = counted[0]
    if frames == 0:
        raise VideoReadError(f"{path.name}: no frame could be decoded")
    results.notes += video_notes(path.name, video, frames, cap, tracks)
    results.table = make_table(rows)
    results.video = str(webm)
    results.downloads = [str(mp4), str(predictions), str(labels_zip), *map(str, track_files)]
    return results


def video_notes(name: str, video: VideoInput, frames: int, cap: int | None, tracks) -> list[str]:
    """What the page says about how a video was processed: cut at the demo's limit, read only in part (a
    corrupt or cut file), how many tracks."""
    notes = []
    if cap is not None and frames == cap and (video.total is None or video.total > cap):
        notes.append(f"{name}: processed the first {frames} frames only (demo_ui limits)")
    elif missing := video.missing_frames(frames):
        notes.append(f"{name}: {missing} of its {video.total} frames could not be read (cut or corrupt?)")
    if tracks is not None:
        notes.append(f"{name}: {len(tracks.tracker.by_id)} track(s)")
    return notes


def frame_record(frame: AnnotatedFrame) -> dict[str, Any]:
    """One frame's entry in <stem>_predictions.json (track_ids: null where a detection has no track yet)."""
    record = {"frame": frame.index, **frame.dets.to_dict()}
    if frame.track_ids is not None:
        record["track_ids"] = [int(i) if i >= 0 else None for i in frame.track_ids]
    return record
