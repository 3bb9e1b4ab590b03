"""etl.check, the dataset doctor: every kind of bad input is named with file and line; nothing is deleted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from src.common.config import ROOT
from src.etl import check
from src.etl.data_quality import segmentation_summary
from src.etl.doctor import DatasetError, check_dataset
from tests.etl_data import etl_config, make_dataset, save_image

GOOD = "0 0.5 0.5 0.2 0.2\n3 0.25 0.25 0.1 0.1\n"


def good_dataset(root):
    return make_dataset(root, {"a.jpg": GOOD, "b.png": "1 0.5 0.5 0.3 0.3\n", "c.jpg": None, "d.jpg": ""})


def test_clean_dataset_report(tmp_path):
    data = good_dataset(tmp_path / "data")
    report = check.run(etl_config(tmp_path, data))
    summary = report.summary()
    assert summary["images"] == 4 and summary["usable_images"] == 4
    assert summary["background_images"] == 2 and summary["labelled_images"] == 2  # no file / empty file
    assert summary["boxes"] == 3 and summary["boxes_per_class"] == {
        "circle": 1,
        "square": 1,
        "triangle": 0,
        "star": 1,
    }
    assert not report.problems
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["usable_images"] == ["a.jpg", "b.png", "c.jpg", "d.jpg"] and saved["summary"]["boxes"] == 3
    assert list(pd.read_csv(tmp_path / "report" / "report.csv").columns) == [
        "file",
        "line",
        "severity",
        "message",
    ]
    assert "4 usable" in report.text()


BAD_LABELS = {
    "fields.jpg": (GOOD + "1 0.5 0.5\n", 3, "expected 5 fields"),
    "text.jpg": ("x 0.5 0.5 0.2 0.2\n", 1, "not a number"),
    "class.jpg": (GOOD + "9 0.5 0.5 0.2 0.2\n", 3, "class id 9 is not in label_to_name"),
    "outside.jpg": ("0 1.3 0.5 0.2 0.2\n", 1, "outside [0, 1]"),
    "flat.jpg": ("0 0.5 0.5 0.0 0.2\n", 1, "width/height must be > 0"),
}


@pytest.mark.parametrize("name", sorted(BAD_LABELS))
def test_bad_label_stops_with_file_and_line(tmp_path, name):
    text, line, message = BAD_LABELS[name]
    data = make_dataset(tmp_path / "data", {"ok.jpg": GOOD, name: text})
    with pytest.raises(DatasetError) as info:
        check_dataset(etl_config(tmp_path, data))
    stem = name.removesuffix(".jpg")
    if (
        name == "class.jpg"
    ):  # a config mismatch: its own message, not skippable (tests/test_etl_robustness.py)
        assert f"labels/{stem}.txt:{line}" in str(info.value) and "not named in label_to_name" in str(
            info.value
        )
    else:
        assert f"labels/{stem}.txt:{line}: fatal: " in str(info.value) and message in str(info.value)
        assert "check.skip_bad=true" in str(info.value)
    assert (data / "images" / name).exists() and (data / "labels" / f"{stem}.txt").read_text() == text
    assert (tmp_path / "report" / "report.json").exists()  # the report is written before stopping


def test_unreadable_and_truncated_images(tmp_path):
    data = good_dataset(tmp_path / "data")
    (data / "images" / "junk.jpg").write_bytes(b"\x00" * 64)
    (data / "images" / "cut.jpg").write_bytes((data / "images" / "a.jpg").read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"junk\.jpg: fatal: cannot read image") as info:
        check_dataset(etl_config(tmp_path, data))
    assert "cut.jpg: fatal: cannot read image" in str(info.value) and "truncated" in str(info.value)
    assert (data / "images" / "junk.jpg").exists() and (data / "images" / "cut.jpg").exists()


def test_skip_bad_excludes_and_lists(tmp_path):
    data = make_dataset(tmp_path / "data", {"ok.jpg": GOOD, "bad.jpg": "0 0.5 0.5 0.2\n", "bg.jpg": None})
    (data / "images" / "junk.png").write_bytes(b"nope")
    report = check_dataset(etl_config(tmp_path, data, "check.skip_bad=true"))
    assert report.usable_images == ["bg.jpg", "ok.jpg"]
    assert report.excluded_images == ["bad.jpg", "junk.png"]
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(saved["excluded_images"]) == {"bad.jpg", "junk.png"}
    assert "bad.txt:1" in saved["excluded_images"]["bad.jpg"][0]
    assert "not usable (fatal problems): bad.jpg, junk.png" in report.text()
    assert (data / "labels" / "bad.txt").exists()


def test_nothing_usable_is_an_error(tmp_path):
    data = make_dataset(tmp_path / "data", {"bad.jpg": "0 0.5 0.5 0.2\n"})
    with pytest.raises(DatasetError, match="no usable image"):
        check_dataset(etl_config(tmp_path, data, "check.skip_bad=true"))


def test_warnings_do_not_stop(tmp_path):
    data = good_dataset(tmp_path / "data")
    (data / "labels" / "ghost.txt").write_text(GOOD)  # orphan
    (data / "labels" / "a.txt").write_text("0 0.995 0.5 0.02 0.2\n")  # clipped
    shutil.copy(data / "images" / "b.png", data / "images" / "b_copy.png")  # exact duplicate
    (data / "images" / "scan.pdf").write_bytes(b"%PDF")  # not an image
    report = check_dataset(etl_config(tmp_path, data))
    assert not report.fatal and len(report.usable_images) == 5
    messages = "\n".join(str(p) for p in report.warnings)
    assert "ghost.txt: warning: label file without an image" in messages
    assert "a.txt:1: warning: coordinates outside [0, 1] by 0.005; clipped" in messages
    assert "exact duplicate images: b.png, b_copy.png" in messages
    assert "scan.pdf: warning: not a supported image type" in messages and "etl.preprocess" in messages
    assert report.orphan_labels == ["ghost.txt"] and report.duplicate_groups == [["b.png", "b_copy.png"]]


def test_same_stem_different_extension_is_fatal(tmp_path):
    data = good_dataset(tmp_path / "data")
    save_image(data / "images" / "a.png", seed=99)
    with pytest.raises(DatasetError, match=r"a\.jpg, a\.png share the stem 'a'"):
        check_dataset(etl_config(tmp_path, data))


def test_empty_or_missing_dataset(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty data set"):
        check_dataset(etl_config(tmp_path, tmp_path / "empty"))
    with pytest.raises(DatasetError, match="no images folder"):
        check_dataset(etl_config(tmp_path, tmp_path / "nowhere"))


def test_missing_labels_folder_means_background(tmp_path):
    data = good_dataset(tmp_path / "data")
    shutil.rmtree(data / "labels")
    report = check_dataset(etl_config(tmp_path, data))
    assert report.summary()["background_images"] == 4 and "no labels folder" in str(report.warnings[0])


def test_cli_exit_code_and_message(tmp_path):
    data = make_dataset(tmp_path / "data", {"ok.jpg": GOOD, "bad.jpg": "3 0.5 0.5 0.2 0.2 7\n"})
    command = [
        sys.executable,
        "-m",
        "src.etl.check",
        f"data_path={data}",
        f"check.report_dir={tmp_path / 'r'}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "bad.txt:1: fatal: expected 5 fields" in result.stderr


# ---------------------------------------------------------------- YOLO-seg polygons

TRIANGLE = "0 0.1 0.1 0.9 0.1 0.5 0.8"
BAD_POLYGONS = {
    "odd.jpg": f"{TRIANGLE}\n1 0.1 0.1 0.9 0.1 0.5\n",  # line 2: 5 coordinates (odd)
    "nan.jpg": "2 0.1 0.1 nan 0.1 0.5 0.8\n",
    "outside.jpg": "0 0.1 0.1 1.6 0.1 0.5 0.8\n",
    "flat.jpg": f"{TRIANGLE}\n{TRIANGLE}\n0 0.1 0.1 0.5 0.5 0.9 0.9\n",  # line 3: all points on one line
    "bowtie.jpg": "3 0.1 0.1 0.9 0.9 0.9 0.1 0.1 0.9\n",  # crosses itself: a warning only
    "good.jpg": f"{TRIANGLE}\n1 0.5 0.5 0.2 0.2\n",  # a polygon and a box line
}


def test_polygon_problems_named_by_file_and_line(tmp_path):
    data = make_dataset(tmp_path / "data", BAD_POLYGONS)
    report = check_dataset(etl_config(tmp_path, data, "check.skip_bad=true"))
    found = {(Path(p.file).name, p.line, p.severity) for p in report.problems}
    assert {
        ("odd.txt", 2, "fatal"),
        ("nan.txt", 1, "fatal"),
        ("outside.txt", 1, "fatal"),
        ("flat.txt", 3, "fatal"),
        ("bowtie.txt", 1, "warning"),
    } <= found
    messages = {Path(p.file).name: p.message for p in report.problems}
    assert "polygon" in messages["odd.txt"] and "zero area" in messages["flat.txt"]
    assert "crosses itself" in messages["bowtie.txt"] and "nan" in messages["nan.txt"]
    # skip_bad leaves out exactly the images with a fatal line, as for boxes
    assert sorted(report.excluded_images) == ["flat.jpg", "nan.jpg", "odd.jpg", "outside.jpg"]
    assert sorted(report.usable_images) == ["bowtie.jpg", "good.jpg"]
    with pytest.raises(DatasetError, match=r"odd\.txt:2: fatal: expected 5 fields .* or a polygon"):
        check_dataset(etl_config(tmp_path, data))


def test_segmentation_counts_per_split_and_box_only_warning(tmp_path, caplog_loguru):
    labels = {f"p{i}.jpg": f"{TRIANGLE}\n{TRIANGLE}\n" for i in range(4)}
    labels |= {
        "mixed.jpg": f"{TRIANGLE}\n1 0.5 0.5 0.2 0.2\n",
        "boxes.jpg": "1 0.5 0.5 0.2 0.2\n",
        "bg.jpg": "",
    }
    data = make_dataset(tmp_path / "data", labels)
    splits = tmp_path / "splits"
    splits.mkdir()
    pd.DataFrame({"image": ["p0.jpg", "p1.jpg", "p2.jpg", "boxes.jpg", "bg.jpg"]}).to_csv(
        splits / "train.csv"
    )
    pd.DataFrame({"image": ["p3.jpg", "mixed.jpg"]}).to_csv(splits / "val.csv")
    cfg = etl_config(tmp_path, data, f"splits_dir={splits}")
    report = check_dataset(cfg)
    assert report.is_segmentation and sorted(report.box_only_images) == ["boxes.jpg", "mixed.jpg"]
    assert report.summary()["polygons"] == 9 and report.summary()["box_only_objects"] == 2
    text = segmentation_summary(cfg, report)
    assert text.splitlines() == [
        "segmentation data set: 9 polygons, 2 box-only objects in 6 files",
        "  train: 6 polygons, 1 box-only objects in 4 files",
        "  val: 3 polygons, 1 box-only objects in 2 files",
        "  test: 0 polygons, 0 box-only objects in 0 files",
    ]
    assert "2 label file(s) of this segmentation data set have box lines" in caplog_loguru.text
    assert "boxes.txt, mixed.txt" in caplog_loguru.text


def test_detection_data_set_has_no_segmentation_summary(tmp_path, caplog_loguru):
    data = good_dataset(tmp_path / "data")
    cfg = etl_config(tmp_path, data)
    report = check_dataset(cfg)
    assert not report.is_segmentation and segmentation_summary(cfg, report) is None
    assert "segmentation" not in caplog_loguru.text
