"""Deployment precision per machine: every runtime precision this CPU runs is measured against torch at
export, the fastest that holds parity is chosen, recorded and used; one it cannot run is skipped with the
reason (forced here by hiding the CPU's native bf16); the parity's mean box IoU of paired detections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from src.common.config import load_config
from src.common.experiment import Experiment, exp_dir
from src.dl.artifacts import best_artifact, load_artifact
from src.dl.paired_map import paired_map50_delta
from src.dl.parity import compare_detections
from src.dl.precision import BY_NAME, choose, holds
from src.runtime import Detections, load_model
from src.runtime.evaluate import LabelledImage
from tests.helpers.deploy_data import exported_experiment

RULE = load_config([]).export.precision_rule


def detections(boxes, scores, labels, size: int = 100) -> Detections:
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    labels = np.asarray(labels, np.int64)[order]
    return Detections(
        np.asarray(boxes, np.float32).reshape(-1, 4)[order], np.asarray(scores, np.float32)[order], labels,
        [str(i) for i in labels], (size, size),
    )  # fmt: skip


def test_parity_mean_iou_of_paired_detections():
    reference = [detections([[0, 0, 10, 10], [50, 50, 70, 70]], [0.9, 0.8], [0, 1])]
    shifted = [detections([[1, 0, 11, 10], [50, 50, 70, 70]], [0.9, 0.8], [0, 1])]  # one box 1 px right
    drift = compare_detections(reference, shifted, conf=0.3)
    assert drift["mean_iou"] == pytest.approx((90 / 110 + 1.0) / 2)
    assert drift["min_iou"] == pytest.approx(90 / 110)
    assert drift["pairs"] == 2 and drift["median_iou"] == pytest.approx((90 / 110 + 1.0) / 2)
    assert compare_detections(reference, reference, conf=0.3)["mean_iou"] == 1.0


def test_kept_box_iou_counts_a_lost_detection_as_zero():
    """The int8 accuracy metric box_iou: a detection the candidate keeps moved 1 px, one it scores below
    the threshold (still paired) counts 0, unlike the pairs' mean IoU."""
    from src.dl.parity import kept_box_iou

    reference = [detections([[0, 0, 10, 10], [50, 50, 70, 70], [80, 80, 90, 90]], [0.9, 0.8, 0.1], [0, 1, 0])]
    candidate = [detections([[1, 0, 11, 10], [50, 50, 70, 70], [80, 80, 90, 90]], [0.9, 0.2, 0.1], [0, 1, 0])]
    assert kept_box_iou(reference, candidate, conf=0.3) == pytest.approx((90 / 110 + 0.0) / 2)
    assert compare_detections(reference, candidate, conf=0.3)["mean_iou"] == pytest.approx((90 / 110 + 1) / 2)
    assert kept_box_iou(reference, reference, conf=0.3) == 1.0


# ---------------------------------------------------------------------------------------------------- the rule


def scenes(images: int, objects: int = 3, seed: int = 0) -> tuple[list[LabelledImage], list[Detections]]:
    """Labelled 320 px images with `objects` objects each and the detections of a decent model: every
    object found (IoU ~0.9, scores 0.5-0.95, one in ten with the wrong class), a few confident false
    alarms, and a low-score tail of junk."""
    rng = np.random.default_rng(seed)
    samples, found = [], []
    for index in range(images):
        xy = rng.uniform(0, 240, (objects, 2))
        truth = np.concatenate([xy, xy + rng.uniform(30, 80, (objects, 2))], 1)
        classes = rng.integers(0, 4, objects)
        samples.append(LabelledImage(Path(f"{index}.jpg"), truth, classes, "val", index))
        junk = rng.uniform(0, 280, (12, 2))
        boxes = np.concatenate([truth + rng.normal(0, 2.5, truth.shape), np.c_[junk, junk + 40]])
        scores = np.concatenate([rng.uniform(0.5, 0.95, objects), rng.uniform(0.0, 0.45, 12)])
        labels = np.concatenate([np.where(rng.random(objects) < 0.9, classes, (classes + 1) % 4),
                                 rng.integers(0, 4, 12)])  # fmt: skip
        found.append(detections(boxes, scores, labels, 320))
    return samples, found


