"""etl.labels: the one YOLO-txt reader/validator/writer."""

from __future__ import annotations

import numpy as np
import pytest

from src.etl.labels import (
    FATAL,
    WARNING,
    label_path_for,
    parse_yolo_text,
    read_yolo_labels,
    write_yolo_labels,
)


def test_box_and_polygon_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("0 0.5 0.5 0.2 0.4\n\n2 0.1 0.2 0.5 0.2 0.3 0.6\n")
    labels = read_yolo_labels(path, num_classes=3)
    assert labels.problems == [] and labels.exists
    assert labels.boxes.dtype == np.float32 and labels.class_ids.dtype == np.int64
    np.testing.assert_allclose(labels.boxes, [[0.5, 0.5, 0.2, 0.4], [0.3, 0.4, 0.4, 0.4]], atol=1e-6)
    assert labels.class_ids.tolist() == [0, 2]


def test_missing_and_empty_files_are_background(tmp_path):
    missing = read_yolo_labels(tmp_path / "none.txt", 3)
    assert (
        not missing.exists
        and missing.is_background
        and missing.boxes.shape == (0, 4)
        and not missing.problems
    )
    (tmp_path / "empty.txt").write_text("\n  \n")
    empty = read_yolo_labels(tmp_path / "empty.txt", 3)
    assert empty.exists and empty.is_background and not empty.problems


def test_bom_and_commas_tolerated(tmp_path):
    path = tmp_path / "b.txt"
    path.write_bytes("\ufeff1,0.5,0.5,0.1,0.1\r\n".encode())
    labels = read_yolo_labels(path, 2)
    assert labels.class_ids.tolist() == [1] and not labels.problems


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.2", "expected 5 fields"),
        ("0 0.5 0.5 0.2 0.2 0.9", "expected 5 fields"),  # 6 fields: e.g. a prediction file with scores
        ("0 0.1 0.1 0.2 0.2 0.3", "expected 5 fields"),  # odd polygon
        ("cat 0.5 0.5 0.2 0.2", "class id 'cat' is not a number"),
        ("1.5 0.5 0.5 0.2 0.2", "not a whole number"),
        ("0 0.5 abc 0.2 0.2", "coordinate 'abc' is not a number"),
        ("0 0.5 nan 0.2 0.2", "nan or inf"),
        ("7 0.5 0.5 0.2 0.2", "class id 7 is not in label_to_name (valid ids: 0..2)"),
        ("-1 0.5 0.5 0.2 0.2", "class id -1 is not in label_to_name"),
        ("0 0.5 0.5 0 0.2", "width/height must be > 0"),
        ("0 0.5 0.5 0.2 -0.1", "width/height must be > 0"),
        ("0 0.9 0.5 0.4 0.2", "outside [0, 1] by 0.1"),
        ("0 320 240 50 60", "look like pixel coordinates"),
        ("0 0.1 0.1 0.5 0.1 0.9 0.1", "zero width or height"),  # flat polygon
    ],
)
def test_bad_lines_are_fatal_with_line_number(line, message):
    labels = parse_yolo_text(f"0 0.5 0.5 0.1 0.1\n{line}\n", "labels/x.txt", num_classes=3)
    fatal = [p for p in labels.problems if p.severity == FATAL]
    assert len(fatal) == 1 and fatal[0].line == 2 and message in fatal[0].message, labels.problems
    assert str(fatal[0]).startswith("labels/x.txt:2: fatal:")
    assert labels.class_ids.tolist() == [0]  # the good line still counts
    assert labels.has_fatal


