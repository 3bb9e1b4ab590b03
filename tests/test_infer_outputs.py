"""The infer stage's outputs on a careless user's folders (a tiny torch checkpoint, no export): names that
collide under a careless rule, a re-run beside the user's own files, videos cut short or unreadable, and the
result folders' modes."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from loguru import logger

from src.common.experiment import exp_dir
from src.etl.labels import parse_yolo_text
from tests.helpers.deploy_data import CLASS_NAMES, deploy_config, make_checkpoint, make_data, make_video


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_outputs")
    cfg = deploy_config(root)
    make_data(cfg)
    make_checkpoint(cfg)
    return root, sorted((root / "data" / "images").glob("*.jpg"))


def run_infer(root: Path, media: Path, *overrides: str) -> tuple[dict, Path]:
    from src.dl import infer

    cfg = deploy_config(root, f"infer.input={media}", "infer.conf=0.2", *overrides)
    cfg.infer.model_path = str(exp_dir(cfg) / "best.pt")
    summary = infer.run(cfg)
    return summary, Path(summary["out_dir"])


def test_label_files_of_a_jpg_a_png_and_a_jpg_jpg_stay_apart(project, tmp_path):
    """Three images, three label files, each holding its own image's detections."""
    root, pictures = project
    media = tmp_path / "stems"
    media.mkdir()
    shutil.copy(pictures[0], media / "a.jpg")
    cv2.imwrite(str(media / "a.png"), cv2.imread(str(pictures[1])))
    shutil.copy(pictures[2], media / "a.jpg.jpg")
    summary, out = run_infer(root, media, "infer.save_crops=false")
    rows = pd.read_csv(out / "predictions.csv")
    labels = {p.relative_to(out / "labels").as_posix(): p for p in (out / "labels").rglob("*.txt")}
    assert sorted(labels) == ["a.jpg.jpg.txt", "a.jpg.txt", "a.png.txt"]
    for name, path in labels.items():
        own = rows[rows["file"] == name.removesuffix(".txt")]
        parsed = parse_yolo_text(path.read_text(), str(path), len(CLASS_NAMES))
        centres_x = (own["x1"] + own["x2"]).to_numpy() / 2 / own["image_w"].to_numpy()
        assert len(own) > 0 and parsed.class_ids.tolist() == own["class_id"].tolist()
        np.testing.assert_allclose(parsed.boxes[:, 0], centres_x, atol=1e-3)  # this image's boxes
    assert summary["images"] == 3


def test_crops_of_sub_a_and_sub__a_stay_apart(project, tmp_path):
    root, pictures = project
    media = tmp_path / "flat"
    (media / "sub").mkdir(parents=True)
    shutil.copy(pictures[3], media / "sub" / "a.jpg")
    shutil.copy(pictures[4], media / "sub__a.jpg")
    _, out = run_infer(root, media, "infer.save_images=false", "infer.crop_padding=0")
    rows = pd.read_csv(out / "predictions.csv")
    crops = sorted(p.relative_to(out / "crops").as_posix() for p in (out / "crops").rglob("*.jpg"))
    assert len(crops) == len(rows) > 0  # one file per detection: none written over another's
    for file, detections in rows.groupby("file"):
        key = file.removesuffix(".jpg")
        mine = [c for c in crops if c.split("/", 1)[1].rsplit("_", 1)[0] == key]
        assert len(mine) == len(detections), file


def test_rerun_keeps_the_users_files_and_names_them(project, tmp_path):
    root, pictures = project
    media = tmp_path / "again"
    media.mkdir()
    for picture in pictures[:3]:
        shutil.copy(picture, media / picture.name)
    _, out = run_infer(root, media)
    (out / "my_notes.txt").write_text("notes")
    (out / "mine").mkdir()
    (out / "mine" / "keep.txt").write_text("keep")
    (out / "labels" / "reviewed.txt").write_text("the user's review")
    (media / pictures[2].name).unlink()  # the second run has no outputs for it
    messages: list[str] = []
    sink = logger.add(messages.append, level="INFO", format="{message}")
    try:
        _, again = run_infer(root, media)
    finally:
        logger.remove(sink)
    assert again == out
    assert (out / "my_notes.txt").read_text() == "notes" and (out / "mine" / "keep.txt").read_text() == "keep"
    assert (out / "labels" / "reviewed.txt").read_text() == "the user's review"
    assert not list(out.rglob(f"{pictures[2].stem}*"))  # the removed input's outputs went with it
    assert any("kept 3 file(s)" in m and "my_notes.txt" in m for m in messages)


def test_video_cut_midway_is_partial_and_counted_apart(project, tmp_path):
    """A video whose middle is overwritten decodes only its first frames: kept as far as it was read, listed
    as partial, with a warning; an unreadable one is failed; the good one alone counts in "videos"."""
    root, _ = project
    media = tmp_path / "videos"
    make_video(media / "good.mp4", frames=5)
    damaged = bytearray(make_video(media / "cut.mp4", frames=45).read_bytes())
    frames_end = damaged.find(b"moov")  # the frame data comes first, the index (with the count) last
    start, length = frames_end // 3, frames_end // 6
    damaged[start : start + length] = bytes(length)  # decodes up to here, then the decoder stops
    (media / "cut.mp4").write_bytes(damaged)
    (media / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 255, 4096, np.uint8).tobytes())
    warnings: list[str] = []
    sink = logger.add(warnings.append, level="WARNING", format="{message}")
    try:
        summary, out = run_infer(root, media, "infer.save_crops=false")
    finally:
        logger.remove(sink)
    assert (summary["videos"], summary["partial_videos"], summary["failed_videos"]) == (1, 1, 1)
    (reason,) = summary["partial"].values()
    assert list(summary["partial"]) == [str(media / "cut.mp4")] and "of the 45 frames" in reason
    assert list(summary["failed"]) == [str(media / "noise.mp4")]
    read = int(reason.split()[1])
    assert 0 < read < 45 and summary["video_frames"] == 5 + read
    capture = cv2.VideoCapture(str(out / "videos" / "cut.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == read  # what was read is kept
    capture.release()
    assert any("cut.mp4" in w and "of 45 frames" in w for w in warnings)


def test_result_folders_follow_the_umask(project, tmp_path):
    root, pictures = project
    media = tmp_path / "modes"
    media.mkdir()
    shutil.copy(pictures[0], media / "a.jpg")
    old = os.umask(0o022)
    try:
        _, out = run_infer(root, media)
    finally:
        os.umask(old)
    for path in [out, out / "labels", out / "images", next((out / "crops").iterdir())]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    assert stat.S_IMODE((out / "predictions.json").stat().st_mode) == 0o644
