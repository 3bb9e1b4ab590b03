"""Multi-object tracking for video inference (ByteTrack), its output files and live inputs.

    thresholds = detector.thresholds()
    with VideoTracks(settings, thresholds, detector.class_names, out_dir / "tracks" / "clip") as tracks:
        for frame in annotated_frames(detector, video.frames(), thresholds, tracks):   # batched, tracked
            writer.write(frame.picture)      # ids drawn; clip.txt (MOT) + clip.csv rows written as it goes
            frame.dets, frame.track_ids      # the detections at the thresholds, with their ids
    # files kept even after Ctrl-C

bytetrack.py: the tracker; writers.py: MOT txt / CSV, the per-frame hook and the frame loop. Live inputs
(webcam, stream URL) and the clean Ctrl-C stop are in src/common/video.py.
"""

from src.runtime.tracking.bytetrack import Tracker, TrackerSettings, iou_pairs
from src.runtime.tracking.writers import (
    CSV_COLUMNS,
    AnnotatedFrame,
    TrackFiles,
    VideoTracks,
    annotated_frames,
    mot_lines,
)

__all__ = [
    "CSV_COLUMNS",
    "AnnotatedFrame",
    "TrackFiles",
    "Tracker",
    "TrackerSettings",
    "VideoTracks",
    "annotated_frames",
    "iou_pairs",
    "mot_lines",
]