def test_tiny_excursion_clipped_with_warning():
    labels = parse_yolo_text("0 0.995 0.5 0.02 0.2\n", "x.txt", 1, clip_tolerance=0.01)
    assert [p.severity for p in labels.problems] == [WARNING] and "clipped" in labels.problems[0].message
    x1, x2 = labels.boxes[0, 0] - labels.boxes[0, 2] / 2, labels.boxes[0, 0] + labels.boxes[0, 2] / 2
    assert x1 == pytest.approx(0.985, abs=1e-6) and x2 == pytest.approx(1.0, abs=1e-6)
    assert parse_yolo_text("0 0.995 0.5 0.02 0.2\n", "x.txt", 1, clip_tolerance=0.001).has_fatal


def test_class_id_written_as_float_is_read_with_warning():
    labels = parse_yolo_text("2.0 0.5 0.5 0.1 0.1\n", "x.txt", 3)
    assert labels.class_ids.tolist() == [2] and labels.problems[0].severity == WARNING


def test_binary_file_is_fatal(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81garbage")
    labels = read_yolo_labels(tmp_path / "bin.txt", 3)
    assert labels.has_fatal and labels.problems[0].line is None and "UTF-8" in labels.problems[0].message


def test_write_read_round_trip(tmp_path):
    boxes = np.array([[0.25, 0.5, 0.1, 0.2], [0.75, 0.25, 0.3, 0.4]])
    path = write_yolo_labels(tmp_path / "labels" / "r.txt", [3, 1], boxes)
    labels = read_yolo_labels(path, 4)
    np.testing.assert_allclose(labels.boxes, boxes, atol=1e-6)
    assert labels.class_ids.tolist() == [3, 1]
    assert write_yolo_labels(tmp_path / "bg.txt", [], np.zeros((0, 4))).read_text() == ""


def test_label_path_for(tmp_path):
    assert label_path_for(tmp_path / "images" / "a.b.PNG") == tmp_path / "labels" / "a.b.txt"
    assert label_path_for("x/images/c.jpg", tmp_path / "other") == tmp_path / "other" / "c.txt"


def test_polygons_are_kept_beside_boxes_and_written_back(tmp_path):
    """A YOLO-seg line keeps its polygon (normalised, clipped), a box line has None; writing the parsed
    objects back gives the same file."""
    text = "0 0.1 0.2 0.5 0.2 0.3 0.6\n1 0.5 0.5 0.2 0.4\n0 -0.005 0.1 0.4 0.1 0.4 0.5 0.0 0.5\n"
    labels = parse_yolo_text(text, "x.txt", num_classes=2)
    assert [p.severity for p in labels.problems] == [WARNING]  # the small excursion, clipped
    assert labels.has_polygons and labels.has_boxes_only
    assert labels.polygons[1] is None and labels.polygons[0].shape == (3, 2)
    assert labels.polygons[0].dtype == np.float32 and labels.polygons[2].min() == 0.0
    write_yolo_labels(tmp_path / "y.txt", labels.class_ids, labels.boxes, labels.polygons)
    again = read_yolo_labels(tmp_path / "y.txt", 2)
    assert not again.problems and again.class_ids.tolist() == [0, 1, 0]
    np.testing.assert_allclose(again.boxes, labels.boxes, atol=1e-6)
    for a, b in zip(again.polygons, labels.polygons, strict=True):
        assert (a is None and b is None) or np.allclose(a, b, atol=1e-6)


def test_polygon_zero_area_is_fatal_and_crossing_is_a_warning():
    labels = parse_yolo_text(
        "0 0.1 0.1 0.3 0.3 0.5 0.5 0.2 0.2\n"  # all points on one line (a diagonal): zero area
        "0 0.1 0.1 0.5 0.5 0.5 0.1 0.1 0.5\n",  # a bow tie: crosses itself, still covers pixels
        "x.txt",
        num_classes=1,
    )
    by_line = {p.line: p for p in labels.problems}
    assert by_line[1].severity == FATAL and "zero area" in by_line[1].message
    assert by_line[2].severity == WARNING and "crosses itself" in by_line[2].message
    assert labels.class_ids.tolist() == [0] and labels.polygons[0].shape == (4, 2)
