"""Every detector family through every stage, with no family-specific setting: a 2-step training (with EMA
and mosaic), export (ONNX + OpenVINO, with the parity report), infer on a folder with a video (tracking)
and slicing, the demo's handlers; bench, check_errors and test_batching (D-FINE by default, the ResNet
families under -m slow); ov_int8 and an exact resume (-m slow). On a few tiny images the test draws. The
stages only go through build(spec) and the runtime, so a family that breaks one of them breaks it here."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from src.common.config import load_config
from src.common.experiment import exp_dir
from tests.helpers.deploy_data import make_video
from tests.helpers.train_data import CLASSES, assert_same_weights, make_detection_data, train_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

# (model.arch, model.name, input side, queries): each family's smallest size, tiny. DETR's stride-32 grid
# must hold its queries (96 px: 9 cells).
FAMILIES = [
    ("dfine", "n", 64, 8),
    ("deim_rtdetrv2", "r18", 64, 8),
    ("rtdetrv2", "r18", 64, 8),
    ("detr", "r50", 96, 8),
]


def family_config(root: Path, arch: str, size: str, side: int, queries: int, *overrides: str):
    data = root / "data"
    return load_config(
        train_overrides(
            root,
            data,
            f"model.arch={arch}",
            f"model.name={size}",
            f"model.img_size=[{side},{side}]",
            f"model.num_queries={queries}",
            "export.formats=[onnx,openvino]",
            "export.int8=false",
            "export.ov_fp16=false",
            "export.simplify=false",
            "export.parity_images=2",
            "export.parity_conf=0.0",  # an untrained model scores low: compare every kept query
            "export.latency_runs=1",
            "bench.warmup=1",
            "bench.save_images=1",
            "bench.backends=[torch,onnx,ov_fp32]",
            "check_errors.max_images=2",
            "test_batching.batch_sizes=[1,2]",
            "test_batching.warmup=1",
            "test_batching.runs=1",
            "ov_int8.subset_size=2",
            "ov_int8.val_images=2",
            *overrides,
        )
    )


def media_folder(root: Path, data: Path) -> Path:
    """Two of the data's images and a short video, in a folder for infer."""
    media = root / "media"
    media.mkdir()
    for image in sorted((data / "images").glob("*.jpg"))[:2]:
        (media / image.name).write_bytes(image.read_bytes())
    make_video(media / "clip.mp4", frames=4, size=(96, 72), fps=10.0)
    return media


IDS = [family[0] for family in FAMILIES]
# bench, check_errors and test_batching only consume the exports through the runtime: D-FINE's run by
# default, the other families' (ResNet backbones: several times D-FINE-n's compute) under -m slow.
DFINE_BY_DEFAULT = [
    pytest.param(family, id=family[0], marks=() if family[0] == "dfine" else pytest.mark.slow)
    for family in FAMILIES
]


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
    """(root, family, cfg, export report) of a family trained 2 steps and exported to ONNX + OpenVINO."""
    from src.dl import export
    from src.dl.train.run import run as train

    root = tmp_path_factory.mktemp(request.param[0])
    make_detection_data(root / "data", {"train": 4, "val": 2, "test": 2})
    cfg = family_config(root, *request.param)
    train(cfg)
    return root, request.param, cfg, export.run(cfg)


@pytest.mark.parametrize("trained", FAMILIES, ids=IDS, indirect=True)
def test_training_and_export_of_every_family(trained):
    _, (arch, size, side, queries), cfg, report = trained
    out = exp_dir(cfg)
    checkpoint = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    meta = checkpoint["meta"]
    assert (meta["arch"], meta["model_name"], meta["num_queries"]) == (arch, size, queries)
    assert (out / "model.onnx").is_file() and (out / "model_fp32.xml").is_file()
    parity = {name: row for name, row in report["parity"].items() if isinstance(row, dict) and "ok" in row}
    assert {"onnx", "ov_fp32"} <= set(parity)
    assert parity["onnx"]["ok"] and parity["ov_fp32"]["ok"], parity  # the exports equal torch


