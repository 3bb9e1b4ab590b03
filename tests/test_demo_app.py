"""The Gradio demo: its prediction helpers on a real (tiny, untrained) D-FINE, then the page itself in a
headless Chromium (Debian's /usr/bin/chromium driven by Playwright, src/demo/screenshots.py's DemoPage;
skipped when it is not installed). The README's pictures: `python -m src.demo.screenshots`.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from src.common.config import ROOT, load_config
from src.common.images import read_image_rgb
from src.common.io import atomic_write_json
from src.demo.app import (
    TABLE_COLUMNS,
    DemoApp,
    VideoLimits,
    VideoReadError,
    class_thresholds,
    default_model,
    describe_model,
    find_models,
    model_choices,
    predict_images,
    predict_video,
    slider_conf,
    status_text,
)
from src.demo.screenshots import CHROMIUM, free_port, served_page
from src.etl.make_demo_data import make_scene
from src.runtime import load_model

CLASSES = ["circle", "square", "triangle", "star"]
IMG_SIZE = 64  # D-FINE-n has strides 16 and 32: (64/16)^2 + (64/32)^2 = 20 anchors >= the queries
NUM_QUERIES = 20
SHOWN_BOXES = 5  # the tiny model's default threshold is set so that about this many boxes show


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def scene(path: Path, seed: int, height: int = 288, width: int = 384) -> Path:
    """A demo-data-like picture (textured background, clutter, shapes) written as a JPG."""
    demo_data = load_config([]).demo_data  # the configured object sizes, clutter and class colours
    image_bgr, _ = make_scene(np.random.default_rng(seed), height, width, CLASSES, 4, demo_data)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image_bgr)
    return path


def write_clip(path: Path, frames: int, size: tuple[int, int] = (96, 64)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    for i in range(frames):
        frame = np.full((size[1], size[0], 3), 60, np.uint8)
        cv2.circle(frame, (10 + 6 * i, 30), 12, (0, 200, 255), -1)
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """output/tiny/best.pt in the trainer's checkpoint format (untrained D-FINE-n at 64 px) and a scene.

    thresholds.json beside it sets the default threshold just under the SHOWN_BOXES-th best score on the
    scene, so the page's default (taken from the model) shows a few boxes."""
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    from src.models import build_model
    from src.models.checkpoint import RunCheckpoint, save_run_checkpoint
    from src.models.spec import ModelSpec

    spec = ModelSpec("dfine", "n", (IMG_SIZE, IMG_SIZE), tuple(CLASSES), num_queries=NUM_QUERIES)
    model = build_model("n", len(CLASSES), img_size=(IMG_SIZE, IMG_SIZE), num_queries=NUM_QUERIES)
    checkpoint = save_run_checkpoint(
        root / "output" / "tiny" / "best.pt",
        RunCheckpoint(spec, model.state_dict(), config={}, thresholds={"conf_thresh": 0.5}),
    )
    image = scene(root / "inputs" / "scene.jpg", seed=3)
    scores = load_model(checkpoint, device="cpu")(image, conf=0.0).scores
    default = float(scores[SHOWN_BOXES - 1]) - 1e-6
    atomic_write_json(checkpoint.with_name("thresholds.json"), {"conf_thresh": default})
    return {"root": root, "checkpoint": checkpoint, "image": image, "default_conf": default}


@pytest.fixture(scope="module")
def tiny_segment(tmp_path_factory) -> dict:
    """output/tiny/best.pt of a segmentation model (D-FINE-n + mask branch, the deterministic weights of
    tests/helpers/deploy_data.py: every query scores above the default threshold; most have a mask) and a PNG scene
    (lossless: the test compares the page's picture pixel by pixel)."""
    from tests.helpers.deploy_data import deploy_config, make_checkpoint

    root = tmp_path_factory.mktemp("demo_seg")
    cfg = deploy_config(root, "model.task=segment", "demo_ui.num_examples=1")
    checkpoint = make_checkpoint(cfg, task="segment")
    image = scene(root / "inputs" / "shapes.png", seed=5, height=120, width=160)
    return {"root": root, "cfg": cfg, "checkpoint": checkpoint, "image": image}


