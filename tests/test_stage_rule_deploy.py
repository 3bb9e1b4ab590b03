"""The rule for the deployment stages (export, bench, infer, check_errors, test_batching, ov_int8): each
runs twice on a small experiment, with a user's file planted in every output folder after the first run.
The user's files survive, no output file is shared between two inputs, and the second run's outputs equal
the first's (files holding timings: by name; tables: without their timing columns). A stage joins by a row
in STAGES."""

from __future__ import annotations

import shutil

import cv2
import pandas as pd

from src.common.experiment import exp_dir
from tests.helpers.deploy_data import deploy_config, make_checkpoint, make_data, make_video
from tests.helpers.stage_rule import (
    USER_FILE,
    Stage,
    assert_user_files_kept,
    differences,
    plant_user_files,
    run_stages,
    snapshot,
)

LATENCY = ("latency_ms_median", "latency_ms_p90", "throughput_img_s")
STAGES = [
    Stage(
        "src.dl.export",
        volatile=("manifest.json", "export_report.json"),
        masked=("model.onnx", "model_fp32.xml"),
    ),
    Stage(
        "src.dl.bench",
        ("bench.backends=[torch,onnx,ov_fp32]", "bench.save_images=2"),
        tables={"bench.csv": (*LATENCY, "chosen", "note")},  # export's choice is the fastest: a timing
    ),
    Stage(
        "src.dl.infer",
        ("infer.conf=0.2", "infer.track=true", "infer.video_labels=true", "infer.video_crops=true"),
    ),
    Stage("src.dl.check_errors", ("check_errors.splits=[val,test]",)),
    Stage(
        "src.dl.test_batching",
        ("test_batching.batch_sizes=[1,2]", "test_batching.warmup=0", "test_batching.runs=1"),
        volatile=("test_batching.png",),
        tables={"test_batching.csv": (*LATENCY, "ms_per_image")},
    ),
    Stage(
        "src.dl.ov_int8",
        ("ov_int8.subset_size=4", "ov_int8.val_images=3"),
        volatile=("ov_int8_report.json",),
        masked=("model_int8.xml",),
    ),
]


def colliding_inputs(folder, pictures) -> int:
    """Images whose names collide under a careless rule, and a video; returns the number of images."""
    (folder / "sub").mkdir(parents=True)
    shutil.copy(pictures[0], folder / "a.jpg")
    cv2.imwrite(str(folder / "a.png"), cv2.imread(str(pictures[1])))
    shutil.copy(pictures[2], folder / "a.jpg.jpg")
    shutil.copy(pictures[3], folder / "sub" / "a.jpg")
    shutil.copy(pictures[4], folder / "sub__a.jpg")
    make_video(folder / "clip.mp4", frames=4)
    return 5


def test_deployment_stages_twice_keep_user_files_and_repeat_their_outputs(tmp_path):
    root = tmp_path
    media = root / "media"
    base = ("export.check_parity=false", "export.simplify=false", "export.ov_fp16=false")
    cfg = deploy_config(root, *base)
    make_data(cfg)
    make_checkpoint(cfg)
    images = colliding_inputs(media, sorted((root / "data" / "images").glob("*.jpg")))
    folder = exp_dir(cfg)
    onnx, checkpoint = folder / "model.onnx", folder / "best.pt"
    paths = (f"infer.input={media}", f"infer.model_path={onnx}", f"check_errors.model_path={onnx}",
             f"test_batching.model_path={checkpoint}")  # fmt: skip

    def config(*overrides: str):
        return deploy_config(root, *base, *paths, *overrides)

    first = run_stages(STAGES, config)
    before = snapshot(folder)
    planted = plant_user_files(folder)
    second = run_stages(STAGES, config)

    assert_user_files_kept(planted)
    assert differences(before, snapshot(folder, planted), STAGES) == []
    assert first["infer"]["detections"] == second["infer"]["detections"] > 0
    outputs_one_per_input(folder, second, images)


def outputs_one_per_input(folder, results, images: int) -> None:
    """Every output file belongs to one input: as many files of a kind as inputs (or detections) made them."""
    out = folder / "infer" / "media"
    rows = pd.read_csv(out / "predictions.csv")
    assert len(outputs(out / "labels", "*.txt")) == images + results["infer"]["video_frames"]
    assert len(outputs(out / "images", "*")) == images
    assert len(outputs(out / "crops", "*.jpg")) == len(rows)  # every detection's, the frames' too
    for backend in ("torch", "onnx", "ov_fp32"):
        assert len(outputs(folder / "bench" / backend, "*.jpg")) == 2
    errors = results["check_errors"]
    assert len(outputs(folder / "check_errors", "*.jpg")) == errors["image"].nunique() > 0


def outputs(folder, pattern: str) -> list:
    return [p for p in folder.rglob(pattern) if p.is_file() and p.name != USER_FILE]
