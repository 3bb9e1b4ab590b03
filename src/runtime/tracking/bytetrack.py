"""ByteTrack (Zhang et al., ECCV 2022) over the runtime's Detections: a track id per detection, each
track's class by majority vote over its history.

Why our own and not a library's: roboflow `trackers` (the maintained ByteTrack / OC-SORT; supervision
0.31 no longer ships a tracker) requires `opencv-python`, a second OpenCV distribution (5.x) that
installs its own cv2 over the project's pinned opencv-python-headless 4.x. The algorithm is small: a
constant-velocity Kalman filter per track and three IoU assignments (scipy's linear_sum_assignment).

One frame:
1. every track's box is predicted by its Kalman filter;
2. confident detections (score >= the model's threshold of their class) are matched to the active and
   lost tracks (IoU >= match_iou);
3. low-score detections (between low_conf and the threshold: often an occluded object) are matched to
   the tracks still unmatched (IoU >= low_match_iou): this keeps an id through a partial occlusion;
4. confident detections left over start tentative tracks; a track gets its id after `confirm_frames`
   consecutive hits (at once in the first frame); a tentative track that misses a frame is dropped;
5. a track unseen for more than `max_lost_frames` is dropped; ids are never reused.
Matching is class-agnostic (a detector flipping between two classes keeps the id); the class shown is
the majority vote over the track's detections.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from src.runtime.detector import Detections


@dataclass(frozen=True)
class TrackerSettings:
    """config.yaml infer.tracker (see the comments there)."""

    low_conf: float
    match_iou: float
    low_match_iou: float
    confirm_frames: int
    max_lost_frames: int

    @classmethod
    def from_config(cls, section) -> TrackerSettings:
        return cls(
            low_conf=float(section.low_conf),
            match_iou=float(section.match_iou),
            low_match_iou=float(section.low_match_iou),
            confirm_frames=int(section.confirm_frames),
            max_lost_frames=int(section.max_lost_frames),
        )


def iou_pairs(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(A, B) IoU of xyxy boxes in numpy: for the few boxes of one frame, far cheaper than going through
    torch (src.common.boxes.box_iou) and back, once per frame of every video."""
    if len(boxes_a) == 0 or len(boxes_b) == 0:
        return np.zeros((len(boxes_a), len(boxes_b)))
    a, b = boxes_a[:, None, :], boxes_b[None, :, :]
    inter_w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    inter_h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


# ---------------------------------------------------------------------------------------- Kalman filter
# State (8,): centre x, centre y, aspect ratio w/h, height, and their velocities (ByteTrack's xyah filter).
# Noise scales with the box height, as in ByteTrack: position 1/20, velocity 1/160 of the height.
_STD_POSITION = 1.0 / 20
_STD_VELOCITY = 1.0 / 160
_MOTION = np.eye(8)
_MOTION[:4, 4:] = np.eye(4)  # x_t+1 = x_t + v_t (one frame)


def xyxy_to_xyah(box: np.ndarray) -> np.ndarray:
    width, height = box[2] - box[0], max(box[3] - box[1], 1e-6)
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, width / height, height])


# Per-frame noise std = height * _SCALE + _FLOOR (the aspect ratio gets a fixed std), precomputed.
_PROCESS_SCALE = np.array(
    [_STD_POSITION] * 2 + [0] + [_STD_POSITION] + [_STD_VELOCITY] * 2 + [0] + [_STD_VELOCITY]
)
_PROCESS_FLOOR = np.array([0, 0, 1e-2, 0, 0, 0, 1e-5, 0])
_MEASURE_SCALE = np.array([_STD_POSITION] * 2 + [0] + [_STD_POSITION])
_MEASURE_FLOOR = np.array([0, 0, 1e-1, 0])
_DIAG8 = np.diag_indices(8)


