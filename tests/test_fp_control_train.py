"""False-positive control wired into the trainer: denoising negatives and the classification loss in the
criterion, FPPI on a negatives folder every validation and for best.pt, the overlap check, the
FPPI-aware best model and exact resume. Real D-FINE-n runs on tiny synthetic data (tests/test_train.py's)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from src.dl.train.false_positives import clean_rate_key, fppi_key
from tests.helpers.train_data import assert_same_weights, make_detection_data, train_config

LOW = 0.001  # below the initial class prior (0.01): every query counts, so FPPI = num_queries
NUM_QUERIES = 10  # train_overrides' model.num_queries
NEG_COLUMNS = (fppi_key(LOW), fppi_key(0.5), clean_rate_key(0.5), "neg_max_score", "neg_images")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _write_negatives(folder: Path, count: int) -> list[Path]:
    """Background-only clutter (no shapes), names unlike the training images'."""
    rng = np.random.default_rng(1)
    paths = []
    for index in range(count):
        path = folder / f"bg_{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rng.integers(0, 80, (90, 110, 3), dtype=np.uint8))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """train/val/test + <data>/negatives (where train.negatives_path points by default)."""
    root = make_detection_data(tmp_path_factory.mktemp("data"), {"train": 6, "val": 2, "test": 1})
    _write_negatives(root / "negatives", 3)
    return root


def _fp_config(tmp_path: Path, data: Path, *overrides: str):
    return train_config(tmp_path, data, f"train.negatives_thresholds=[{LOW},0.5]", *overrides)


def _run(cfg) -> tuple[dict, Path]:
    from src.dl.train import run

    summary = run(cfg)
    return summary, Path(summary["exp_dir"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """2 epochs with everything on: denoising negatives, MAL, a heavier background loss, FPPI tolerance."""
    cfg = _fp_config(
        tmp_path_factory.mktemp("trained"), data_dir, "train.epochs=2", "train.max_steps_per_epoch=1",
        "train.dn_negatives.num=4", "train.cls_loss=mal", "train.bg_loss_weight=2.0",
        "train.fppi_tolerance=0.05",
    )  # fmt: skip
    return _run(cfg)


def test_every_epoch_logs_negatives_metrics_and_one_negatives_loss(trained):
    _, folder = trained
    history = pd.read_csv(folder / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    for column in (*NEG_COLUMNS, "loss_mal", "loss_mal_neg", "mAP_50"):
        assert column in history.columns, column
    assert "loss_vfl" not in history.columns  # cls_loss=mal replaced it
    assert not [c for c in history.columns if "_dn" in c or "_aux" in c]  # grouped over layers
    assert (history["loss_mal_neg"] > 0).all()
    assert (history[fppi_key(LOW)] == NUM_QUERIES).all() and (history["neg_images"] == 3).all()
    assert (history[clean_rate_key(LOW)] == 0).all()
    assert ((history["neg_max_score"] > 0) & (history["neg_max_score"] < 1)).all()
    log = (folder / "train_log.txt").read_text()
    assert "3 negatives in" in log and "negatives: FPPI@0.001 10.000" in log
    last = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
    assert last["state"]["peak_score"] == max(last["state"]["best_score"], last["state"]["peak_score"])
    assert math.isfinite(last["state"]["peak_score"])


def test_final_metrics_have_a_negatives_row(trained):
    summary, folder = trained
    metrics = pd.read_csv(folder / "metrics.csv").set_index("split")
    assert list(metrics.index) == ["val", "test", "negatives"]
    negatives = metrics.loc["negatives"]
    assert negatives[fppi_key(LOW)] == NUM_QUERIES and negatives["neg_images"] == 3
    assert 0 <= negatives[fppi_key(0.5)] <= NUM_QUERIES
    assert math.isnan(negatives["mAP_50"])  # no boxes there: only the neg_* columns
    assert summary["negatives"][fppi_key(0.5)] == pytest.approx(negatives[fppi_key(0.5)])
    assert "best.pt on negatives: FPPI@" in (folder / "train_log.txt").read_text()


def test_options_reach_the_model_and_criterion(tmp_path, data_dir):
    from src.dl.train import Trainer, build_trainer
    from src.dl.train.distributed import DistContext

    def trainer(*overrides: str) -> Trainer:
        cfg = _fp_config(tmp_path, data_dir, "train.overwrite=true", *overrides)
        Path(cfg.output_dir, cfg.exp_name).mkdir(parents=True, exist_ok=True)
        return build_trainer(cfg, DistContext())

    on = trainer(
        "train.dn_negatives.num=7", "train.dn_negatives.iou_thresh=0.2", "train.bg_loss_weight=3.0",
        "train.fppi_tolerance=0.1", "train.conf_thresh=0.4",
    )  # fmt: skip
    assert (on.model.decoder.num_dn_negatives, on.model.decoder.dn_negative_iou_thresh) == (7, 0.2)
    assert (
        on.parts.criterion.cls_loss == "vfl" and on.parts.criterion.bg_loss_weight == 3.0
    )  # auto: vfl for dfine
    assert len(on.data.negatives) == 3

    # fppi_tolerance: the decision score (mAP_50 + f1 by default) within 0.1 of the best -> lower FPPI wins
    key = fppi_key(0.4)
    on.state.best_metrics, on.state.best_score, on.state.best_epoch = {key: 2.0}, 1.0, 0
    on.state.peak_score = 1.0
    assert on.evaluator.beats_best(on.state, {key: 1.0}, 0.95)
    assert not on.evaluator.beats_best(on.state, {key: 3.0}, 1.05)
    assert on.evaluator.beats_best(on.state, {key: 3.0}, 1.2)  # beyond the band the score decides
    on.state.peak_score = 1.2  # the band hangs from the highest score seen
    assert not on.evaluator.beats_best(on.state, {key: 1.0}, 0.95)

    off = trainer("model.variant=deim", "train.negatives_path=null")
    assert off.model.decoder.num_dn_negatives == 0 and off.data.negatives == []
    assert (
        off.parts.criterion.cls_loss == "mal" and off.parts.criterion.bg_loss_weight == 1.0
    )  # auto: mal for deim
    off.state.best_score = 0.0  # no tolerance: the plain higher decision score
    assert not off.evaluator.beats_best(off.state, {}, -1.0) and off.evaluator.beats_best(off.state, {}, 0.5)
    with pytest.raises(ValueError, match="train.cls_loss"):
        trainer("train.cls_loss=focal")


def test_overlapping_negatives_stop_the_run_before_training(tmp_path, data_dir):
    negatives = tmp_path / "negatives"
    _write_negatives(negatives, 2)
    shutil.copyfile(data_dir / "images" / "val_1.jpg", negatives / "copy.jpg")
    cfg = _fp_config(tmp_path, data_dir, f"train.negatives_path={negatives}")
    with pytest.raises(ValueError, match="copy.jpg") as err:
        _run(cfg)
    assert "val_1.jpg" in str(err.value)
    assert not (Path(cfg.output_dir) / cfg.exp_name / "last.pt").exists()


def test_off_by_default_and_the_metrics_do_not_change_training(tmp_path, data_dir):
    """dn_negatives.num=0: no negatives loss; a missing folder: no neg_ columns (said once in the log).
    Measuring the negatives must not touch the training's random stream: the same weights either way."""
    two_epochs = ("train.epochs=2", "train.max_steps_per_epoch=1")  # training goes on after a measurement
    _, measured = _run(_fp_config(tmp_path, data_dir, "exp_name=measured", *two_epochs))
    missing = f"train.negatives_path={tmp_path}/no"
    _, unmeasured = _run(_fp_config(tmp_path, data_dir, "exp_name=plain", missing, *two_epochs))
    measured_history = pd.read_csv(measured / "history.csv")
    assert "loss_vfl" in measured_history.columns and fppi_key(0.5) in measured_history.columns
    assert not [c for c in measured_history.columns if c.startswith("loss_vfl_neg")]
    plain_history = pd.read_csv(unmeasured / "history.csv")
    assert not [c for c in plain_history.columns if c.startswith("neg_")]
    assert "negatives" not in set(pd.read_csv(unmeasured / "metrics.csv")["split"])
    assert (unmeasured / "train_log.txt").read_text().count("no negatives folder") == 1

    a = torch.load(measured / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(unmeasured / "last.pt", map_location="cpu", weights_only=True)
    assert_same_weights(a, b, ema=False)


def test_resume_with_denoising_negatives_is_exact(tmp_path, data_dir):
    from src.dl.train import TrainingAborted

    common = (
        "train.epochs=2", "train.max_steps_per_epoch=2", "train.checkpoint_every_steps=1",
        "train.dn_negatives.num=4", "train.fppi_tolerance=0.05",
    )  # fmt: skip
    _, straight = _run(_fp_config(tmp_path, data_dir, "exp_name=straight", *common))
    with pytest.raises(TrainingAborted):  # killed in the second epoch, after a validation with negatives
        _run(_fp_config(tmp_path, data_dir, "exp_name=killed", "train.abort_after_steps=3", *common))
    killed = tmp_path / "output" / "killed"
    interrupted = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)
    assert (interrupted["epoch"], interrupted["state"]["batch"], interrupted["step"]) == (1, 1, 3)
    _run(_fp_config(tmp_path, data_dir, "exp_name=killed", "train.resume=true", *common))

    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert_same_weights(a, b)
    for key in ("best_score", "best_epoch", "peak_score", "best_metrics"):
        assert a["state"][key] == b["state"][key], key
    history_a, history_b = pd.read_csv(straight / "history.csv"), pd.read_csv(killed / "history.csv")
    assert "loss_vfl_neg" in history_a.columns
    columns = ["loss", "loss_vfl_neg", *NEG_COLUMNS]
    np.testing.assert_array_equal(history_a[columns].to_numpy(), history_b[columns].to_numpy())