@pytest.mark.parametrize("trained", FAMILIES, ids=IDS, indirect=True)
def test_infer_a_folder_with_a_video_tracked_and_sliced(trained):
    from src.dl import infer

    root, family, cfg, _ = trained
    media = media_folder(root, root / "data")
    summary = infer.run(
        family_config(
            root,
            *family,
            f"infer.input={media}",
            "infer.track=true",
            "infer.conf=0.0",
            "slicing.enabled=true",
        )
    )
    assert summary["backend"] in ("onnx", "openvino")  # the deployment export chose (the fastest)
    assert summary["images"] == 2 and summary["videos"] == 1 and summary["video_frames"] == 4
    out = exp_dir(cfg) / "infer" / "media"
    assert (out / "tracks" / "clip.txt").is_file() and (out / "tracks" / "clip.csv").is_file()
    rows = pd.read_csv(out / "predictions.csv")
    assert len(rows) == summary["detections"] > 0  # infer.conf=0: every kept query is a detection


@pytest.mark.parametrize("trained", DFINE_BY_DEFAULT, indirect=True)
def test_bench_check_errors_and_test_batching(trained):
    from src.dl import bench, check_errors, test_batching

    _, _, cfg, _ = trained
    rows = bench.run(cfg)
    assert {"torch", "onnx", "ov_fp32"} <= set(rows["backend"])
    assert rows.set_index("backend").loc[["torch", "onnx", "ov_fp32"], "mAP_50"].notna().all()
    errors = check_errors.run(cfg)
    assert isinstance(errors, pd.DataFrame)
    batching = test_batching.run(cfg)
    assert len(batching) >= 1


@pytest.mark.slow  # NNCF takes most of a minute; D-FINE's int8 runs by default in tests/test_export.py
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_ov_int8_of_every_family(tmp_path, family):
    from src.dl import export, ov_int8
    from src.dl.train.run import run as train

    make_detection_data(tmp_path / "data", {"train": 4, "val": 2, "test": 2})
    cfg = family_config(tmp_path, *family, "export.check_parity=false", "export.formats=[openvino]")
    train(cfg)
    export.run(cfg)
    report = ov_int8.run(cfg)
    assert (exp_dir(cfg) / "model_int8.xml").is_file(), report


@pytest.mark.parametrize("trained", FAMILIES, ids=IDS, indirect=True)
def test_the_demo_serves_every_family(trained):
    """The Gradio app's handlers (no browser) on the experiment: its default model (the chosen export) and
    best.pt, an image and a tracked video in one request."""
    from src.demo.app import DemoApp, default_model, status_text

    root, family, cfg, _ = trained
    app = DemoApp(family_config(root, *family))
    image = sorted((root / "data" / "images").glob("*.jpg"))[0]
    clip = make_video(root / "demo" / "clip.mp4", frames=3, size=(96, 72), fps=10.0)
    for choice in (default_model(cfg), str(exp_dir(cfg) / "best.pt")):
        conf, classes, description = app.select_model(choice)
        assert classes == list(CLASSES) and f"input {family[2]}×{family[2]}" in description
        results = app.detect(choice, [str(image), str(clip)], 0.0, classes, track=True)
        assert not results.problems and len(results.gallery) == 1 and results.video is not None
        assert len(results.table) == results.detections > 0 and "track(s)" in status_text(results)


RESUMED = [family for family in FAMILIES if family[0] != "dfine"]  # D-FINE's: tests/test_train.py


@pytest.mark.slow  # three short trainings per family (about a minute)
@pytest.mark.parametrize("family", RESUMED, ids=[family[0] for family in RESUMED])
def test_a_killed_run_resumes_exactly(tmp_path, family):
    """Denoising groups, dropout and mosaic draw random numbers: a run killed mid-epoch and resumed ends
    with the weights of a run never stopped."""
    from src.dl.train import TrainingAborted
    from src.dl.train.run import run as train

    make_detection_data(tmp_path / "data", {"train": 4, "val": 1})
    steps = ("train.epochs=2", "train.checkpoint_every_steps=1", "train.mosaic.prob=0.5")
    train(family_config(tmp_path, *family, "exp_name=straight", *steps))
    with pytest.raises(TrainingAborted):
        train(family_config(tmp_path, *family, "exp_name=killed", "train.abort_after_steps=3", *steps))
    train(family_config(tmp_path, *family, "exp_name=killed", "train.resume=true", *steps))
    straight, resumed = (
        torch.load(tmp_path / "output" / name / "last.pt", map_location="cpu", weights_only=False)
        for name in ("straight", "killed")
    )
    assert straight["step"] == resumed["step"] == 4
    assert_same_weights(straight, resumed)
