"""Deployment precision per machine: every runtime precision this CPU runs is measured against torch at
export, the fastest that holds parity is chosen, recorded and used; one it cannot run is skipped with the
reason (forced here by hiding the CPU's native bf16); the parity's mean box IoU of paired detections."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from src.common.experiment import Experiment, exp_dir
from src.dl.artifacts import best_artifact, load_artifact
from src.dl.parity import compare_detections
from src.dl.precision import BY_NAME, choose
from src.runtime import Detections, load_model
from tests.helpers.deploy_data import deploy_config, make_checkpoint, make_data

RULE = OmegaConf.create({"map50_drop": 0.005, "mean_iou": 0.99})


def detections(boxes, scores, labels) -> Detections:
    labels = np.asarray(labels, np.int64)
    return Detections(
        np.asarray(boxes, np.float32), np.asarray(scores, np.float32), labels, [str(i) for i in labels],
        (100, 100),
    )  # fmt: skip


def test_parity_mean_iou_of_paired_detections():
    reference = [detections([[0, 0, 10, 10], [50, 50, 70, 70]], [0.9, 0.8], [0, 1])]
    shifted = [detections([[1, 0, 11, 10], [50, 50, 70, 70]], [0.9, 0.8], [0, 1])]  # one box 1 px right
    drift = compare_detections(reference, shifted, conf=0.3)
    assert drift["mean_iou"] == pytest.approx((90 / 110 + 1.0) / 2)
    assert drift["min_iou"] == pytest.approx(90 / 110)
    assert compare_detections(reference, reference, conf=0.3)["mean_iou"] == 1.0


def entry(ms: float, drop: float = 0.0, iou: float = 1.0, compared: int = 50) -> dict:
    return {"latency_ms_median": ms, "mAP_50_delta": -drop, "mean_iou": iou, "compared": compared, "ok": True}


def test_a_reduced_precision_compared_on_no_detections_is_not_chosen():
    """An untrained model detects nothing above parity_conf: "no box moved" must not pick int8 unverified."""
    parity = {"ov_fp32": entry(60, compared=0), "ov_int8": entry(25, compared=0)}
    choice = choose(parity, {}, "auto", RULE)
    assert choice["name"] == "ov_fp32"
    assert "ov_int8 fails: only 0 detections compared (< 10): parity not verified" in choice["reason"]


def test_choose_fastest_that_holds_and_pins():
    parity = {
        "ov_fp32": entry(60),
        "ov_fp32@bf16": entry(33, drop=0.002, iou=0.995),
        "ov_int8": entry(25, drop=0.02, iou=0.97),  # faster but breaks both rules
        "onnx": entry(58),
    }
    auto = choose(parity, {}, "auto", RULE)
    assert (auto["name"], auto["precision"]) == ("ov_fp32@bf16", "bf16")
    assert auto["ratio_to_fp32"] == pytest.approx(33 / 60)
    assert "ov_int8 fails: mAP50 drop 0.0200 > 0.005; mean box IoU 0.9700 < 0.99" in auto["reason"]
    pinned = choose(parity, {}, "int8", RULE)
    assert pinned["name"] == "ov_int8" and "parity does NOT hold" in pinned["reason"]
    assert choose(parity, {}, "fp32", RULE)["name"] == "onnx"  # the fastest fp32 deployment
    # a pinned precision this machine cannot run: skipped with the reason, auto instead, never a crash
    no_bf16 = {k: v for k, v in parity.items() if k != "ov_fp32@bf16"}
    fallback = choose(no_bf16, {"ov_fp32@bf16": "no native BF16"}, "bf16", RULE)
    assert fallback["name"] == "onnx"
    assert "export.precision=bf16 cannot run here" in fallback["reason"]
    assert "skipped ov_fp32@bf16: no native BF16" in fallback["reason"]
    nothing_holds = choose({"ov_fp32": entry(60, iou=0.5), "ov_int8": entry(20, iou=0.5)}, {}, "auto", RULE)
    assert nothing_holds["name"] == "ov_fp32" and "nothing held parity" in nothing_holds["reason"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from src.dl import export

    root = tmp_path_factory.mktemp("precision")
    cfg = deploy_config(root, "export.simplify=false", "export.ov_fp16=false", "export.latency_runs=5")
    make_data(cfg)
    make_checkpoint(cfg)
    return cfg, export.run(cfg)


def cpu_has_bf16() -> bool:
    from src.runtime.openvino_model import precision_unavailable

    return precision_unavailable("bf16", "cpu") is None


def test_export_chooses_records_and_uses_a_precision_on_this_machine(exported):
    from src.dl import bench

    cfg, report = exported
    parity, choice = report["parity"], report["deployment"]
    assert {"onnx", "ov_fp32"} <= set(parity)
    for name in ("onnx", "ov_fp32"):
        assert 0.99 <= parity[name]["mean_iou"] <= 1.0 and parity[name]["latency_ms_median"] > 0
    if cpu_has_bf16():  # this machine's CPU (AVX512-BF16 / AMX): bf16 is measured, not skipped
        assert "ov_fp32@bf16" in parity and parity["ov_fp32@bf16"]["precision"] == "bf16"
    else:
        assert "no native BF16" in report["skipped"]["ov_fp32@bf16"]
    # the choice: the fastest measured deployment that holds the rule (or fp32 when none does)
    holding = [n for n, e in parity.items() if n in BY_NAME and -e["mAP_50_delta"] <= 0.005
               and e["mean_iou"] >= 0.99 and (BY_NAME[n].family == "fp32" or e["compared"] >= 10)]  # fmt: skip
    assert choice["name"] == min(holding, key=lambda n: parity[n]["latency_ms_median"])
    experiment = Experiment.of(cfg)
    assert experiment.deployment()["name"] == choice["name"] and choice["reason"]
    # used when no precision is given: best_artifact and load_artifact of the folder
    chosen_file = experiment.artifact(choice["artifact"])
    assert best_artifact(exp_dir(cfg), "cpu") == chosen_file
    detector = load_artifact(exp_dir(cfg), device="cpu")
    assert detector.runner.backend == load_model(chosen_file).runner.backend
    if choice["precision"]:  # OpenVINO: runs at the chosen inference precision, not its f32 default
        assert detector.runner.precision == choice["precision"]
    # bench.csv shows it
    frame = bench.run(cfg)
    assert frame["chosen"].tolist().count(True) == 1
    assert frame.loc[frame["chosen"], "backend"].item() == choice["name"]
    saved = pd.read_csv(experiment.file("bench"))
    assert "chosen by export" in saved.loc[saved["chosen"], "note"].item()


def test_precision_the_cpu_lacks_is_skipped_with_reason(exported, monkeypatch):
    """Forced: OpenVINO reports no native BF16 (a CPU without AVX512-BF16/AMX). Export and bench skip
    ov_fp32@bf16 with the reason, a pinned bf16 falls back to auto, nothing crashes."""
    from src.dl import bench, export
    from src.runtime import openvino_model

    monkeypatch.setattr(openvino_model, "device_capabilities", lambda device: {"FP32", "INT8"})
    cfg, _ = exported
    cfg = OmegaConf.merge(cfg, {"export": {"precision": "bf16"}})
    report = export.run(cfg)
    assert "ov_fp32@bf16" not in report["parity"]
    assert "no native BF16" in report["skipped"]["ov_fp32@bf16"]
    assert report["deployment"]["family"] == "fp32"
    assert "export.precision=bf16 cannot run here" in report["deployment"]["reason"]
    frame = bench.run(cfg)
    row = frame[frame["backend"] == "ov_fp32@bf16"]
    assert len(row) == 1 and row["note"].item().startswith("skipped: OpenVINO CPU has no native BF16")
    assert np.isnan(row["latency_ms_median"].item())