def rule_entry(reference, candidate, samples) -> dict:
    """The parity entry export would record for `candidate` against `reference` (no latency needed)."""
    drift = compare_detections(reference, candidate, conf=0.3, margin=0.05)
    return drift | paired_map50_delta(reference, candidate, samples, 4, float(RULE.confidence))


def changed(found: list[Detections], change) -> list[Detections]:
    """change(image index, boxes, scores, labels) -> new arrays, on a copy of every image's detections."""
    out = []
    for index, d in enumerate(found):
        boxes, scores, labels = change(index, d.boxes.copy(), d.scores.copy(), d.labels.copy())
        out.append(detections(boxes, scores, labels, d.image_size[0]))
    return out


def faithful(index, boxes, scores, labels):
    """A reduced precision that holds: box edges within ~0.1 px, scores within 0.01."""
    rng = np.random.default_rng(100 + index)
    return boxes + rng.normal(0, 0.1, boxes.shape), scores + rng.normal(0, 0.004, len(scores)), labels


def test_one_detection_flip_does_not_fail_the_rule_on_a_small_sample():
    """20 images: one confident detection lost in one image moves mAP50 by more than the 0.005 tolerance,
    but the paired bootstrap interval reaches 0 and 1 unmatched of ~60 is no evidence against 2%."""
    samples, reference = scenes(20)

    def one_flip(index, boxes, scores, labels):
        boxes, scores, labels = faithful(index, boxes, scores, labels)
        if index == 3:
            scores[0] = 0.01  # its best detection, a true positive, drops out
        return boxes, scores, labels

    entry = rule_entry(reference, changed(reference, one_flip), samples)
    assert entry["mAP_50_delta"] < -0.005 and entry["unmatched"] == 1  # what used to fail the rule
    assert entry["mAP_50_delta_low"] < 0 <= entry["mAP_50_delta_high"]
    assert holds(entry, RULE) == []


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("every box shifted by a tenth of its size", "median box IoU"),
        ("class logits collapsed", "95th percentile score deviation"),
        ("every image loses a detection", "mAP50 drop"),
    ],
)
def test_a_systematic_change_fails_the_rule(breakage, expected):
    """The same images: a change every image shows fails, with the reason that names it. The collapse is
    what OpenVINO bf16 does to class logits on some CPUs: scores squashed towards 0.5 and classes mixed."""
    samples, reference = scenes(60)

    def broken(index, boxes, scores, labels):
        boxes, scores, labels = faithful(index, boxes, scores, labels)
        if breakage.startswith("every box"):
            boxes += (boxes[:, 2:] - boxes[:, :2]).repeat(2, axis=1) * 0.1
        elif breakage.startswith("class logits"):
            scores = 0.5 + (scores - 0.5) * 0.1
            labels = np.random.default_rng(index).integers(0, 4, len(labels))
        else:
            scores[np.argmax(scores)] = 0.01
        return boxes, scores, labels

    problems = holds(rule_entry(reference, changed(reference, broken), samples), RULE)
    assert any(p.startswith(expected) for p in problems), problems
    assert holds(rule_entry(reference, changed(reference, faithful), samples), RULE) == []


def test_paired_map50_is_the_validators():
    """With every image drawn once the paired AP50 is the validator's mAP50; the interval of a model
    against itself is [0, 0]."""
    from src.runtime.evaluate import score

    samples, found = scenes(15, seed=3)
    paired = paired_map50_delta(found, found, samples, 4)
    expected = score(found, samples, ["0", "1", "2", "3"], 0.3)["mAP_50"]
    assert paired["reference_mAP_50"] == pytest.approx(expected, abs=1e-9)
    assert paired["mAP_50_delta"] == paired["mAP_50_delta_low"] == paired["mAP_50_delta_high"] == 0.0


