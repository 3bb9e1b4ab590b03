"""Per-video track outputs: a MOT-challenge txt and a CSV, the per-frame hook that ties the tracker, the
files and the drawing together (`VideoTracks`), and the one loop over a video's frames that both the infer
stage and the demo run (`annotated_frames`: detect, track when asked, draw).

Both files are streamed to hidden temp files beside their final names and moved into place by close(),
which also runs after Ctrl-C, a dead stream or an error: what was written is kept, never half a line.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.common.draw import draw_masks, draw_tracks
from src.runtime.detector import BOX_DECIMALS, SCORE_DECIMALS, Detections, Detector, rounded
from src.runtime.outputs import draw
from src.runtime.tracking.bytetrack import Tracker, TrackerSettings

# MOT-challenge ground-truth/result format (MOT16/17/20): frame numbers start at 1; x, y = top-left.
MOT_FIELDS = "frame,id,x,y,w,h,score,-1,-1,-1"
CSV_COLUMNS = [
    "frame",  # 0-based, as in predictions.csv (the MOT txt counts from 1, as its format says)
    "track_id",
    "class_id",  # the track's class: majority vote over all its detections
    "class_name",
    "det_class_id",  # this detection's own class
    "score",
    "x1",
    "y1",
    "x2",
    "y2",
]


def mot_lines(frame_index: int, ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> str:
    """MOT txt lines of one frame (0-based frame_index) for the tracked detections (ids >= 1)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    xywh, scores = rounded(xywh, BOX_DECIMALS), rounded(scores, SCORE_DECIMALS)
    return "".join(
        f"{frame_index + 1},{int(i)},{x},{y},{w},{h},{s},-1,-1,-1\n"
        for i, (x, y, w, h), s in zip(ids, xywh, scores, strict=True)
    )


