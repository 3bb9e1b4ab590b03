"""Segmentation through the evaluation and infer stages: infer draws masks, writes YOLO-seg polygons and
instance-id PNGs; bench reports mask mAP; check_errors matches by mask IoU; tracking keeps masks. On a tiny
segmentation checkpoint (deterministic weights, tests/helpers/deploy_data.py) over demo data whose labels the test
turns into polygons, plus hand-made detections where the numbers must be exact."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from src.common.experiment import exp_dir
from src.common.masks import polygon_to_mask
from src.etl.labels import parse_yolo_text, read_yolo_labels
from src.runtime.detector import Detections
from src.runtime.evaluate import LabelledImage
from tests.helpers.deploy_data import CLASS_NAMES, deploy_config, make_checkpoint, make_data, make_video

LOW_CONF = "0.2"  # the deterministic weights score every query ~0.75: every image gets detections


def diamond_polygons(labels_dir: Path) -> int:
    """Rewrite every box line as the diamond through its edge midpoints (same bounding box): a polygon
    data set whose masks differ from their boxes. Returns the number of polygons written."""
    count = 0
    for path in sorted(labels_dir.glob("*.txt")):
        lines = []
        for line in path.read_text().splitlines():
            c, cx, cy, w, h = line.split()
            cx, cy, w, h = (float(v) for v in (cx, cy, w, h))
            points = [cx, cy - h / 2, cx + w / 2, cy, cx, cy + h / 2, cx - w / 2, cy]
            lines.append(" ".join([c, *(f"{v:.6f}" for v in points)]))
            count += 1
        path.write_text("".join(f"{line}\n" for line in lines))
    return count


def seg_config(root: Path, *overrides: str):
    return deploy_config(root, "model.task=segment", *overrides)


@pytest.fixture(scope="module")
def seg_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    cfg = seg_config(root)
    make_data(cfg)
    assert diamond_polygons(Path(cfg.data_path) / "labels") > 0
    return root, make_checkpoint(cfg, task="segment")


def test_infer_writes_polygons_masks_and_drawings(seg_project):
    from src.dl import infer

    root, checkpoint = seg_project
    media = root / "media"
    media.mkdir()
    for image in sorted((root / "data" / "images").glob("*.jpg"))[:2]:
        (media / image.name).write_bytes(image.read_bytes())
    make_video(media / "clip.mp4", frames=3, size=(96, 72), fps=10.0)
    cfg = seg_config(
        root, f"infer.input={media}", f"infer.model_path={checkpoint}", f"infer.conf={LOW_CONF}",
        "infer.save_masks=true", "infer.save_crops=false", "infer.track=true",
    )  # fmt: skip
    summary = infer.run(cfg)
    out = Path(summary["out_dir"])
    assert summary["task"] == "segment" and summary["images"] == 2 and summary["video_frames"] == 3
    rows = pd.read_csv(out / "predictions.csv")

    polygon_lines = 0
    for label_path in sorted((out / "labels").glob("*.txt")):
        parsed = read_yolo_labels(label_path, len(CLASS_NAMES))
        assert not [p for p in parsed.problems if p.severity == "fatal"], parsed.problems
        detections = rows[rows["file"] == label_path.stem + ".jpg"].reset_index(drop=True)
        assert len(parsed.class_ids) == len(detections) > 0  # one line per detection, in the same order
        assert parsed.class_ids.tolist() == detections["class_id"].tolist()

        ids = cv2.imread(str(out / "masks" / f"{label_path.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert ids.dtype == np.uint8 and ids.shape == (
            int(detections["image_h"][0]),
            int(detections["image_w"][0]),
        )
        assert set(np.unique(ids).tolist()) <= set(range(len(detections) + 1))
        for i, polygon in enumerate(parsed.polygons):
            if polygon is None:  # a mask too small to outline keeps its box line
                continue
            polygon_lines += 1
            mask = polygon_to_mask(polygon, *ids.shape)
            x1, y1, x2, y2 = detections.loc[i, ["x1", "y1", "x2", "y2"]]
            ys, xs = np.nonzero(mask)  # the outline lies within the detection's box (masks are cut to it)
            assert xs.min() >= np.floor(x1) - 1 and xs.max() <= np.ceil(x2) and ys.min() >= np.floor(y1) - 1
            assert ys.max() <= np.ceil(y2)
            if i == 0:  # the top detection is never painted over: its PNG pixels are its polygon's
                overlap = (mask & (ids == 1)).sum() / max(1, (mask | (ids == 1)).sum())
                assert overlap > 0.8
    assert polygon_lines > 0

    drawn = cv2.imread(str(next((out / "images").glob("*.jpg"))))
    assert drawn is not None
    video = cv2.VideoCapture(str(out / "videos" / "clip.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    video.release()
    assert (out / "tracks" / "clip.txt").exists()
    assert json.loads((out / "predictions.json").read_text())["task"] == "segment"


def test_bench_reports_mask_map(seg_project):
    from src.dl import bench, export

    root, _ = seg_project
    export.run(
        seg_config(root, "export.formats=[onnx]", "export.check_parity=false", "export.simplify=false")
    )
    cfg = seg_config(root, "bench.backends=[torch,onnx]", "bench.save_images=1")
    frame = bench.run(cfg)
    assert frame["backend"].tolist() == ["torch", "onnx"]
    assert frame["mask_mAP_50"].tolist() == pytest.approx([frame["mask_mAP_50"].iloc[0]] * 2)  # same model
    columns = frame.columns.tolist()
    assert columns.index("mask_mAP_50") == columns.index("mAP_50_95") + 1
    masks = frame[["mask_mAP_50", "mask_mAP_50_95"]]
    assert ((masks >= 0) & (masks <= 1)).all().all()
    assert (frame["mask_mAP_50"] >= frame["mask_mAP_50_95"]).all()
    saved = pd.read_csv(exp_dir(cfg) / "bench.csv")
    assert {"mask_mAP_50", "mask_mAP_50_95"} <= set(saved.columns)
    assert all(len(list((exp_dir(cfg) / "bench" / b).glob("*.jpg"))) == 1 for b in ("torch", "onnx"))


def test_check_errors_on_a_segmentation_experiment(seg_project):
    from src.dl import check_errors

    root, checkpoint = seg_project
    cfg = seg_config(root, "check_errors.splits=[val]", f"check_errors.model_path={checkpoint}")
    frame = check_errors.run(cfg)
    assert len(frame) > 0 and set(frame["kind"]) <= {"FP", "FN"}
    assert frame["best_iou"].between(0, 1).all()
    assert all(Path(p).exists() for p in frame["picture"].unique())


def _rect(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_check_errors_matches_by_mask_iou():
    """GT: a diamond (polygon) and a square labelled by a box line. A prediction with the diamond's box but
    a full-box mask overlaps it by mask IoU 0.5: at 0.6 it is a FP and the diamond a FN, though the boxes
    agree exactly. The box-line object is still matched by box IoU."""
    from src.dl.check_errors import find_errors

    diamond = np.array([[0.2, 0.1], [0.3, 0.2], [0.2, 0.3], [0.1, 0.2]], np.float32)  # box 10..30 px
    sample = LabelledImage(
        Path("a.jpg"), np.array([[10, 10, 30, 30], [50, 50, 90, 90]], float), np.array([0, 1]), "val",
        polygons=[diamond, None],
    )  # fmt: skip
    full_box = _rect(100, 100, 10, 10, 30, 30)
    dets = Detections(
        boxes=np.array([[10, 10, 30, 30], [50, 50, 90, 90]], np.float32),
        scores=np.array([0.9, 0.8], np.float32),
        labels=np.array([0, 1]),
        names=["circle", "square"],
        image_size=(100, 100),
        masks=np.stack(
            [full_box, _rect(100, 100, 60, 60, 70, 70)]
        ),  # the 2nd mask is far smaller than its box
    )
    fp, fn, iou = find_errors(dets, sample, iou_thresh=0.6)
    assert iou[0, 0] == pytest.approx(0.5, abs=0.03) and iou[1, 1] == pytest.approx(1.0)
    assert fp.tolist() == [True, False] and fn.tolist() == [True, False]
    without_masks = Detections(dets.boxes, dets.scores, dets.labels, dets.names, dets.image_size)
    fp, fn, _ = find_errors(without_masks, sample, iou_thresh=0.6)  # a detection model: boxes agree
    assert not fp.any() and not fn.any()


def test_yolo_text_polygons_box_fallback_and_detect_lines():
    from src.runtime.outputs import yolo_text

    boxes = np.array([[10, 20, 50, 60], [0, 0, 8, 8]], np.float32)
    dets = Detections(
        boxes, np.array([0.9, 0.5], np.float32), np.array([2, 0]), ["triangle", "circle"], (100, 200),
        masks=np.stack([_rect(100, 200, 10, 20, 50, 60), np.zeros((100, 200), bool)]),
    )  # fmt: skip
    parsed = parse_yolo_text(yolo_text(dets, with_scores=False), "p.txt", len(CLASS_NAMES))
    assert not parsed.problems and parsed.class_ids.tolist() == [2, 0]
    assert parsed.polygons[1] is None  # an empty mask keeps its box line
    # the outline runs a quarter pixel inside the mask edge (common.masks.mask_to_polygon): box within 1 px
    np.testing.assert_allclose(parsed.boxes[0], [30 / 200, 40 / 100, 40 / 200, 40 / 100], atol=0.01)
    assert polygon_to_mask(parsed.polygons[0], 100, 200).sum() == dets.masks[0].sum()

    boxes_only = Detections(dets.boxes, dets.scores, dets.labels, dets.names, dets.image_size)
    lines = yolo_text(boxes_only, with_scores=False).splitlines()
    assert [len(line.split()) for line in lines] == [5, 5]  # a detection model: box lines, as before


def test_instance_id_image_higher_score_wins_and_uint16():
    from src.runtime.outputs import instance_id_image

    first, second = _rect(20, 30, 0, 0, 10, 10), _rect(20, 30, 5, 5, 20, 15)
    dets = Detections(
        np.zeros((2, 4), np.float32), np.array([0.9, 0.4], np.float32), np.array([0, 1]), ["a", "b"],
        (20, 30), np.stack([first, second]),
    )  # fmt: skip
    ids = instance_id_image(dets)
    assert ids.dtype == np.uint8
    assert ids[7, 7] == 1 and ids[12, 12] == 2 and ids[19, 29] == 0  # overlap: the higher score's id

    many = 300
    masks = np.zeros((many, 20, 30), bool)
    masks[many - 1, 0, 0] = True
    crowd = Detections(
        np.zeros((many, 4), np.float32), np.linspace(1, 0.1, many, dtype=np.float32), np.zeros(many, np.int64),
        ["a"] * many, (20, 30), masks,
    )  # fmt: skip
    ids = instance_id_image(crowd)
    assert ids.dtype == np.uint16 and ids[0, 0] == many


def test_tracking_keeps_masks_of_confident_detections():
    from src.runtime.tracking import TrackerSettings, VideoTracks

    settings = TrackerSettings(
        low_conf=0.1, match_iou=0.2, low_match_iou=0.5, confirm_frames=1, max_lost_frames=5
    )
    tracks = VideoTracks(settings, np.array([0.5, 0.5]), ["a", "b"], None)
    masks = np.stack([_rect(80, 80, 40, 40, 60, 60), _rect(80, 80, 5, 60, 15, 70)])
    dets = Detections(
        np.array([[40, 40, 60, 60], [5, 60, 15, 70]], np.float32), np.array([0.9, 0.3], np.float32),
        np.array([0, 1]), ["a", "b"], (80, 80), masks,
    )  # fmt: skip
    frame = tracks.frame(0, np.zeros((80, 80, 3), np.uint8), dets)
    assert len(frame.dets) == 1 and (frame.dets.masks == masks[:1]).all()  # the confident one reported
    assert frame.track_ids.tolist() == [1]
    assert frame.picture[50, 50].any()  # inside the tracked box: only its filled mask colours it
    assert not frame.picture[65, 10].any()  # the low-score detection only continues tracks: not drawn


def test_mask_scores_against_polygons_box_lines_left_out():
    """Predictions equal to the rasterised GT polygons score mask mAP 1 even beside a box-line object (no
    mask to score); a wrong-shaped mask lowers it; labels without any polygon give no mask metrics."""
    from src.metrics.masks import encode_masks
    from src.runtime.evaluate import mask_scores

    diamond = np.array([[0.2, 0.1], [0.3, 0.2], [0.2, 0.3], [0.1, 0.2]], np.float32)
    sample = LabelledImage(
        Path("a.jpg"), np.array([[10, 10, 30, 30], [50, 50, 90, 90]], float), np.array([0, 1]), "val", 0,
        polygons=[diamond, None],
    )  # fmt: skip
    gt = sample.masks(100, 100)
    assert gt[0].sum() > 0 and not gt[1].any() and sample.has_mask.tolist() == [True, False]
    dets = Detections(
        sample.boxes.astype(np.float32), np.array([0.9, 0.8], np.float32), np.array([0, 1]), ["a", "b"],
        (100, 100),
    )  # fmt: skip
    perfect = mask_scores([dets], [encode_masks(gt)], [sample], num_classes=2)
    assert perfect["mask_mAP_50"] == pytest.approx(1.0) and perfect["mask_mAP_50_95"] == pytest.approx(1.0)
    boxy = np.stack([_rect(100, 100, 10, 10, 30, 30), gt[1]])  # the diamond's box as its mask: IoU ~0.5
    assert mask_scores([dets], [encode_masks(boxy)], [sample], 2)["mask_mAP_50_95"] < 0.5

    box_lines = LabelledImage(sample.path, sample.boxes, sample.labels, "val", 0)
    assert mask_scores([dets], [encode_masks(gt)], [box_lines], 2) == {}


class GroundTruthRunner:
    """A backend that answers each image with its own labels (a perfect segmentation model), in network
    pixels as a real graph does: the Detector's real pre/post-processing must map boxes and masks back."""

    backend, batch_size, device, precision = "ground-truth", 1, "cpu", "fp32"

    def __init__(self, meta, samples: list[LabelledImage]):
        self.meta, self.queue = meta, list(samples)

    def __call__(self, images: np.ndarray, sizes: np.ndarray):
        from src.common.network_input import boxes_xyxy_to_network, letterbox_or_resize

        sample = self.queue.pop(0)
        _, letterbox = letterbox_or_resize(sample.read_image(), self.meta.img_size, self.meta.keep_ratio)
        scale = np.array([letterbox.orig_w * letterbox.scale_x, letterbox.orig_h * letterbox.scale_y])
        pad, net = np.array([letterbox.pad_x, letterbox.pad_y]), np.array([letterbox.net_w, letterbox.net_h])
        logits = np.stack(
            [np.where(polygon_to_mask((p * scale + pad) / net, letterbox.net_h, letterbox.net_w), 10.0, -10.0)
             for p in sample.polygons]
        ).astype(np.float32)  # fmt: skip
        boxes = boxes_xyxy_to_network(sample.boxes, letterbox).astype(np.float32)
        scores = np.full(len(boxes), 0.9, np.float32)
        return sample.labels[None], boxes[None], scores[None], logits[None]