def test_parity_sample_spans_the_splits_in_proportion():
    from src.dl.parity import proportional_counts

    assert proportional_counts({"train": 192, "val": 24, "test": 24}, 200) == {"train": 160, "val": 20,
                                                                               "test": 20}  # fmt: skip
    assert proportional_counts({"train": 5000, "val": 2, "test": 0}, 100) == {
        "train": 99,
        "val": 1,
        "test": 0,
    }
    assert proportional_counts({"train": 10, "val": 3, "test": 3}, 200) == {"train": 10, "val": 3, "test": 3}
    assert sum(proportional_counts({"train": 7, "val": 5, "test": 4}, 9).values()) == 9


def entry(
    ms: float, drop: float = 0.0, iou: float = 1.0, compared: int = 50, significant: bool = True
) -> dict:
    """A parity entry: every pair at IoU `iou`, a drop whose interval excludes 0 (significant) or not."""
    high = -drop / 2 if significant else drop
    return {"latency_ms_median": ms, "mAP_50_delta": -drop, "mAP_50_delta_low": -2 * drop,
            "mAP_50_delta_high": high, "median_iou": iou, "p5_iou": iou, "p95_score_dev": 0.0,
            "unmatched": 0, "compared": compared, "ok": True}  # fmt: skip


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
        "ov_int8@bf16": entry(24, drop=0.02, significant=False),  # a drop sampling error explains
        "onnx": entry(58),
    }
    auto = choose(parity, {}, "auto", RULE)
    assert (auto["name"], auto["precision"]) == ("ov_int8@bf16", "bf16")
    assert auto["ratio_to_fp32"] == pytest.approx(24 / 60)
    assert "ov_int8 fails: mAP50 drop 0.0200 > 0.005" in auto["reason"]
    assert f"median box IoU 0.9700 < {RULE.box_iou_median}" in auto["reason"]
    del parity["ov_int8@bf16"]
    assert choose(parity, {}, "auto", RULE)["name"] == "ov_fp32@bf16"
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

    root = tmp_path_factory.mktemp("precision")
    return exported_experiment(root, "export.simplify=false", "export.ov_fp16=false", "export.latency_runs=5")


def cpu_has_bf16() -> bool:
    from src.runtime.openvino_model import precision_unavailable

    return precision_unavailable("bf16", "cpu") is None


def test_export_chooses_records_and_uses_a_precision_on_this_machine(exported):
    from src.dl import bench

    cfg, report = exported
    parity, choice = report["parity"], report["deployment"]
    assert {"onnx", "ov_fp32"} <= set(parity)
    assert parity["images"] == sum(parity["images_per_split"].values()) == 4
    assert set(parity["images_per_split"]) == {"train", "val", "test"}  # every split, train included
    for name in ("onnx", "ov_fp32"):
        assert 0.99 <= parity[name]["mean_iou"] <= 1.0 and parity[name]["latency_ms_median"] > 0
        assert (
            parity[name]["mAP_50_delta_low"]
            <= parity[name]["mAP_50_delta"]
            <= parity[name]["mAP_50_delta_high"]
        )
    if cpu_has_bf16():  # this machine's CPU (AVX512-BF16 / AMX): bf16 is measured, not skipped
        assert "ov_fp32@bf16" in parity and parity["ov_fp32@bf16"]["precision"] == "bf16"
    else:
        assert "no native BF16" in report["skipped"]["ov_fp32@bf16"]
    # the choice: the fastest measured deployment that holds the rule (or fp32 when none does)
    rule = cfg.export.precision_rule
    holding = [
        n for n, e in parity.items() if n in BY_NAME and not holds(e, rule, BY_NAME[n].family != "fp32")
    ]
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