class KalmanBox:
    """Constant-velocity Kalman filter state of one box (ByteTrack's); the steps run batched over every
    track of a frame (predict_all / update_all): one numpy call per frame, not per track."""

    def __init__(self, box_xyxy: np.ndarray):
        measurement = xyxy_to_xyah(box_xyxy)
        self.mean = np.concatenate([measurement, np.zeros(4)])  # (8,)
        # Uncertain start: position 2x, velocity 10x the per-frame noise (ByteTrack's initiate()).
        std = measurement[3] * _PROCESS_SCALE * np.array([2] * 4 + [10] * 4) + _PROCESS_FLOOR
        self.cov = np.diag(std**2)  # (8, 8)

    @property
    def box(self) -> np.ndarray:
        cx, cy, aspect, height = self.mean[:4]
        half_w, half_h = aspect * height / 2, height / 2
        return np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h])


def predict_all(filters: list[KalmanBox]) -> None:
    """One frame ahead for every filter."""
    if not filters:
        return
    means = np.stack([f.mean for f in filters]) @ _MOTION.T  # (T, 8)
    covs = _MOTION @ np.stack([f.cov for f in filters]) @ _MOTION.T  # (T, 8, 8)
    std = means[:, 3:4] * _PROCESS_SCALE + _PROCESS_FLOOR  # (T, 8)
    covs[:, _DIAG8[0], _DIAG8[1]] += std**2
    for f, mean, cov in zip(filters, means, covs, strict=True):
        f.mean, f.cov = mean, cov


def update_all(filters: list[KalmanBox], boxes_xyxy: np.ndarray) -> None:
    """Correct each filter with its measured box (boxes_xyxy (T, 4))."""
    if not filters:
        return
    measured = np.stack([xyxy_to_xyah(b) for b in boxes_xyxy])  # (T, 4)
    means, covs = np.stack([f.mean for f in filters]), np.stack([f.cov for f in filters])
    std = means[:, 3:4] * _MEASURE_SCALE + _MEASURE_FLOOR  # (T, 4)
    projected = covs[:, :4, :4] + std[:, :, None] ** 2 * np.eye(4)  # H P H^T + R, H = [I 0]: (T, 4, 4)
    gain = np.linalg.solve(projected, covs[:, :4, :]).transpose(0, 2, 1)  # (T, 8, 4); both symmetric
    means = means + (gain @ (measured - means[:, :4])[:, :, None])[:, :, 0]
    covs = covs - gain @ projected @ gain.transpose(0, 2, 1)
    for f, mean, cov in zip(filters, means, covs, strict=True):
        f.mean, f.cov = mean, cov


# ---------------------------------------------------------------------------------------------- tracks
@dataclass
class Track:
    kalman: KalmanBox
    hits: int = 1  # consecutive frames with a detection while tentative
    track_id: int = -1  # -1 while tentative
    lost_frames: int = 0  # frames since the last detection
    votes: Counter = field(default_factory=Counter)  # class id -> detections of that class

    @property
    def confirmed(self) -> bool:
        return self.track_id >= 0

    def voted_label(self) -> int:
        """Majority class over the track's detections (a tie goes to the class seen first)."""
        return self.votes.most_common(1)[0][0]


def _assign(tracks: list[Track], boxes: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """Optimal one-to-one (track index, box index) pairs with IoU >= min_iou (Hungarian on 1 - IoU)."""
    if not tracks or len(boxes) == 0:
        return []
    predicted = np.stack([t.kalman.box for t in tracks])  # (T, 4)
    iou = iou_pairs(predicted, boxes)  # (T, D)
    rows, cols = linear_sum_assignment(1.0 - iou)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= min_iou]


