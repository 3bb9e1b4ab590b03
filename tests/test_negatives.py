"""Over-activation metrics on held-out background-only images (src/dl/train/negatives.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from src.dl.train.false_positives import (
    check_negatives_disjoint,
    clean_rate_key,
    detector_scores,
    evaluate_negatives,
    evenly_spaced,
    fppi_key,
    negative_metrics,
    predict_negative_scores,
    prefer_lower_fppi,
)
from tests.helpers.deploy_data import deploy_config, make_checkpoint, make_data, tiny_model


def _write_image(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((size[1], size[0], 3), value, np.uint8)
    cv2.rectangle(image, (5, 5), (15 + value % 10, 20), (255 - value, 0, value), -1)
    cv2.imwrite(str(path), image)
    return path


# --- metrics -----------------------------------------------------------------------------------------


def test_negative_metrics_by_hand():
    scores = [np.array([0.9, 0.4, 0.1]), np.array([]), np.array([0.35, 0.31]), np.array([0.2])]
    metrics = negative_metrics(scores, thresholds=(0.3, 0.5))
    assert metrics[fppi_key(0.3)] == pytest.approx(4 / 4)  # 0.9, 0.4, 0.35, 0.31
    assert metrics[fppi_key(0.5)] == pytest.approx(1 / 4)
    assert metrics[clean_rate_key(0.3)] == pytest.approx(2 / 4)  # the empty image and the 0.2 one
    assert metrics[clean_rate_key(0.5)] == pytest.approx(3 / 4)
    assert metrics["neg_max_score"] == pytest.approx(0.9)
    assert metrics["neg_mean_max_score"] == pytest.approx((0.9 + 0 + 0.35 + 0.2) / 4)
    assert metrics["neg_images"] == 4
    assert set(metrics) == {
        "neg_fppi@0.3", "neg_fppi@0.5", "neg_clean_rate@0.3", "neg_clean_rate@0.5",
        "neg_max_score", "neg_mean_max_score", "neg_images",
    }  # fmt: skip
    # a score exactly at the threshold counts (the same >= as the detector's thresholds)
    assert negative_metrics([np.array([0.5])], (0.5,))[fppi_key(0.5)] == 1
    with pytest.raises(ValueError, match="no images"):
        negative_metrics([], (0.5,))


def test_measured_thresholds_come_from_the_config_with_conf_thresh_added():
    from src.common.config import load_config
    from src.dl.train.settings import TrainSettings

    def thresholds(*overrides: str) -> tuple[float, ...]:
        return TrainSettings.from_config(load_config(list(overrides))).evaluation.negatives_thresholds

    assert thresholds("train.negatives_thresholds=[0.7,0.3]", "train.conf_thresh=0.45") == (0.3, 0.45, 0.7)
    # the FPPI that fppi_tolerance compares, once
    assert thresholds("train.negatives_thresholds=[0.5]", "train.conf_thresh=0.5") == (0.5,)
    # the defaults are config.yaml's, not the code's
    defaults = load_config([]).train
    expected = sorted({*defaults.negatives_thresholds, defaults.conf_thresh})
    assert thresholds() == tuple(expected)


def test_prefer_lower_fppi():
    key = fppi_key(0.5)
    best = {"mAP_50": 0.80, key: 1.0}
    # within the tolerance the lower FPPI wins; equal FPPI -> the higher mAP
    assert prefer_lower_fppi({"mAP_50": 0.797, key: 0.5}, best, 0.005, key)
    assert not prefer_lower_fppi({"mAP_50": 0.803, key: 1.5}, best, 0.005, key)
    assert prefer_lower_fppi({"mAP_50": 0.803, key: 1.0}, best, 0.005, key)
    # beyond the tolerance mAP decides
    assert not prefer_lower_fppi({"mAP_50": 0.79, key: 0.0}, best, 0.005, key)
    assert prefer_lower_fppi({"mAP_50": 0.81, key: 3.0}, best, 0.005, key)
    # no drift: the band is measured from the highest mAP seen
    assert not prefer_lower_fppi({"mAP_50": 0.797, key: 0.5}, best, 0.005, key, peak_map=0.805)
    # off (no tolerance) or no FPPI: plain higher-mAP-wins
    assert not prefer_lower_fppi({"mAP_50": 0.797, key: 0.0}, best, None, key)
    assert prefer_lower_fppi({"mAP_50": 0.801}, {"mAP_50": 0.8}, 0.005, key)
    assert prefer_lower_fppi({"mAP_50": 0.0, key: 9.0}, None, 0.005, key)
    # any higher-is-better score can stand in for mAP
    assert prefer_lower_fppi({"score": 1.2, key: 0.1}, {"score": 1.201, key: 0.2}, 0.01, key, map_key="score")


# --- the folder check --------------------------------------------------------------------------------


def test_check_negatives_disjoint(tmp_path):
    train = [_write_image(tmp_path / "images" / f"img_{i}.jpg", 10 * i) for i in range(4)]
    negatives = tmp_path / "negatives"
    clean = [_write_image(negatives / f"neg_{i}.jpg", 100 + 10 * i) for i in range(3)]
    assert check_negatives_disjoint(negatives, train, workers=1) == sorted(clean)

    shutil.copyfile(train[2], negatives / "copied.jpg")  # same bytes, other name
    _write_image(negatives / "sub" / "IMG_1.png", 200)  # other content, same stem (any case, any folder)
    with pytest.raises(ValueError) as err:
        check_negatives_disjoint(negatives, train, workers=1)
    message = str(err.value)
    assert "2 pair(s)" in message
    assert "copied.jpg" in message and "img_2.jpg" in message and "same content" in message
    assert "IMG_1.png" in message and "img_1.jpg" in message and "same file name" in message


def test_check_negatives_folder_absent_empty_or_broken(tmp_path):
    train = [_write_image(tmp_path / "images" / "a.jpg", 1)]
    assert check_negatives_disjoint(None, train) == []
    assert check_negatives_disjoint(tmp_path / "missing", train) == []
    with pytest.raises(FileNotFoundError, match="missing"):
        check_negatives_disjoint(tmp_path / "missing", train, missing_ok=False)
    (tmp_path / "empty").mkdir()
    assert check_negatives_disjoint(tmp_path / "empty", train) == []
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(Exception, match="bad.jpg"):
        check_negatives_disjoint(broken, train, workers=1)


# --- running a model over the folder -----------------------------------------------------------------


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The deployment tests' tiny experiment, with a few negatives next to the data."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("negatives")
    cfg = deploy_config(root, "demo_data.num_negatives=5", "train.negatives_thresholds=[0.01,0.5]")
    make_data(cfg)
    return cfg, make_checkpoint(cfg)


@pytest.mark.usefixtures("one_torch_thread")  # one kernel choice: the two passes must agree bit for bit
def test_torch_model_and_detector_agree(experiment):
    from src.etl.splits import read_split
    from src.models import build_postprocessor
    from src.runtime import load_model

    cfg, checkpoint = experiment
    negatives = check_negatives_disjoint(Path(cfg.data_path) / "negatives", read_split(cfg, "train"))
    assert len(negatives) == 5
    model = tiny_model(cfg).train()  # evaluation switches to eval and back
    decoder = model.decoder
    torch_args = {
        "postprocessor": build_postprocessor(decoder.num_classes, num_top_queries=decoder.num_queries),
        "img_size": tuple(cfg.model.img_size),
        "keep_ratio": bool(cfg.model.keep_ratio),
        "batch_size": 2,
        "show_progress": False,
    }
    from_model = predict_negative_scores(model, negatives, **torch_args)
    assert model.training
    detector = load_model(checkpoint, device="cpu")
    from_detector = detector_scores(detector, negatives)
    assert len(from_model) == len(from_detector) == 5
    for ours, theirs in zip(from_model, from_detector):  # the same top-K, whichever way it is run
        assert len(ours) == len(theirs) == decoder.num_queries
        np.testing.assert_allclose(np.sort(ours), np.sort(theirs), atol=1e-4)

    # between two scores, not on one: a 1e-7 difference between two runs must not move a score across it
    scores = np.unique(np.concatenate(from_model))
    middle = float(scores[len(scores) // 2 - 1 : len(scores) // 2 + 1].mean())
    thresholds = (0.001, middle, 0.999)
    metrics = evaluate_negatives(model, negatives, thresholds, **torch_args)
    assert metrics == pytest.approx(negative_metrics(from_model, thresholds), abs=1e-6)
    assert metrics[fppi_key(0.001)] == decoder.num_queries and metrics[fppi_key(0.999)] == 0
    assert 0 < metrics[fppi_key(middle)] < decoder.num_queries
    assert metrics[clean_rate_key(0.999)] == 1 and metrics[clean_rate_key(0.001)] == 0
    assert set(evaluate_negatives(detector, negatives, thresholds)) == set(metrics)
    with pytest.raises(ValueError, match="postprocessor"):
        evaluate_negatives(model, negatives, thresholds)
    with pytest.raises(ValueError, match="no images"):
        evaluate_negatives(model, [], thresholds)


def test_stage_writes_metrics(experiment):
    from src.dl.train import negatives as stage

    cfg, _ = experiment
    metrics = stage.run(cfg)
    saved = json.loads((Path(cfg.output_dir) / "tiny" / "negatives_metrics.json").read_text())
    assert saved[fppi_key(0.01)] == pytest.approx(metrics[fppi_key(0.01)])
    assert set(metrics) >= {fppi_key(0.5), clean_rate_key(0.5), "neg_max_score", "neg_mean_max_score"}
    assert saved["model"].endswith("best.pt")


def test_evenly_spaced_negatives_are_a_fixed_spread_subset():
    paths = [Path(f"n{i:02d}.jpg") for i in range(10)]
    assert evenly_spaced(paths, None) == paths and evenly_spaced(paths, 10) == paths
    subset = evenly_spaced(paths, 4)
    assert subset == [paths[0], paths[2], paths[5], paths[7]]  # spread over the folder, not the first 4
    assert subset == evenly_spaced(paths, 4)  # the same images every call
    assert len(set(evenly_spaced(paths, 9))) == 9
