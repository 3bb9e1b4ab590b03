"""The one video read/write implementation (src.dl.infer and the demo): RGB frames in, annotated frames out.

    with open_video(path) as video:                       # VideoReadError names the file
        writer = VideoOutput([(out_mp4, "mp4v")], video.fps, video.size)
        for index, frame_rgb in video.frames(cap=None):   # one frame in memory at a time
            writer.write(annotate(frame_rgb))
        writer.finish()                                   # temp files renamed to their final names
        video.missing_frames(index + 1)                   # > 0: the video is cut or corrupt midway

Writers write to temp names beside the final files (cv2 picks the container from the suffix), so a
half-written video never takes a final name; abort() removes the temp files.

Live inputs: `source = parse_source("0")` (webcam 0; "rtsp://cam/live" a URL; anything else a path), then
open_video(source, display_name(source)); `with stop_on_ctrl_c(name): <frame loop>` ends the loop on Ctrl-C
so that the outputs are finished, not aborted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from loguru import logger

DEFAULT_FPS = 25.0  # when the container does not say
# A container's frame count is an estimate for some formats (from its duration and fps): fewer frames read
# than it says is a cut or corrupt video only past this slack (frames, or a share of the count if larger).
FRAME_COUNT_SLACK = 2
FRAME_COUNT_SLACK_SHARE = 0.01


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

    def missing_frames(self, read: int) -> int:
        """How many of the frames the container announces were not read (0 within the slack, or when it
        announces none: a live input). A decoder stops quietly at a corrupt frame: this is how it shows."""
        if self.total is None:
            return 0
        missing = self.total - read
        slack = max(FRAME_COUNT_SLACK, FRAME_COUNT_SLACK_SHARE * self.total)
        return missing if missing > slack else 0

    def close(self) -> None:
        self.capture.release()

    def __enter__(self) -> VideoInput:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def open_video(path: str | Path | int, name: str | None = None) -> VideoInput:
    """Open a video file (or a webcam index / stream URL); VideoReadError (naming `name`, default the
    source) when it has no video stream."""

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


# ------------------------------------------------------------------ live inputs (webcam, stream URL)
# Read as live inputs by FFmpeg (file:// too: a recorded file played as a stream, e.g. for a test).
URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "file://")


def parse_source(text: str | int | Path) -> int | str | Path:
    """A webcam index (an int, or digits), a stream URL (kept a string: Path would eat its '//'), or a
    file path."""
    if isinstance(text, int):
        return text
    value = str(text).strip()
    if value.isdigit():
        return int(value)
    if value.lower().startswith(URL_SCHEMES):
        return value
    return Path(value)


def is_live(source: int | str | Path) -> bool:
    """A webcam or a stream (parse_source's int or str), not a file."""
    return not isinstance(source, Path)


def source_name(source: int | str | Path) -> str:
    """A file-name-safe name for outputs: webcam0, or the URL's host/path without credentials
    (rtsp://user:pw@cam:554/live -> rtsp_cam_554_live); a path's stem."""
    if isinstance(source, int):
        return f"webcam{source}"
    if isinstance(source, Path):
        return source.stem
    scheme, _, rest = source.partition("://")
    rest = rest.rsplit("@", 1)[-1]  # never write a password into a file name
    return re.sub(r"[^A-Za-z0-9]+", "_", f"{scheme}_{rest}").strip("_")


def display_name(source: int | str | Path) -> str:
    """How messages name the input (a URL without its credentials)."""
    if isinstance(source, int):
        return f"webcam {source}"
    if isinstance(source, str):
        scheme, _, rest = source.partition("://")
        return f"{scheme}://{rest.rsplit('@', 1)[-1]}"
    return str(source)


@contextmanager
def stop_on_ctrl_c(name: str) -> Iterator[None]:
    """Ctrl-C (KeyboardInterrupt) ends the block quietly: the code after it then closes the outputs
    normally, so the video and files written so far are kept and playable."""
    try:
        yield
    except KeyboardInterrupt:
        logger.warning(f"{name}: stopped by Ctrl-C; the output written so far is kept")