class Tracker:
    """`tracker.update(detections) -> ids`: one tracker per video or stream.

    thresholds: (num_classes,) the model's per-class thresholds (`Detector.thresholds()`): a detection at
    or above its class's threshold is confident (may start a track); below it, down to settings.low_conf,
    it may only continue a track. Feed the tracker detections made at `detector_conf` (the lower of the two).
    """

    def __init__(self, settings: TrackerSettings, thresholds: np.ndarray):
        self.settings = settings
        self.thresholds = np.asarray(thresholds, np.float32).reshape(-1)  # (num_classes,)
        self.tracks: list[Track] = []  # live tracks (tentative, active, lost)
        self.by_id: dict[int, Track] = {}  # every confirmed track, dropped ones included (their votes)
        self.frames = 0
        self._next_id = 1  # MOT-challenge ids start at 1

    @property
    def detector_conf(self) -> float:
        """The threshold to run the detector at so that the low-score detections reach the tracker."""
        return float(min(self.settings.low_conf, self.thresholds.min()))

    def update(self, dets: Detections) -> np.ndarray:
        """(N,) int64 track id of each detection; -1: not part of a confirmed track (a low-score detection
        matching no track, a tentative track's first frames, or below low_conf)."""
        self.frames += 1
        predict_all([track.kalman for track in self.tracks])
        boxes = np.asarray(dets.boxes, np.float64).reshape(-1, 4)
        labels = np.asarray(dets.labels, np.int64).reshape(-1)
        scores = np.asarray(dets.scores, np.float64).reshape(-1)
        class_threshold = self.thresholds[np.clip(labels, 0, len(self.thresholds) - 1)]
        high = np.flatnonzero(scores >= class_threshold)
        low = np.flatnonzero((scores < class_threshold) & (scores >= self.settings.low_conf))

        matched: dict[int, int] = {}  # track index -> detection index
        established = [i for i, t in enumerate(self.tracks) if t.confirmed]
        for group, candidates, min_iou in (
            (established, high, self.settings.match_iou),  # confident detections: active + lost tracks
            (established, low, self.settings.low_match_iou),  # low-score: the tracks still unmatched
            ([i for i, t in enumerate(self.tracks) if not t.confirmed], high, self.settings.match_iou),
        ):
            free_tracks = [i for i in group if i not in matched]
            free_dets = np.array([d for d in candidates if d not in matched.values()], np.int64)
            pairs = _assign([self.tracks[i] for i in free_tracks], boxes[free_dets], min_iou)
            matched.update({free_tracks[t]: int(free_dets[d]) for t, d in pairs})

        ids = np.full(len(boxes), -1, np.int64)
        update_all([self.tracks[i].kalman for i in matched], boxes[list(matched.values())])
        for index, det in matched.items():
            track = self.tracks[index]
            self._hit(track, int(labels[det]))
            ids[det] = track.track_id
        unmatched_high = [d for d in high if d not in matched.values()]
        self._age_unmatched(set(matched))
        for det in unmatched_high:
            ids[det] = self._start(boxes[det], int(labels[det])).track_id
        return ids

    def voted_labels(self, ids: np.ndarray) -> np.ndarray:
        """(N,) majority class of each id's track so far (-1 for id -1)."""
        return np.array([self.by_id[int(i)].voted_label() if i >= 0 else -1 for i in ids], np.int64)

    # ------------------------------------------------------------------ track life
    def _hit(self, track: Track, label: int) -> None:
        track.votes[label] += 1
        track.lost_frames = 0
        if not track.confirmed:
            track.hits += 1
            if track.hits >= self.settings.confirm_frames:
                self._confirm(track)

    def _start(self, box: np.ndarray, label: int) -> Track:
        track = Track(KalmanBox(box), votes=Counter({label: 1}))
        if self.frames == 1 or self.settings.confirm_frames <= 1:
            self._confirm(track)  # ByteTrack: objects of the first frame get their ids at once
        self.tracks.append(track)
        return track

    def _confirm(self, track: Track) -> None:
        track.track_id = self._next_id
        self.by_id[track.track_id] = track
        self._next_id += 1

    def _age_unmatched(self, matched: set[int]) -> None:
        """Unmatched tentative tracks are dropped; unmatched confirmed ones age and go after max_lost_frames.
        Called after the matched tracks were updated and before new tracks are appended (indices hold)."""
        kept = []
        for index, track in enumerate(self.tracks):
            if index not in matched:
                if not track.confirmed:
                    continue
                track.lost_frames += 1
                if track.lost_frames > self.settings.max_lost_frames:
                    continue
            kept.append(track)
        self.tracks = kept
