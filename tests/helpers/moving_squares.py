"""A small video of squares moving in straight lines over a grey background, with the detections a
perfect detector gives for each frame, and the live-input loop of video inference over it: for the tests of
tracking and video inputs (tracking quality itself is measured by benchmarks/tracking.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from src.common.video import display_name, open_video, stop_on_ctrl_c
from src.runtime.detector import Detections
from src.runtime.tracking import TrackerSettings, VideoTracks

NAMES = ["circle", "square", "triangle", "star"]
THRESHOLDS = np.full(len(NAMES), 0.5, np.float32)
SETTINGS = TrackerSettings(
    low_conf=0.1, match_iou=0.2, low_match_iou=0.5, confirm_frames=2, max_lost_frames=30
)
SIDE = 24


@dataclass
class Squares:
    frames: list[np.ndarray]  # per frame (H, W, 3) BGR uint8
    boxes: list[np.ndarray]  # per frame (O, 4) xyxy float32, the squares' true boxes
    labels: np.ndarray  # (O,) class ids


def moving_squares(
    frames: int, objects: int = 3, seed: int = 0, size: tuple[int, int] = (160, 120)
) -> Squares:
    """`objects` squares of SIDE px starting at random places with random velocities (1-3 px a frame),
    wrapping around at the borders; size (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    start = rng.uniform([0, 0], [width - SIDE, height - SIDE], (objects, 2))
    velocity = rng.uniform(1, 3, (objects, 2)) * rng.choice([-1, 1], (objects, 2))
    labels = np.arange(objects) % len(NAMES)
    squares = Squares([], [], labels)
    for index in range(frames):
        corner = np.mod(start + index * velocity, [width - SIDE, height - SIDE])  # (O, 2)
        boxes = np.concatenate([corner, corner + SIDE], 1).astype(np.float32)
        frame = np.full((height, width, 3), 90, np.uint8)
        for x1, y1, x2, y2 in boxes.round().astype(int):
            cv2.rectangle(frame, (x1, y1), (x2, y2), (255, 255, 255), -1)
        squares.frames.append(frame)
        squares.boxes.append(boxes)
    return squares


def detections_at(squares: Squares, index: int) -> Detections:
    boxes = squares.boxes[index]
    return Detections(
        boxes, np.full(len(boxes), 0.9, np.float32), squares.labels.astype(np.int64),
        [NAMES[i] for i in squares.labels], squares.frames[index].shape[:2],
    )  # fmt: skip


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    height, width = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def track_to_files(source, out: Path, squares: Squares, stop_at: int | None = None, pace: float = 0.0) -> int:
    """The live-input loop of video inference with the squares' boxes as the detector: read frames, track,
    draw, write the annotated video and the track files; Ctrl-C before frame `stop_at`. pace: seconds
    per frame (a live camera's rate), each frame index printed. Returns the number of frames written."""
    written = 0
    with (
        open_video(source, display_name(source)) as video,
        VideoTracks(SETTINGS, THRESHOLDS, NAMES, out / "clip") as tracks,
    ):
        writer = cv2.VideoWriter(
            str(out / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), video.fps, video.size
        )
        try:
            with stop_on_ctrl_c(video.name):
                for index, frame_rgb in video.frames():
                    if index == stop_at:
                        # What Python's SIGINT handler raises. Not a real signal in the shared test process:
                        # after the training/export tests one killed it with SIGSEGV (see the subprocess test).
                        raise KeyboardInterrupt
                    annotated = tracks.frame(index, frame_rgb, detections_at(squares, index)).picture
                    writer.write(np.ascontiguousarray(annotated[..., ::-1]))
                    written += 1
                    if pace:
                        print(f"frame {index}", flush=True)
                        time.sleep(pace)
        finally:
            writer.release()
    return written