def demo_cfg(root: Path, *overrides: str):
    return load_config(
        [f"output_dir={root / 'output'}", "exp_name=tiny", "device=cpu", f"data_path={root / 'inputs'}",
         "demo_ui.num_examples=1", *overrides]
    )  # fmt: skip


# ---------------------------------------------------------------- helpers, no browser


def test_find_models_lists_artifacts_per_experiment(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "best.pt").write_bytes(b"x")
    (tmp_path / "a" / "model.onnx").write_bytes(b"x")
    (tmp_path / "a" / "last.pt").write_bytes(b"x")  # resume state, not offered
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "best.pt").write_bytes(b"x")
    assert find_models(tmp_path) == [tmp_path / "a" / "best.pt", tmp_path / "a" / "model.onnx"]
    assert [label for label, _ in model_choices(tmp_path)] == ["a/best.pt", "a/model.onnx"]
    assert find_models(tmp_path / "missing") == []


def test_default_model_prefers_config_then_experiment(tiny, tmp_path):
    assert default_model(demo_cfg(tiny["root"])) == str(tiny["checkpoint"])
    assert default_model(demo_cfg(tiny["root"], "demo_ui.model_path=some/model.onnx")) == "some/model.onnx"
    assert default_model(demo_cfg(tmp_path)) is None  # nothing trained yet: the page says so


def test_predict_images_real_model(tiny, tmp_path):
    detector = load_model(tiny["checkpoint"], device="cpu")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    twin = scene(tmp_path / "other" / "scene.jpg", seed=3)  # same file name as the first upload
    results = predict_images(detector, [tiny["image"], broken, notes, twin], 0.0, None, tmp_path / "out")
    gallery, table, downloads = results

    assert len(gallery) == 2 and all(Path(path).exists() for path, _ in gallery)
    assert Path(gallery[1][0]).name == "scene_2.jpg"  # the second "scene.jpg" does not overwrite the first
    assert len(table) == 2 * NUM_QUERIES == results.detections  # conf 0: every query shows
    assert set(table["class_name"]) <= set(CLASSES) and (table["x2"] > table["x1"]).all()
    assert "frame" not in table.columns  # images only: no frame column
    assert [p for p in results.problems if "broken.jpg" in p and "cannot read" in p]
    assert [p for p in results.problems if "notes.txt" in p and "not a supported image" in p]
    assert not [p for p in results.problems if str(tmp_path) in p]  # names, not temp paths

    names = [Path(p).name for p in downloads]
    assert names[:2] == ["predictions.zip", "predictions.json"]
    assert {"scene.jpg", "scene_2.jpg", "scene.txt", "scene_2.txt"} <= set(names)
    labels = (tmp_path / "out" / "labels" / "scene.txt").read_text().splitlines()
    assert len(labels) == NUM_QUERIES and all(len(line.split()) == 5 for line in labels)
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [entry["file"] for entry in summary["images"]] == ["scene.jpg", "scene.jpg"]
    assert len(summary["failed"]) == 2
    with zipfile.ZipFile(downloads[0]) as bundle:
        assert {"predictions.json", "images/scene.jpg", "labels/scene_2.txt"} <= set(bundle.namelist())


def test_thresholds_and_class_filter(tiny, tmp_path):
    detector = load_model(tiny["checkpoint"], device="cpu")
    default = tiny["default_conf"]
    assert detector.meta.conf_thresh == pytest.approx(default)  # thresholds.json is the model's default
    assert slider_conf(detector, round(default, 2)) is None  # slider at the default: the model's thresholds
    assert slider_conf(detector, default + 0.2) == pytest.approx(default + 0.2)

    assert len(predict_images(detector, [tiny["image"]], None).table) == SHOWN_BOXES
    only = predict_images(detector, [tiny["image"]], 0.0, ["circle", "not-a-class"], tmp_path / "a")
    assert set(only.table["class_name"]) <= {"circle"}
    assert len(only.table) == sum(
        1 for line in (tmp_path / "a/labels/scene.txt").open() if line.startswith("0 ")
    )
    thresholds = class_thresholds(detector, 0.3, ["star"])
    assert thresholds[3] == pytest.approx(0.3) and thresholds[0] == float("inf")
    assert predict_images(detector, [tiny["image"]], 1.01).table.empty