@pytest.mark.parametrize("keep_ratio", [False, True])
def test_evaluation_of_a_perfect_segmentation_model_scores_mask_map_one(seg_project, keep_ratio):
    """The evaluation loop end to end: GT polygons -> masks at the original size, the model's masks kept
    as RLE, mask mAP beside box mAP (a misaligned or mis-sized mask on either side would score low), with
    a plain resize and a letterbox."""
    from dataclasses import replace

    from src.dl.split_samples import load_split_samples
    from src.runtime import load_model
    from src.runtime.detector import Detector
    from src.runtime.evaluate import evaluate_detector

    root, checkpoint = seg_project
    samples = [s for s in load_split_samples(seg_config(root), "val") if len(s.labels)]
    assert samples and all(s.has_mask.all() for s in samples)
    meta = replace(load_model(checkpoint).meta, keep_ratio=keep_ratio)
    detector = Detector(GroundTruthRunner(meta, samples))
    result = evaluate_detector(detector, samples)
    assert result.metrics["mAP_50"] == pytest.approx(1.0)
    assert result.metrics["mask_mAP_50"] == pytest.approx(1.0)
    assert result.metrics["mask_mAP_50_95"] > 0.8  # 0.90: masks resampled through a 96 px input
    assert result.detections[0].masks is None and len(result.mask_rles) == len(samples)  # kept as RLE
    first = result.with_masks(0)
    assert first.masks.shape == (len(first), *first.image_size)
    assert {"mask_mAP_50", "mask_mAP_50_95"} <= set(result.summary())


