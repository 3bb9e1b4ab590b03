"""Multi-object tracking for video inference (ByteTrack), its output files and live inputs.

    tracks = VideoTracks(TrackerSettings.from_config(cfg.infer.tracker), detector.thresholds(),
                         detector.class_names, out_dir / "tracks" / "clip")
    with tracks:                                                 # files kept even after Ctrl-C
        for index, frame in frames:
            dets = detector(frame, conf=tracks.detector_conf)   # low-score ones too (ByteTrack)
            annotated = tracks.frame(index, frame, dets)        # ids drawn; clip.txt (MOT) + clip.csv rows

bytetrack.py: the tracker; writers.py: MOT txt / CSV and the per-frame hook. Live inputs (webcam, stream
URL) and the clean Ctrl-C stop are in src/common/video.py.
"""

from src.runtime.tracking.bytetrack import Tracker, TrackerSettings, iou_pairs
from src.runtime.tracking.writers import CSV_COLUMNS, TrackFiles, VideoTracks, mot_lines

__all__ = [
    "CSV_COLUMNS",
    "TrackFiles",
    "Tracker",
    "TrackerSettings",
    "VideoTracks",
    "iou_pairs",
    "mot_lines",
]