def test_predict_video_streams_and_caps_frames(tiny, tmp_path):
    detector = load_model(tiny["checkpoint"], device="cpu")
    clip = write_clip(tmp_path / "clip.mp4", frames=6)
    results = predict_video(detector, clip, 0.0, None, tmp_path / "out", VideoLimits(max_frames=4))

    mp4, predictions, labels_zip = (Path(p) for p in results.downloads)
    assert mp4.suffix == ".mp4" and Path(results.video).suffix == ".webm"
    for video in (mp4, Path(results.video)):  # both play back with every processed frame
        capture = cv2.VideoCapture(str(video))
        count = 0
        while capture.read()[0]:
            count += 1
        capture.release()
        assert count == 4, video
    frames = json.loads(predictions.read_text())["frames"]
    assert [f["frame"] for f in frames] == [0, 1, 2, 3] and all(
        len(f["boxes"]) == NUM_QUERIES for f in frames
    )
    with zipfile.ZipFile(labels_zip) as labels:
        assert len(labels.namelist()) == 4
    assert len(results.table) == 4 * NUM_QUERIES and set(results.table["frame"]) == {"0", "1", "2", "3"}
    assert results.notes and "first 4 frames" in results.notes[0]
    assert VideoLimits(max_frames=100, max_seconds=0.2).frame_cap(fps=10) == 2

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 2048)
    with pytest.raises(VideoReadError, match="broken.mp4"):
        predict_video(detector, broken, out_dir=tmp_path / "bad")


def test_detect_handler_reports_problems_instead_of_raising(tiny, tmp_path):
    app = DemoApp(demo_cfg(tiny["root"], "demo_ui.max_video_frames=2"))
    choice = str(tiny["checkpoint"])
    assert app.detect(choice, [], None, None).problems == ["upload one or more images or a video first"]

    broken_video = tmp_path / "broken.mp4"
    broken_video.write_bytes(b"not a video")
    clip = write_clip(tmp_path / "clip.mp4", frames=3)
    results = app.detect(choice, [str(tiny["image"]), str(broken_video), str(clip)], 0.0, CLASSES)
    assert len(results.gallery) == 1 and results.video is not None
    assert len(results.problems) == 1 and results.problems[0].startswith("broken.mp4: ")
    assert len(results.table) == NUM_QUERIES * 3  # the image + 2 frames (demo_ui.max_video_frames)
    assert list(results.table.columns) == [c for c in TABLE_COLUMNS if c != "track_id"]  # no tracking asked
    assert list(results.table["frame"].unique()) == ["", "0", "1"]
    text = status_text(results)
    assert "2 file(s) processed" in text and "broken.mp4" in text and "first 2 frames" in text

    with pytest.raises(FileNotFoundError):  # the page turns this into a message (on_detect)
        app.detect(str(tmp_path / "missing.pt"), [str(tiny["image"])], None, None)

    tracked = app.detect(choice, [str(tiny["image"]), str(clip)], 0.0, CLASSES, track=True)
    assert list(tracked.table.columns) == TABLE_COLUMNS  # images + tracked frames in one table
    assert set(tracked.table.loc[tracked.table["frame"] == "", "track_id"]) == {""}  # images: no track
    assert "track(s)" in status_text(tracked)
    assert {Path(p).name for p in tracked.downloads} >= {"clip.txt", "clip.csv"}