class FixedRunner:
    """A segmentation backend that answers every image with the same K queries (network pixels)."""

    backend, batch_size, device, precision = "fixed", 1, "cpu", "fp32"

    def __init__(self, meta, queries: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        h, w = meta.img_size
        x0, y0 = rng.uniform(0, w / 2, queries), rng.uniform(0, h / 2, queries)
        boxes = np.stack(
            [x0, y0, x0 + rng.uniform(8, w / 2, queries), y0 + rng.uniform(8, h / 2, queries)], 1
        )
        self.meta = meta
        self.outputs = (
            rng.integers(0, len(meta.class_names), (1, queries)),
            boxes[None].astype(np.float32),
            rng.uniform(0.01, 1.0, (1, queries)).astype(np.float32),
            rng.normal(0, 1, (1, queries, h // 4, w // 4)).astype(np.float32),
        )

    def __call__(self, images: np.ndarray, sizes: np.ndarray):
        return self.outputs


def test_evaluation_masks_only_the_best_detections(seg_project):
    """A segmentation model's evaluation makes masks for the MAX_MASKS best detections scoring at least
    MIN_MASK_SCORE (what training's validation scores): the same masks a full prediction gives them, empty
    ones below; every detection is still listed."""
    from src.metrics.masks import MAX_MASKS, MIN_MASK_SCORE
    from src.runtime import load_model
    from src.runtime.detector import Detector
    from src.runtime.evaluate import decode_masks, masked_count, predict_for_evaluation

    _, checkpoint = seg_project
    runner = FixedRunner(load_model(checkpoint).meta, queries=MAX_MASKS + 20)
    detector = Detector(runner)
    image = np.full((72, 120, 3), 100, np.uint8)
    full = detector.predict([image], conf=0.0)[0]
    dets, rles, ms = predict_for_evaluation(detector, image, min_conf=0.0)
    assert len(dets) == len(full) == MAX_MASKS + 20 and dets.masks is None and ms > 0
    np.testing.assert_array_equal(dets.scores, full.scores)
    masks = decode_masks(rles, (72, 120))
    assert masked_count(dets) == MAX_MASKS and masks[:MAX_MASKS].any()
    assert (masks[:MAX_MASKS] == full.masks[:MAX_MASKS]).all() and not masks[MAX_MASKS:].any()

    runner.outputs[2][0, 30:] = MIN_MASK_SCORE / 2  # all but 30 detections under the mask score floor
    dets, rles, _ = predict_for_evaluation(detector, image, min_conf=0.0)
    masks = decode_masks(rles, (72, 120))
    assert len(dets) == MAX_MASKS + 20 and masked_count(dets) == 30
    assert masks[:30].any() and not masks[30:].any()