class TrackFiles:
    """<base>.txt (MOT) and <base>.csv of one video; rows streamed, class names resolved on close(). The
    suffixes are added to base's name, never put in place of a dot in it (tracks/a.mp4 -> a.mp4.txt)."""

    def __init__(self, base: Path, class_names: list[str]):
        self.mot_path, self.csv_path = (base.with_name(base.name + suffix) for suffix in (".txt", ".csv"))
        self.class_names = class_names
        base.parent.mkdir(parents=True, exist_ok=True)
        self._mot_tmp = self.mot_path.with_name(f".{self.mot_path.name}.tmp")
        self._rows_tmp = self.csv_path.with_name(f".{self.csv_path.name}.rows.tmp")
        # Open for the whole video (rows are streamed); close() closes them.
        self._mot = open(self._mot_tmp, "w", encoding="utf-8")  # noqa: SIM115
        self._rows = open(self._rows_tmp, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._rows_writer = csv.writer(self._rows)
        self.closed = False

    def write(self, frame_index: int, ids: np.ndarray, dets: Detections) -> None:
        """The tracked detections (ids >= 1) of one frame."""
        keep = ids >= 0
        boxes, scores = dets.boxes[keep], dets.scores[keep]
        self._mot.write(mot_lines(frame_index, ids[keep], boxes, scores))
        for track_id, label, score, box in zip(
            ids[keep], dets.labels[keep], rounded(scores, SCORE_DECIMALS), rounded(boxes, BOX_DECIMALS),
            strict=True,
        ):  # fmt: skip
            self._rows_writer.writerow([frame_index, int(track_id), int(label), score, *box])

    def close(self, voted: dict[int, int]) -> tuple[Path, Path]:
        """Move both files into place; the CSV gets each track's final majority class (`voted`: id -> class)."""
        if self.closed:
            return self.mot_path, self.csv_path
        self.closed = True
        self._mot.close()
        self._rows.close()
        os.replace(self._mot_tmp, self.mot_path)
        csv_tmp = self.csv_path.with_name(f".{self.csv_path.name}.tmp")
        with (
            open(self._rows_tmp, newline="", encoding="utf-8") as rows,
            open(csv_tmp, "w", newline="", encoding="utf-8") as out,
        ):
            writer = csv.writer(out)
            writer.writerow(CSV_COLUMNS)
            for frame, track_id, det_label, score, *box in csv.reader(rows):
                label = voted.get(int(track_id), int(det_label))
                writer.writerow([frame, track_id, label, self.class_names[label], det_label, score, *box])
        os.replace(csv_tmp, self.csv_path)
        os.remove(self._rows_tmp)
        return self.mot_path, self.csv_path


@dataclass
class AnnotatedFrame:
    """One processed frame: the detections at or above the thresholds (what predictions, labels and crops
    report), their track ids, and the frame drawn."""

    index: int  # 0-based frame number
    image: np.ndarray  # (H, W, 3) RGB uint8, the frame as read
    dets: Detections
    track_ids: np.ndarray | None  # (N,) per reported detection, -1 = not (yet) tracked; None: no tracking
    picture: np.ndarray  # (H, W, 3) RGB uint8: boxes (and masks) drawn, "#id" tags when tracked


class VideoTracks:
    """Tracking of one video or stream: `tracks.frame(index, frame_rgb, dets)` per frame, then close(). Run
    the detector at `tracks.detector_conf` (below the model's thresholds: ByteTrack uses the low-score
    detections to keep tracks through occlusions); `annotated_frames` does both.

    thresholds: (num_classes,) the thresholds a reported detection must reach (np.inf: the class is never
    reported nor tracked). files_base: tracks/<video> without suffix -> <video>.txt (MOT) and <video>.csv;
    None: no files.
    """

    def __init__(
        self,
        settings: TrackerSettings,
        thresholds: np.ndarray,
        class_names: list[str],
        files_base: Path | None,
    ):
        self.tracker = Tracker(settings, thresholds)
        self.class_names = class_names
        self.files = TrackFiles(files_base, class_names) if files_base is not None else None
        self.tracked_detections = 0

    @property
    def detector_conf(self) -> np.ndarray:
        """(num_classes,) the thresholds to run the detector at: each class's own, lowered to the tracker's
        low_conf; a class never reported (np.inf) stays out."""
        thresholds = self.tracker.thresholds
        low = np.minimum(thresholds, self.tracker.settings.low_conf)
        return np.where(np.isfinite(thresholds), low, np.inf).astype(np.float32)

    def update(self, frame_index: int, dets: Detections) -> tuple[np.ndarray, np.ndarray]:
        """Track one frame's detections -> (ids (N,), majority class (N,)); -1 where not tracked."""
        ids = self.tracker.update(dets)
        if self.files is not None:
            self.files.write(frame_index, ids, dets)
        self.tracked_detections += int((ids >= 0).sum())
        return ids, self.tracker.voted_labels(ids)

    def frame(self, frame_index: int, frame_rgb: np.ndarray, dets: Detections) -> AnnotatedFrame:
        """update(), then the frame with the tracked boxes drawn ("#id class score", a colour per id; a
        segmentation model's masks filled under them in the same colour), and the detections at or above the
        thresholds with their ids: the low-score ones made for the tracker are not reported."""
        ids, labels = self.update(frame_index, dets)
        keep = ids >= 0
        picture = frame_rgb
        if dets.masks is not None:
            picture = draw_masks(picture, dets.masks[keep], ids[keep])  # draw_tracks' colour: by id
        picture = draw_tracks(
            picture, dets.boxes[keep], ids[keep], labels[keep], dets.scores[keep], self.class_names
        )
        confident = dets.scores >= dets.held_to(self.tracker.thresholds)
        return AnnotatedFrame(frame_index, frame_rgb, dets.select(confident), ids[confident], picture)

    def close(self) -> tuple[Path, Path] | None:
        if self.files is None:
            return None
        voted = {track_id: track.voted_label() for track_id, track in self.tracker.by_id.items()}
        return self.files.close(voted)

    def __enter__(self) -> VideoTracks:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()  # after Ctrl-C or an error too: the rows written so far are kept


def annotated_frames(
    detector: Detector,
    frames: Iterable[tuple[int, np.ndarray]],
    thresholds: np.ndarray,
    tracks: VideoTracks | None = None,
) -> Iterator[AnnotatedFrame]:
    """The one loop over a video's (index, RGB frame) pairs, for the infer stage and the demo: frames are
    detected `detector.max_batch` at a time, at `thresholds` (num_classes,) or, when tracked, down to the
    tracker's low threshold; each comes back tracked (tracks) or plain, drawn."""
    conf = thresholds if tracks is None else tracks.detector_conf
    for index, image, dets in detector.stream(frames, conf):
        if tracks is not None:
            yield tracks.frame(index, image, dets)
        else:
            yield AnnotatedFrame(index, image, dets, None, draw(image, dets, detector.class_names))