def test_predict_video_cut_midway_says_so(tiny, tmp_path):
    """A video whose middle is damaged decodes only its first frames: the page's notes say how many of the
    frames its container announces could not be read."""
    detector = load_model(tiny["checkpoint"], device="cpu")
    clip = bytearray(write_clip(tmp_path / "clip.mp4", frames=40).read_bytes())
    frames_end = clip.find(b"moov")  # the frame data first, the index with the frame count last
    clip[frames_end // 3 : frames_end // 2] = bytes(frames_end // 2 - frames_end // 3)
    (tmp_path / "cut.mp4").write_bytes(clip)
    results = predict_video(detector, tmp_path / "cut.mp4", 0.0, None, tmp_path / "out")
    frames = json.loads(Path(results.downloads[1]).read_text())["frames"]
    assert 0 < len(frames) < 40
    assert any(f"{40 - len(frames)} of its 40 frames could not be read" in note for note in results.notes)


def test_predict_video_tracks_objects(tiny, tmp_path):
    """Tracking (dl.infer's ByteTrack): ids in the table, the json and the MOT/CSV files; the frames show
    "#id" tags; hidden classes are neither tracked nor shown."""
    from src.runtime.tracking import TrackerSettings

    detector = load_model(tiny["checkpoint"], device="cpu")
    settings = TrackerSettings.from_config(load_config([]).infer.tracker)
    clip = write_clip(tmp_path / "clip.mp4", frames=4)
    plain = predict_video(detector, clip, 0.0, None, tmp_path / "plain")
    tracked = predict_video(detector, clip, 0.0, None, tmp_path / "tracked", tracker=settings)

    mp4, predictions, labels_zip, mot, tracks_csv = (Path(p) for p in tracked.downloads)
    assert (mot.name, tracks_csv.name) == ("clip.txt", "clip.csv") and "track_id" not in plain.table
    ids = tracked.table["track_id"]
    assert len(tracked.table) == len(plain.table) == 4 * NUM_QUERIES  # conf 0: every query, every frame
    assert (ids[tracked.table["frame"] == "0"] != "").all()  # first frame: ids at once (ByteTrack)
    frames = json.loads(predictions.read_text())["frames"]
    assert [len(f["track_ids"]) for f in frames] == [NUM_QUERIES] * 4
    assert sorted(i for f in frames for i in f["track_ids"] if i) == sorted(int(i) for i in ids if i)
    assert len(mot.read_text().splitlines()) == sum(1 for i in ids if i)  # one MOT line per tracked box
    assert tracked.notes and "track(s)" in tracked.notes[-1]
    first = [cv2.VideoCapture(str(Path(r.downloads[0]))).read()[1] for r in (plain, tracked)]
    assert np.abs(first[0].astype(int) - first[1]).max() > 0  # "#id" tags, a colour per track

    circles = predict_video(
        detector, clip, 0.0, ["circle"], tmp_path / "circles", tracker=settings
    )  # only one class asked for: the other classes never reach the tracker
    assert set(circles.table["class_name"]) <= {"circle"}
    track_rows = Path(circles.downloads[-1]).read_text().splitlines()[1:]
    assert all(row.split(",")[4] == "0" for row in track_rows)  # det_class_id: circle only


def test_build_app_settings(tiny):
    from src.demo.app import build_app

    cfg = demo_cfg(tiny["root"], "demo_ui.queue_size=3", "demo_ui.concurrency=1")
    demo = build_app(cfg)
    assert demo.analytics_enabled is False
    assert queued_before_full(demo) == 3  # demo_ui.queue_size
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert by_id["model"].value == str(tiny["checkpoint"])  # the experiment's model is preselected
    assert by_id["conf"].value == round(tiny["default_conf"], 2)  # ... with its own threshold
    assert by_id["classes"].value == CLASSES
    assert "torch" in by_id["model-info"].value and "default threshold" in by_id["model-info"].value

    missing = build_app(demo_cfg(tiny["root"], "demo_ui.model_path=nowhere/model.onnx"))
    info = next(b for b in missing.blocks.values() if getattr(b, "elem_id", None) == "model-info")
    assert "cannot load" in info.value and "nowhere/model.onnx" in info.value  # the page still opens


def queued_before_full(demo, tries: int = 10) -> int:
    """How many requests the page's queue takes before it answers 503 ("queue is full"), over HTTP. The
    app is not started, so nothing leaves the queue while the test fills it."""
    from fastapi.testclient import TestClient

    client = TestClient(demo.app)
    for taken in range(tries):
        body = {"data": [None], "fn_index": 0, "session_hash": f"session{taken}"}
        answer = client.post("/gradio_api/queue/join", json=body)
        if answer.status_code == 503:
            return taken
        assert answer.status_code == 200, answer.text
    return tries


def test_segment_model_masks_on_images_and_videos(tiny_segment, tmp_path):
    """A segmentation model: masks drawn under the boxes (images, video frames, tracked frames), polygons
    in the labels and predictions.json."""
    from src.runtime.outputs import draw
    from src.runtime.tracking import TrackerSettings, VideoTracks, annotated_frames

    detector = load_model(tiny_segment["checkpoint"], device="cpu")
    image = read_image_rgb(tiny_segment["image"])
    dets = detector.predict([image])[0]
    # the fixture's premise: masks, several of them non-empty (random weights leave some empty)
    assert dets.masks is not None and dets.masks.any(axis=(1, 2)).sum() >= 3

    results = predict_images(detector, [tiny_segment["image"]], None, None, tmp_path / "images")
    shown = read_image_rgb(results.gallery[0][0])
    assert "with masks" in results.gallery[0][1]
    assert np.array_equal(shown, draw(image, dets, detector.class_names))  # PNG: exact
    boxes_only = draw(image, replace(dets, masks=None), detector.class_names)
    assert (shown != boxes_only).any(-1)[dets.masks.any(0)].any()  # mask pixels tinted (the boxes cover many)
    labels = (tmp_path / "images" / "labels" / "shapes.txt").read_text().splitlines()
    assert any(len(line.split()) > 5 for line in labels)  # YOLO-seg polygon lines
    assert "polygons" in json.loads((tmp_path / "images" / "predictions.json").read_text())["images"][0]
    assert "instance masks" in describe_model(detector)

    settings = TrackerSettings.from_config(load_config([]).infer.tracker)
    thresholds = detector.thresholds()
    for tracker in (None, settings):
        tracks = None if tracker is None else VideoTracks(tracker, thresholds, detector.class_names, None)
        (frame,) = annotated_frames(detector, [(0, image)], thresholds, tracks)
        if tracker is not None:
            assert (frame.track_ids >= 1).all()  # first frame: every confident detection gets an id
        plain = draw(image, replace(dets, masks=None), detector.class_names)
        assert (frame.picture != plain).any(-1)[dets.masks.any(0)].any()  # masks under the boxes

    clip = write_clip(tmp_path / "clip.mp4", frames=2)
    video = predict_video(detector, clip, None, None, tmp_path / "video", tracker=settings)
    frames = json.loads(Path(video.downloads[1]).read_text())["frames"]
    assert all("polygons" in f and f["track_ids"] for f in frames)


# ---------------------------------------------------------------- the page in a real browser


def browser_or_skip():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (make browser: Debian's chromium)")
    pytest.importorskip("playwright.sync_api")


def test_browser_end_to_end(tiny, tmp_path):
    browser_or_skip()
    import httpx

    cfg = demo_cfg(tiny["root"], "demo_ui.max_file_size=2mb")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff this is not really a jpeg")
    clip = write_clip(tmp_path / "clip.mp4", frames=5)
    contacted = []  # requests that left for another host (a CSP-blocked one never leaves the browser)
    with served_page(cfg) as demo:
        page, url = demo.page, demo.url
        assert url.startswith("http://127.0.0.1:")
        outside = lambda request: not request.url.startswith((url, "data:", "blob:"))  # noqa: E731
        page.on("requestfinished", lambda r: contacted.append(r.url) if outside(r) else None)
        page.on(
            "requestfailed", lambda r: contacted.append(r.url) if outside(r) and r.failure != "csp" else None
        )
        page.reload()  # the listeners see the page's own loading too
        page.wait_for_selector("#detect")
        # the slider starts at the model's own threshold (thresholds.json)
        shown = float(page.locator("#conf input[type=number]").input_value())
        assert shown == pytest.approx(round(tiny["default_conf"], 2))
        assert "torch" in page.locator("#model-info").inner_text()
        assert not page.locator("#track input[type=checkbox]").is_checked()  # demo_ui.track: false

        status = demo.detect([tiny["image"]], "detection(s)")
        assert "1 file(s) processed" in status
        page.locator("#gallery img").first.wait_for()
        assert f"{SHOWN_BOXES} detection(s)" in status  # the model's default threshold: the best boxes
        rows = page.locator("#table tbody tr").filter(has_text="scene.jpg")
        assert rows.count() >= SHOWN_BOXES  # Gradio's virtual table may render one extra row
        demo.wait_for_text("#downloads", "predictions")
        assert ".json" in page.locator("#downloads").inner_text()

        status = demo.detect([broken], "broken.jpg")  # a message in the page, and the app keeps working
        assert "cannot read image broken.jpg" in status and "processed" not in status  # only that file
        page.locator(".toast-body").first.wait_for()

        demo.detect([clip], "detection(s)")
        video = page.locator("#video video")
        video.wait_for()
        page.wait_for_function("() => document.querySelector('#video video').readyState >= 1")
        assert page.evaluate("() => document.querySelector('#video video').duration") > 0  # webm plays
        assert "track_id" not in page.locator("#table").inner_text()

        demo.set_conf(0.0)  # every query shows: the clip's objects get tracks
        demo.set_tracking(True)
        status = demo.detect([clip], "track(s)")
        assert "clip.mp4: 0 track(s)" not in status
        demo.wait_for_text("#table", "track_id")
        demo.wait_for_text("#downloads", ".csv")  # the track files (MOT txt + CSV) to download

        too_big = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.jpg", b"\0" * 3_000_000)})
        assert too_big.status_code == 413  # demo_ui.max_file_size
    assert contacted == []  # the page talks to 127.0.0.1 only


def test_browser_shows_masks(tiny_segment):
    """The page shows a segmentation model's masks: the picture in the gallery is the masked drawing."""
    browser_or_skip()
    import httpx

    from src.runtime.outputs import draw

    detector = load_model(tiny_segment["checkpoint"], device="cpu")
    image = read_image_rgb(tiny_segment["image"])
    dets = detector.predict([image])[0]
    with served_page(tiny_segment["cfg"]) as demo:
        assert "instance masks" in demo.page.locator("#model-info").inner_text()
        status = demo.detect([tiny_segment["image"]], "detection(s)")
        assert f"{len(dets)} detection(s)" in status
        demo.wait_for_text("#gallery", "with masks")
        demo.settle_gallery()
        source = demo.page.locator("#gallery img").first.get_attribute("src")
        picture = httpx.get(source if source.startswith("http") else demo.url + source.lstrip("/"))
    shown = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(picture.content, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )
    assert np.array_equal(shown, draw(image, dets, detector.class_names))  # masks, then boxes
    assert not np.array_equal(shown, draw(image, replace(dets, masks=None), detector.class_names))


# ---------------------------------------------------------------- temp files of a served demo


def wait_for_page(url: str, process, seconds: float = 120.0) -> None:
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the demo exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the demo did not answer on {url} within {seconds} s")


def test_sigterm_removes_uploads_and_work_folder(tiny, tmp_path):
    """A served demo (its own process) gets an upload, then SIGTERM: its temp folders are gone."""
    import signal
    import subprocess
    import sys

    import httpx

    temp = tmp_path / "tmp"  # the process's temp folder (TMPDIR), so only its own files are in it
    temp.mkdir()
    port = free_port()
    args = [f"output_dir={tiny['root'] / 'output'}", "exp_name=tiny", "device=cpu",
            f"data_path={tiny['root'] / 'inputs'}", "demo_ui.num_examples=1", f"demo_ui.port={port}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"} | {
        "TMPDIR": str(temp), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
    }  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "src.demo.app", *args], cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_page(url, process)
        upload = httpx.post(
            f"{url}/gradio_api/upload",
            files={"files": ("scene.jpg", Path(tiny["image"]).read_bytes(), "image/jpeg")},
            timeout=30,
        )
        assert upload.status_code == 200, upload.text
        stored = Path(upload.json()[0])
        assert stored.exists() and temp in stored.parents  # the upload landed in this process's temp folder
        assert {p.name.split("_")[2] for p in temp.glob("dfine_demo_*")} == {"ui", "uploads"}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    assert not stored.exists()
    assert sorted(p.name for p in temp.glob("dfine_demo_*")) == []  # uploads and results removed
