"""Live inputs for video inference: a webcam index or a stream URL (RTSP, HTTP...), read with
cv2.VideoCapture, and a clean stop on Ctrl-C.

Interim home: the project's one video read/write module is src/common/video.py (files only when this was
written); these helpers belong beside it and move there when the two are merged.

    source = parse_source("0")               # 0: webcam; "rtsp://cam/live": a URL; anything else: a path
    with open_source(source) as video, stop_on_ctrl_c(video.name):
        for index, frame_rgb in video.frames():
            ...                               # Ctrl-C ends the loop; the `with` blocks after it still run
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loguru import logger

from src.common.errors import UserError

DEFAULT_FPS = 25.0  # when the camera or container does not say
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


@dataclass
class LiveVideo:
    """An open capture: fps, size (width, height), total frames (None: live or not said); frames() yields
    RGB frames until the input ends."""

    capture: object  # cv2.VideoCapture
    name: str
    live: bool
    fps: float
    size: tuple[int, int]
    total: int | None
    first: np.ndarray | None  # BGR: the frame open_source read to prove the input works, yielded first
    retries: int = 3  # a live input gets this many more reads (0.2 s apart) before it counts as dead
    frames_read: int = 0

    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index, RGB uint8 (H, W, 3) frame) one at a time. A file ends at its last frame; a stream that
        stops sending is reported (a dead stream) and ends the loop: the output written so far is kept."""
        while True:
            ok, frame = (True, self.first) if self.first is not None else self.capture.read()
            self.first = None
            for _ in range(self.retries if self.live and not ok else 0):
                time.sleep(0.2)
                ok, frame = self.capture.read()
                if ok:
                    break
            if not ok:
                if self.live:
                    logger.warning(
                        f"{self.name}: no more frames after {self.frames_read} (stream ended or dead)"
                    )
                return
            self.frames_read += 1
            yield self.frames_read - 1, np.ascontiguousarray(frame[..., ::-1])

    def close(self) -> None:
        self.capture.release()

    def __enter__(self) -> LiveVideo:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def open_source(source: int | str | Path) -> LiveVideo:
    """Open a webcam, a stream URL or a video file; UserError naming it when nothing can be read."""
    import cv2

    name = display_name(source)
    capture = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    ok, first = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        capture.release()
        kind = "video file" if isinstance(source, Path) else "camera or stream"
        raise UserError(
            f"{name}: cannot open or read the {kind} (wrong index/URL, dead stream or corrupt file)"
        )
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = float(fps) if fps and np.isfinite(fps) and 0 < fps < 1000 else DEFAULT_FPS
    height, width = first.shape[:2]
    total = None if is_live(source) else int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    return LiveVideo(capture, name, is_live(source), fps, (width, height), total, first)


@contextmanager
def stop_on_ctrl_c(name: str) -> Iterator[None]:
    """Ctrl-C (KeyboardInterrupt) ends the block quietly: enclosing `with` blocks then close their
    outputs normally, so the video and track files written so far are kept and playable."""
    try:
        yield
    except KeyboardInterrupt:
        logger.warning(f"{name}: stopped by Ctrl-C; the output written so far is kept")
