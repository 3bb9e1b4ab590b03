"""The one video read/write implementation (src.dl.infer and the demo): RGB frames in, annotated frames out.

    with open_video(path) as video:                       # VideoReadError names the file
        writer = VideoOutput([(out_mp4, "mp4v")], video.fps, video.size)
        for index, frame_rgb in video.frames(cap=None):   # one frame in memory at a time
            writer.write(annotate(frame_rgb))
        writer.finish()                                   # temp files renamed to their final names

Writers write to temp names beside the final files (cv2 picks the container from the suffix), so a
half-written video never takes a final name; abort() removes the temp files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_FPS = 25.0  # when the container does not say


class VideoReadError(ValueError):
    """A video that cannot be opened or decoded (the message names the file)."""


@dataclass
class VideoInput:
    """An open video: fps, size (width, height), frame count (None when the container does not say)."""

    capture: object  # cv2.VideoCapture
    path: Path | int | str  # a file, a webcam index or a stream URL
    name: str  # what messages call it
    fps: float
    size: tuple[int, int]
    total: int | None

    def frames(self, cap: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(index, RGB uint8 (H, W, 3) frame) one at a time, at most `cap` frames (None: all)."""
        index = 0
        while cap is None or index < cap:
            ok, frame = self.capture.read()
            if not ok:
                return
            yield index, np.ascontiguousarray(frame[..., ::-1])
            index += 1

    def close(self) -> None:
        self.capture.release()

    def __enter__(self) -> VideoInput:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def open_video(path: str | Path | int, name: str | None = None) -> VideoInput:
    """Open a video file (or a webcam index / stream URL); VideoReadError (naming `name`, default the
    source) when it has no video stream."""
    import cv2

    path = path if isinstance(path, int) or "://" in str(path) else Path(path)
    name = name or str(path)
    capture = cv2.VideoCapture(path if isinstance(path, int) else str(path))
    if not capture.isOpened():
        capture.release()
        raise VideoReadError(f"{name}: cannot open the video (unknown format or corrupt file)")
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if width <= 0 or height <= 0:
        capture.release()
        raise VideoReadError(f"{name}: no video stream found")
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else DEFAULT_FPS
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    return VideoInput(capture, path, name, fps, (width, height), total if total and total > 0 else None)


class VideoOutput:
    """One or more videos of the same frames (e.g. an .mp4 to download and a .webm to play in a page)."""

    def __init__(self, targets: Sequence[tuple[Path, str]], fps: float, size: tuple[int, int]):
        """targets: (final path, fourcc) pairs; size: (width, height) of every frame written."""
        import cv2

        self.finals = [Path(path) for path, _ in targets]
        self.temps = [p.with_name(f".{p.stem}.tmp{p.suffix}") for p in self.finals]
        for path in self.finals:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.writers = [
            cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), fps, size)
            for tmp, (_, fourcc) in zip(self.temps, targets, strict=True)
        ]
        if not all(w.isOpened() for w in self.writers):
            self.abort()
            codecs = ", ".join(f"{fourcc} {Path(p).suffix}" for p, fourcc in targets)
            raise RuntimeError(f"OpenCV cannot write {codecs} videos here (codec unavailable?)")

    def write(self, frame_rgb: np.ndarray) -> None:
        frame_bgr = np.ascontiguousarray(frame_rgb[..., ::-1])
        for writer in self.writers:
            writer.write(frame_bgr)

    def release(self) -> None:
        for writer in self.writers:
            writer.release()

    def finish(self) -> list[Path]:
        """Close the files and give them their final names."""
        self.release()
        for tmp, final in zip(self.temps, self.finals, strict=True):
            os.replace(tmp, final)
        return self.finals

    def abort(self) -> None:
        """Close and remove the temp files (a failed run leaves no half video behind)."""
        self.release()
        for tmp in self.temps:
            tmp.unlink(missing_ok=True)
