"""etl.make_demo_data: a synthetic detection set that the doctor accepts, deterministic, never clobbering."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from src.etl import make_demo_data
from src.etl.doctor import check_dataset
from src.etl.labels import read_yolo_labels
from tests.etl_data import etl_config

SMALL = [
    "demo_data.num_images=20",
    "demo_data.num_negatives=3",
    "demo_data.num_videos=1",
    "demo_data.min_size=96",
    "demo_data.max_size=160",
    "demo_data.object_scale=[0.08,0.3]",
]


def small_config(tmp_path, out, *overrides):
    return etl_config(tmp_path, out, f"demo_data.out={out}", *SMALL, *overrides)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("demo")
    out = tmp_path / "demo"
    make_demo_data.run(small_config(tmp_path, out))
    return tmp_path, out


def test_layout_and_doctor(demo):
    tmp_path, out = demo
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == [f"demo_{i:04d}.jpg" for i in range(20)]
    assert sorted(p.name for p in (out / "negatives").iterdir()) == [
        "neg_0000.jpg",
        "neg_0001.jpg",
        "neg_0002.jpg",
    ]
    report = check_dataset(etl_config(tmp_path, out))
    assert not report.problems
    background = [r.image for r in report.records if r.background]
    assert background == ["demo_0009.jpg", "demo_0019.jpg"]  # 10%
    assert (out / "labels" / "demo_0009.txt").read_text() == "" and not (
        out / "labels" / "demo_0019.txt"
    ).exists()
    sizes = {(r.width, r.height) for r in report.records}
    assert len(sizes) > 10 and all(96 <= w <= 160 and 96 <= h <= 160 for w, h in sizes)


def test_objects_sizes_and_counts(demo):
    out = demo[1]
    counts, classes = [], set()
    for path in sorted((out / "labels").glob("*.txt")):
        labels = read_yolo_labels(path, 4)
        if labels.is_background:
            continue
        h, w = cv2.imread(str(out / "images" / f"{path.stem}.jpg")).shape[:2]
        side = labels.boxes[:, 2:] * [w, h]
        assert (side.max(1) >= 0.08 * min(w, h) * 0.7).all() and (side.max(1) <= 0.3 * min(w, h) + 1).all()
        counts.append(len(labels.class_ids))
        classes |= set(labels.class_ids.tolist())
    assert min(counts) >= 1 and max(counts) <= 6 and classes == {0, 1, 2, 3}


def test_bad_object_scale_is_refused(tmp_path):
    with pytest.raises(ValueError, match="demo_data.object_scale"):
        make_demo_data.run(small_config(tmp_path, tmp_path / "bad", "demo_data.object_scale=[0.5,0.2]"))
    assert not (tmp_path / "bad").exists()


def test_video(demo):
    capture = cv2.VideoCapture(str(demo[1] / "videos" / "demo_00.mp4"))
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, frame = capture.read()
    capture.release()
    assert ok and frame.shape == (288, 384, 3) and frames == 45


def test_rerun_is_idempotent_and_cleans_only_its_own_files(demo, tmp_path):
    _, out = demo
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.jpg")}
    (out / "images" / "mine.jpg").write_bytes(
        before[next(iter(before))]
    )  # a user's file inside the demo folder
    make_demo_data.run(small_config(tmp_path, out))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.jpg") if p.name != "mine.jpg"}
    assert after == before
    make_demo_data.run(small_config(tmp_path, out, "demo_data.num_images=12"))
    assert len(list((out / "images").glob("demo_*.jpg"))) == 12 and (out / "images" / "mine.jpg").exists()
    (out / "images" / "mine.jpg").unlink()
    make_demo_data.run(small_config(tmp_path, out))  # back to the module fixture's state


def test_refuses_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a previous demo set"):
        make_demo_data.run(small_config(tmp_path, out))
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_unknown_class_name(tmp_path):
    with pytest.raises(ValueError, match="hexagon"):
        make_demo_data.run(small_config(tmp_path, tmp_path / "d", "label_to_name={0: circle, 1: hexagon}"))


def test_default_set_is_fast_and_balanced(tmp_path):
    out = tmp_path / "full"
    start = time.perf_counter()
    make_demo_data.run(etl_config(tmp_path, out, f"demo_data.out={out}"))
    assert time.perf_counter() - start < 60
    report = check_dataset(etl_config(tmp_path, out))
    assert not report.problems and len(report.records) == 240
    per_class = np.array(list(report.boxes_per_class().values()))
    assert per_class.min() > 0.7 * per_class.max()


def test_class_colors_keep_each_class_in_its_hue_band():
    rng = np.random.default_rng(0)
    for class_id in range(4):
        for _ in range(20):
            bgr = np.uint8([[make_demo_data.class_color(rng, class_id, 4)]])
            hue = float(cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)[0, 0, 0])
            centre = class_id * 45
            assert min(abs(hue - centre), 180 - abs(hue - centre)) <= 10  # +-8 jitter + uint8 rounding


def test_contrast_fix_keeps_the_hue():
    color = make_demo_data.class_color(np.random.default_rng(1), 2, 4)
    under = np.full((8, 8, 3), color, np.uint8)  # same colour underneath: it must change
    fixed = make_demo_data.contrasting(color, under)
    hues = [float(cv2.cvtColor(np.uint8([[c]]), cv2.COLOR_BGR2HSV)[0, 0, 0]) for c in (color, fixed)]
    assert fixed != color and abs(hues[0] - hues[1]) <= 4


# ---------------------------------------------------------------- demo_data.polygons


def drawn_pixels(shape: make_demo_data.Shape, outline: int, height: int, width: int) -> np.ndarray:
    """(H, W) bool: the pixels the shape's paint covers at least half (fill and stroke, anti-aliasing
    included), measured as the drop of the green channel of a pure red shape on white."""
    shape.color = (0, 0, 255)  # BGR red: far from white, so the contrast fix leaves it alone
    canvas = np.full((height, width, 3), 255, np.uint8)
    make_demo_data.draw_shape(canvas, shape, outline)
    return canvas[..., 1] <= 127


def test_polygon_labels_cover_the_drawn_pixels():
    from src.common.masks import polygon_to_mask

    rng = np.random.default_rng(3)
    height, width = 320, 384
    ious = []
    for _ in range(20):  # shapes as the demo places them (default object_scale), every stroke width
        for shape in make_demo_data.place_shapes(
            rng, height, width, list(make_demo_data.SHAPES), 4, (0.1, 0.4), False
        ):
            (polygon,) = make_demo_data.yolo_polygons([shape], height, width)
            label = polygon_to_mask(polygon, height, width)
            drawn = drawn_pixels(shape, int(rng.integers(0, 3)), height, width)
            ious.append((label & drawn).sum() / (label | drawn).sum())
    # The label is the geometric outline; anti-aliasing and the stroke (up to 2 px wide, centred on the
    # outline) paint up to ~1.5 px outside it, which costs small shapes a few points of IoU.
    assert np.mean(ious) > 0.9 and np.min(ious) > 0.6, (np.mean(ious), np.min(ious))
    for kind in make_demo_data.SHAPES:  # a 32-point circle, the corners of the others: fill alone
        shape = make_demo_data.make_shape(rng, kind, 0, np.array([100.3, 99.7]), 100, None)
        (polygon,) = make_demo_data.yolo_polygons([shape], 200, 200)
        label, drawn = polygon_to_mask(polygon, 200, 200), drawn_pixels(shape, 0, 200, 200)
        assert (label & drawn).sum() / (label | drawn).sum() > 0.92, kind  # cv2 AA paints ~0.5 px out


def test_polygon_demo_set_is_the_same_images_with_outlines(demo, tmp_path):
    _, boxes_out = demo
    out = tmp_path / "seg"
    make_demo_data.run(small_config(tmp_path, out, "demo_data.polygons=true"))
    for image in sorted((boxes_out / "images").glob("*.jpg")):
        assert (out / "images" / image.name).read_bytes() == image.read_bytes()
    for path in sorted((boxes_out / "labels").glob("*.txt")):
        boxes, outlines = read_yolo_labels(path, 4), read_yolo_labels(out / "labels" / path.name, 4)
        assert outlines.class_ids.tolist() == boxes.class_ids.tolist()
        assert all(p is not None for p in outlines.polygons) and not outlines.problems
        np.testing.assert_allclose(outlines.boxes, boxes.boxes, atol=2e-6)  # the outline's box is the box
        lines = (out / "labels" / path.name).read_text().splitlines()
        assert {len(line.split()) for line in lines} <= {1 + 2 * n for n in (3, 4, 10, 32)}
    report = check_dataset(etl_config(tmp_path, out))
    assert not report.problems and report.is_segmentation and not report.box_only_images
