"""Tracking (src/runtime/tracking): ids through crossings, majority-vote class, MOT/CSV files, live inputs
and the clean Ctrl-C stop. Detections come from known boxes (the tracker is tested alone); the videos
are real files written with OpenCV."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from src.common.video import VideoReadError, display_name, open_video, parse_source, source_name
from src.runtime.detector import Detections
from src.runtime.tracking import CSV_COLUMNS, Tracker, VideoTracks
from tests.helpers.moving_squares import (
    NAMES,
    SETTINGS,
    THRESHOLDS,
    moving_squares,
    track_to_files,
    write_video,
)


def dets_of(boxes, scores, labels, size=(240, 320)) -> Detections:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int64)
    return Detections(boxes, np.asarray(scores, np.float32), labels, [NAMES[i] for i in labels], size)


def box_at(x: float, y: float, side: float = 40) -> list[float]:
    return [x, y, x + side, y + side]


def test_ids_kept_through_a_crossing_with_occlusion():
    """Two objects cross head-on; while they overlap the covered one is scored low, then missed for two
    frames: both keep their ids (Kalman prediction + ByteTrack's low-score pass)."""
    tracker = Tracker(SETTINGS, THRESHOLDS)
    first_ids, last_ids = None, None
    for t in range(60):
        a, b = box_at(20 + 4 * t, 100), box_at(260 - 4 * t, 108)  # cross at t = 30
        overlap = abs((20 + 4 * t) - (260 - 4 * t)) < 40
        if overlap and t in (29, 30):  # b fully covered: missed
            ids = tracker.update(dets_of([a], [0.9], [0]))
            assert ids[0] == first_ids[0]
            continue
        ids = tracker.update(dets_of([a, b], [0.9, 0.3 if overlap else 0.85], [0, 1]))
        assert (ids > 0).all(), f"frame {t}: an object lost its track"
        first_ids = first_ids if first_ids is not None else ids.copy()
        last_ids = ids
    assert first_ids[0] != first_ids[1]
    assert last_ids.tolist() == first_ids.tolist()
    assert len(tracker.by_id) == 2  # no extra track was started during the crossing


def test_new_tracks_need_confirmation_and_false_positives_get_no_id():
    tracker = Tracker(SETTINGS, THRESHOLDS)
    tracker.update(dets_of([box_at(10, 10)], [0.9], [0]))  # first frame: an id at once
    ids = tracker.update(dets_of([box_at(11, 10), box_at(200, 150)], [0.9, 0.9], [0, 0]))
    assert ids[0] == 1 and ids[1] == -1  # the newcomer is tentative...
    ids = tracker.update(dets_of([box_at(12, 10), box_at(200, 150)], [0.9, 0.9], [0, 0]))
    assert ids.tolist() == [1, 2]  # ...and confirmed by a second hit
    ids = tracker.update(dets_of([box_at(13, 10), box_at(100, 100)], [0.9, 0.9], [0, 0]))
    ids = tracker.update(dets_of([box_at(14, 10)], [0.9], [0]))  # a one-frame false positive: gone
    assert ids.tolist() == [1] and len(tracker.by_id) == 2
    low_only = tracker.update(dets_of([box_at(300, 10)], [0.3], [0]))  # low score, no track: no id
    assert low_only.tolist() == [-1]


def test_majority_vote_class_and_csv_final_class(tmp_path):
    classes = [2, 2, 1, 2, 3, 2, 2, 1, 2, 2]  # mostly triangle, with wrong classes mixed in
    with VideoTracks(SETTINGS, THRESHOLDS, NAMES, tmp_path / "tracks" / "clip") as tracks:
        for t, label in enumerate(classes):
            ids, voted = tracks.update(t, dets_of([box_at(10 + 2 * t, 50)], [0.9], [label]))
            assert ids.tolist() == [1]
            assert voted[0] == 2  # never swayed by a single wrong detection
    rows = list(csv.DictReader((tmp_path / "tracks" / "clip.csv").read_text(encoding="utf-8").splitlines()))
    assert [r["det_class_id"] for r in rows] == [str(c) for c in classes]
    assert {(r["class_id"], r["class_name"]) for r in rows} == {("2", "triangle")}


def test_mot_txt_and_csv_format(tmp_path):
    base = tmp_path / "tracks" / "clip"
    with VideoTracks(SETTINGS, THRESHOLDS, NAMES, base) as tracks:
        tracks.update(0, dets_of([[10, 20, 50, 80], [100, 100, 130, 120]], [0.91234, 0.8], [0, 1]))
        tracks.update(1, dets_of([[12, 21, 52, 81], [101, 100, 131, 120]], [0.9, 0.3], [0, 1]))
    lines = (tmp_path / "tracks" / "clip.txt").read_text().splitlines()
    assert lines[0] == "1,1,10.0,20.0,40.0,60.0,0.9123,-1,-1,-1"  # frame from 1, x y w h, score
    assert [line.split(",")[:2] for line in lines] == [["1", "1"], ["1", "2"], ["2", "1"], ["2", "2"]]
    assert all(len(line.split(",")) == 10 and line.endswith(",-1,-1,-1") for line in lines)
    with open(tmp_path / "tracks" / "clip.csv", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == CSV_COLUMNS
    assert rows[1] == ["0", "1", "0", "circle", "0", "0.9123", "10.0", "20.0", "50.0", "80.0"]
    assert not list(tmp_path.glob("tracks/.*"))  # no temp file left


def count_frames(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


@pytest.mark.parametrize("as_url", [False, True], ids=["file", "stream url"])
@pytest.mark.parametrize("stop_at", [None, 12], ids=["end of input", "ctrl-c"])
def test_stream_end_or_ctrl_c_keeps_playable_outputs(tmp_path, stop_at, as_url):
    """A real video file read as a file or as a live stream (file:// URL: the end of the file is a stream
    that stops sending, retried then ended)."""
    squares = moving_squares(frames=30, seed=1)
    source = write_video(tmp_path / "stream.mp4", squares.frames)
    out = tmp_path / "out"
    out.mkdir()
    written = track_to_files(
        parse_source(f"file://{source}" if as_url else str(source)), out, squares, stop_at
    )
    expected = 30 if stop_at is None else stop_at
    assert written == expected
    assert count_frames(out / "clip.mp4") == expected  # playable, every processed frame in it
    frames = {int(line.split(",")[0]) for line in (out / "clip.txt").read_text().splitlines()}
    assert max(frames) == expected  # MOT frames count from 1
    assert (out / "clip.csv").read_text().startswith(",".join(CSV_COLUMNS))


CHILD = """
import sys
from pathlib import Path
from src.common.video import parse_source
from tests.helpers.moving_squares import moving_squares, track_to_files
squares = moving_squares(frames=60, seed=1)
print("written", track_to_files(parse_source(sys.argv[1]), Path(sys.argv[2]), squares, pace=0.05), flush=True)
"""


def test_real_ctrl_c_on_a_live_input_keeps_playable_outputs(tmp_path):
    """A real SIGINT sent to a process reading a stream (file:// URL) at a camera's pace."""
    source = write_video(tmp_path / "stream.mp4", moving_squares(frames=60, seed=1).frames)
    out = tmp_path / "out"
    out.mkdir()
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, f"file://{source}", str(out)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in child.stdout:
        if line.startswith("frame 5"):
            child.send_signal(signal.SIGINT)
            break
    rest, errors = child.communicate(timeout=120)
    assert child.returncode == 0, errors
    written = int(rest.strip().splitlines()[-1].split()[-1])
    assert 5 < written < 60 and "stopped by Ctrl-C" in errors
    assert count_frames(out / "clip.mp4") == written
    assert max(mot_frames(out / "clip.txt")) == written


def test_unreadable_inputs_are_named(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoReadError, match="missing.mp4"):
        open_video(missing)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoReadError, match="corrupt.mp4"):
        open_video(corrupt)
    with pytest.raises(VideoReadError, match="webcam 97"):
        open_video(97, display_name(97))
    assert display_name("rtsp://user:pw@cam:554/live") == "rtsp://cam:554/live"


def test_sources_and_output_names():
    assert parse_source("0") == 0 and parse_source(2) == 2
    assert parse_source("rtsp://user:pw@cam:554/live") == "rtsp://user:pw@cam:554/live"  # a str, not a Path
    assert parse_source("videos/a.mp4") == Path("videos/a.mp4")
    assert source_name(0) == "webcam0"
    assert source_name("rtsp://user:pw@cam:554/live") == "rtsp_cam_554_live"  # no credentials in names
    assert source_name(Path("videos/a.mp4")) == "a"


# ------------------------------------------------------------------ through the infer stage (a real model)
@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    """A tiny D-FINE checkpoint (deterministic weights) and a 24-frame video of moving squares."""
    from tests.helpers.deploy_data import deploy_config, make_checkpoint

    root = tmp_path_factory.mktemp("track_infer")
    make_checkpoint(deploy_config(root))
    return root, write_video(root / "media" / "clip.mp4", moving_squares(frames=24, seed=2).frames, fps=10.0)


def infer_config(root: Path, source: str, *overrides: str):
    from tests.helpers.deploy_data import deploy_config

    model = root / "output" / "tiny" / "best.pt"
    return deploy_config(root, f"infer.input={source}", f"infer.model_path={model}", *overrides)


def infer_folder(summary: dict, root: Path) -> Path:
    """Where infer wrote (infer/<input name>/, in the summary)."""
    return Path(summary["out_dir"])


def mot_frames(path: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()]


def test_infer_tracks_a_video(tiny_experiment):
    from src.dl import infer

    root, video = tiny_experiment
    cfg = infer_config(
        root, str(video.parent), "infer.track=true", "infer.conf=0.05", "infer.save_crops=false"
    )
    summary = infer.run(cfg)
    out = infer_folder(summary, root)
    assert count_frames(out / "videos" / "clip.mp4") == 24
    frames = mot_frames(out / "tracks" / "clip.txt")
    assert frames and min(frames) >= 1 and max(frames) <= 24
    assert summary["tracks"]["clip.mp4"] >= 1
    with open(out / "tracks" / "clip.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(frames) and {int(r["track_id"]) for r in rows} >= {1}
    predictions = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert all(float(r["score"]) >= 0.05 for r in predictions)  # the tracker's low scores stay out


def test_infer_live_input_stopped_by_ctrl_c_keeps_outputs(tiny_experiment, monkeypatch):
    """A stream (the video read through a file:// URL) stopped by a real SIGINT during the third batch:
    the frames done before it are in a playable video, the track files and predictions.csv/json."""
    from src.dl import infer

    root, video = tiny_experiment
    load = infer.load_experiment_model
    batches = []

    def load_and_interrupt(*args, **kwargs):
        detector = load(*args, **kwargs)
        predict = detector.predict

        def predict_then_ctrl_c(images, *a, **k):
            if len(batches) == 2:
                raise KeyboardInterrupt  # Ctrl-C while the model runs (a real SIGINT: see below)
            batches.append(len(images))
            return predict(images, *a, **k)

        detector.predict = predict_then_ctrl_c
        return detector

    monkeypatch.setattr(infer, "load_experiment_model", load_and_interrupt)
    cfg = infer_config(root, f"file://{video}", "infer.track=true", "infer.conf=0.05", "exp_name=tiny")
    summary = infer.run(cfg)
    done = sum(batches[:2])
    assert 0 < done < 24 and summary["video_frames"] == done
    out = infer_folder(summary, root)
    name = source_name(f"file://{video}")
    assert count_frames(out / "videos" / f"{name}.mp4") == done
    assert max(mot_frames(out / "tracks" / f"{name}.txt")) <= done
    assert (out / "predictions.json").exists() and not list((out / "videos").glob(".*"))


def test_infer_dead_stream_is_named(tiny_experiment):
    from src.dl import infer

    root, _ = tiny_experiment
    summary = infer.run(infer_config(root, "rtsp://user:secret@127.0.0.1:1/live"))
    (reason,) = summary["failed"].values()
    assert "rtsp://127.0.0.1:1/live" in reason and "secret" not in reason
