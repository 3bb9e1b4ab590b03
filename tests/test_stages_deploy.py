"""Deployment stages end to end on a tiny experiment: infer (images + video), bench, check_errors,
test_batching; plus the error-finding logic of check_errors on hand-made detections."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from src.common.experiment import exp_dir
from src.runtime.detector import Detections
from src.runtime.evaluate import LabelledImage
from tests.helpers.deploy_data import (
    CLASS_NAMES,
    deploy_config,
    exported_experiment,
    make_video,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Tiny experiment, exported to ONNX + OpenVINO (static batch 1, no parity check: test_export does that)."""

    root = tmp_path_factory.mktemp("stages")
    cfg, _ = exported_experiment(
        root, "export.check_parity=false", "export.simplify=false", "export.ov_fp16=false"
    )
    return root, cfg


def test_infer_images_and_video(project):
    from src.dl import infer

    root, _ = project
    media = root / "media"
    for image in sorted((root / "data" / "images").glob("*.jpg"))[:3]:
        target = media / "sub" / image.name.replace(".jpg", ".JPG")  # nested folder, upper-case extension
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image.read_bytes())
    make_video(media / "clip.mp4", frames=5, size=(96, 72), fps=10.0)
    (media / "broken.png").write_bytes(b"not a png")
    cfg = deploy_config(
        root, f"infer.input={media}", "infer.label_scores=true", "infer.crop_padding=3", "infer.conf=0.2"
    )  # the experiment's fastest export: OpenVINO fp32 on CPU
    summary = infer.run(cfg)
    out = exp_dir(cfg) / "infer" / "media"
    assert summary["out_dir"] == str(out)

    assert summary["backend"] == "openvino" and summary["images"] == 3 and summary["videos"] == 1
    assert summary["video_frames"] == 5
    assert list(summary["failed"]) == [str(media / "broken.png")]
    assert len(list((out / "images" / "sub").glob("*.JPG"))) == 3
    labels = sorted((out / "labels" / "sub").glob("*.txt"))
    assert len(labels) == 3
    rows = pd.read_csv(out / "predictions.csv")
    assert len(rows) == summary["detections"] == sum(summary["per_file"].values())
    first = rows[rows["file"] == "sub/" + labels[0].stem + ".JPG"]
    lines = labels[0].read_text().splitlines()
    assert len(lines) == len(first) and all(len(line.split()) == 6 for line in lines)  # class cx cy w h score
    assert (rows["score"] >= 0.2).all()
    assert set(rows["class_name"]) <= set(CLASS_NAMES)
    assert rows[rows["file"] == "clip.mp4"]["frame"].between(0, 4).all()

    crops = list((out / "crops").rglob("*.jpg"))
    assert len(crops) == int(rows["frame"].isna().sum())  # one per image detection (video crops are off)

    video = cv2.VideoCapture(str(out / "videos" / "clip.mp4"))
    assert video.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    assert (video.get(cv2.CAP_PROP_FRAME_WIDTH), video.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (96, 72)
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    video.release()
    assert json.loads((out / "predictions.json").read_text())["detections"] == summary["detections"]
    assert summary["task"] == "detect" and not (out / "masks").exists()
    assert_no_float_noise(out / "predictions.csv")


def assert_no_float_noise(path: Path) -> None:
    """Boxes (2 decimals) and scores (4) are rounded in CSVs: no float32 tails like 0.30000001192092896."""
    text = path.read_text()
    assert re.search(r"\d\.\d+", text), "no decimal numbers to check"
    assert not re.search(r"\d\.\d{5,}", text), text[:500]


def test_infer_one_file_with_torch(project):
    from src.dl import infer

    root, cfg = project
    image = sorted((root / "data" / "images").glob("*.jpg"))[0]
    cfg = deploy_config(
        root, f"infer.input={image}", f"infer.model_path={exp_dir(cfg) / 'best.pt'}", "infer.save_crops=false",
        "infer.save_masks=true",
    )  # fmt: skip
    summary = infer.run(cfg)
    assert summary["backend"] == "torch" and summary["images"] == 1
    assert not (exp_dir(cfg) / "infer" / image.name / "masks").exists()  # a detection model has no masks
    assert (exp_dir(cfg) / "infer" / image.name / "images" / image.name).exists()


def test_crop_box_padding_pixels_or_fraction():
    from src.runtime.outputs import crop_box

    box = np.array([10.0, 20.0, 30.0, 60.0])
    assert crop_box(box, 100, 100, 5) == (5, 15, 35, 65)
    assert crop_box(box, 100, 100, 0.5) == (0, 0, 40, 80)  # 10 px = half the width, 20 px = half the height
    assert crop_box(box, 32, 50, 5) == (5, 15, 32, 50)  # clipped to the image


def test_bench_every_available_backend(project):
    from src.dl import bench

    root, _ = project
    cfg = deploy_config(root, "bench.backends=[torch,onnx,ov_fp32,ov_int8]", "bench.warmup=1")
    everything = bench.run(cfg)
    # no int8 artifact: skipped; the fp32 IR at bf16 too: measured where the CPU has native bf16, else a
    # row that says why not
    assert everything["backend"].tolist() == ["torch", "onnx", "ov_fp32", "ov_fp32@bf16"]
    assert not everything.columns.str.startswith("mask_").any()  # a detection model: no mask mAP columns
    frame = everything[~everything["note"].fillna("").str.startswith("skipped")]
    assert len(frame) >= 3
    assert (frame["images"] == 3).all()  # the test split
    assert (frame["latency_ms_median"] > 0).all() and (
        frame["latency_ms_p90"] >= frame["latency_ms_median"]
    ).all()
    metrics = frame[["mAP_50", "mAP_50_95", "f1@tuned", "f1@eval"]]
    assert ((metrics >= 0) & (metrics <= 1)).all().all()
    saved = pd.read_csv(exp_dir(cfg) / "bench.csv")
    assert saved["backend"].tolist() == everything["backend"].tolist()
    for backend in frame["backend"]:
        assert len(list((exp_dir(cfg) / "bench" / backend).glob("*.jpg"))) == 2


def test_find_errors_on_known_detections():
    """GT: a circle and a square. Predictions: the circle (right), a star on nothing (FP), a circle where
    the square is (wrong class: FP, and the square is a FN)."""
    from src.dl.check_errors import error_rows, find_errors

    sample = LabelledImage(
        Path("a.jpg"), np.array([[0, 0, 10, 10], [50, 50, 70, 70]], float), np.array([0, 1]), "val"
    )
    dets = Detections(
        boxes=np.array([[0, 0, 10, 10], [80, 0, 90, 10], [51, 50, 70, 70]], np.float32),
        scores=np.array([0.9, 0.8, 0.6], np.float32),
        labels=np.array([0, 3, 0]),
        names=["circle", "star", "circle"],
        image_size=(100, 100),
    )
    fp, fn, iou = find_errors(dets, sample, iou_thresh=0.5)
    assert fp.tolist() == [False, True, True] and fn.tolist() == [False, True]
    rows = {
        (r["kind"], r["class_name"]): r for r in error_rows(dets, sample, fp, fn, iou, CLASS_NAMES, "p.jpg")
    }
    assert set(rows) == {("FP", "star"), ("FP", "circle"), ("FN", "square")}
    assert rows[("FP", "star")]["best_iou"] == 0 and rows[("FP", "star")]["severity"] == pytest.approx(0.8)
    assert rows[("FP", "circle")]["best_iou_class"] == "square"
    assert (
        rows[("FN", "square")]["best_iou"] == pytest.approx(0.95)
        and rows[("FN", "square")]["best_iou_class"] == "circle"
    )
    assert rows[("FN", "square")]["score"] == pytest.approx(0.6)


def test_check_errors_stage(project):
    from src.dl import check_errors

    root, _ = project
    cfg = deploy_config(root, "check_errors.splits=[val,test]")
    frame = check_errors.run(cfg)
    out = exp_dir(cfg) / "check_errors"
    assert len(frame) > 0 and set(frame["kind"]) <= {"FP", "FN"} and set(frame["split"]) <= {"val", "test"}
    assert frame["severity"].is_monotonic_decreasing  # worst first
    for picture in frame["picture"].unique():
        assert Path(picture).exists() and Path(picture).parent.name in {"val", "test"}
    saved = pd.read_csv(out / "errors.csv")
    assert len(saved) == len(frame)
    assert_no_float_noise(out / "errors.csv")
    fp = frame[frame["kind"] == "FP"]
    assert (fp["score"] >= 0.3 - 1e-6).all()  # predictions at the model's own thresholds only


def test_test_batching_sizes_and_out_of_memory_stop(project):
    from src.dl import test_batching
    from src.runtime import load_model

    root, cfg = project
    checkpoint = exp_dir(cfg) / "best.pt"
    cfg = deploy_config(
        root, f"test_batching.model_path={checkpoint}", "test_batching.batch_sizes=[1,2]", "test_batching.warmup=1",
        "test_batching.runs=2",
    )  # fmt: skip
    frame = test_batching.run(cfg)
    assert frame["batch_size"].tolist() == [1, 2] and (frame["status"] == "ok").all()
    assert (frame["throughput_img_s"] > 0).all()
    assert (exp_dir(cfg) / "test_batching.csv").exists() and (exp_dir(cfg) / "test_batching.png").exists()

    # The real model, with a device that runs out of memory above 2 images: growing stops there, cleanly.
    detector = load_model(checkpoint)
    real_runner = detector.runner

    def limited(images, sizes):
        if len(images) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_runner(images, sizes)

    detector.runner = type("Limited", (), {"batch_size": None, "__call__": staticmethod(limited)})()
    measured = test_batching.measure(detector, [1, 2, 4, 8], warmup=0, runs=1)
    assert measured["status"].tolist() == ["ok", "ok", "out of memory"]
