"""The trainer: its generic parts on a small torch module, then real D-FINE-n runs on tiny synthetic data."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from src.common.config import load_config
from src.dl.train.core import to_float32
from src.dl.train.ema import ModelEMA
from src.dl.train.history import loss_kind, sum_loss_kinds
from src.dl.train.optim import build_optimizer, build_param_groups, build_scheduler, group_lrs
from src.dl.train.rng import rng_state, set_rng_state
from src.dl.train.samplers import EpochShuffleSampler, ShardSampler
from tests.helpers.train_data import (
    CLASSES,
    assert_same_weights,
    draw_objects,
    make_detection_data,
    train_config,
    train_overrides,
)


class TinyDetector(nn.Module):
    """Names like D-FINE's: backbone.*, encoder.*, decoder.* with convs, BatchNorm, LayerNorm and biases."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential()
        self.backbone.add_module("conv", nn.Conv2d(3, 4, 3, bias=False))
        self.backbone.add_module("bn", nn.BatchNorm2d(4))
        self.backbone.add_module("lab", nn.Linear(4, 4))
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.decoder = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone.bn(self.backbone.conv(x)).mean((2, 3))
        return self.decoder(self.encoder(self.backbone.lab(x)))


def _group_of(groups: list[dict], param: nn.Parameter) -> dict:
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_param_groups_split_backbone_and_no_decay():
    model = TinyDetector()
    groups = build_param_groups(model, base_lr=1e-3, backbone_lr=1e-4, weight_decay=0.1)
    assert {g["name"] for g in groups} == {"backbone", "backbone_no_decay", "rest", "rest_no_decay"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    conv = _group_of(groups, model.backbone.conv.weight)
    assert (conv["lr"], conv["weight_decay"]) == (1e-4, 0.1)
    for norm_or_bias in (model.backbone.bn.weight, model.backbone.bn.bias, model.backbone.lab.bias):
        group = _group_of(groups, norm_or_bias)
        assert (group["lr"], group["weight_decay"]) == (1e-4, 0.0)
    for norm_or_bias in (model.encoder[1].weight, model.encoder[1].bias, model.decoder.bias):
        group = _group_of(groups, norm_or_bias)
        assert (group["lr"], group["weight_decay"]) == (1e-3, 0.0)
    assert _group_of(groups, model.decoder.weight)["weight_decay"] == 0.1


def test_onecycle_gives_each_group_its_own_peak_lr_and_backbone_really_moves_slower():
    model = TinyDetector()
    optimizer = build_optimizer(model, base_lr=1e-2, backbone_lr=1e-4, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_pct=0.3)
    peaks: dict[str, float] = {}
    for _ in range(10):
        for name, lr in group_lrs(optimizer).items():
            peaks[name] = max(peaks.get(name, 0.0), lr)
        optimizer.step()
        scheduler.step()
    assert math.isclose(peaks["lr_backbone"], 1e-4, rel_tol=1e-6)
    assert math.isclose(peaks["lr_rest"], 1e-2, rel_tol=1e-6)

    # The LR really applies: one Adam step moves a parameter by ~lr (Adam normalises the gradient).
    model = TinyDetector()
    optimizer = build_optimizer(model, base_lr=1e-2, backbone_lr=1e-4, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    backbone_move = (model.backbone.conv.weight - before["backbone.conv.weight"]).abs().max().item()
    head_move = (model.decoder.weight - before["decoder.weight"]).abs().max().item()
    assert backbone_move == pytest.approx(1e-4, rel=0.01)
    assert head_move == pytest.approx(1e-2, rel=0.01)


def test_ema_follows_official_warmup_ramp():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = ModelEMA(model, decay=0.9, warmups=10)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    decay = 0.9 * (1 - math.exp(-1 / 10))
    assert torch.allclose(ema.module.weight, torch.full_like(model.weight, 1 - decay))
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = ModelEMA(model, decay=0.9, warmups=10)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and torch.equal(restored.module.weight, ema.module.weight)


def test_ema_copies_integer_buffers():
    model = nn.BatchNorm1d(3)
    ema = ModelEMA(model, decay=0.99, warmups=0)
    model(torch.randn(4, 3))
    ema.update(model)
    assert ema.module.num_batches_tracked.item() == 1


def test_epoch_sampler_is_reproducible_splits_ranks_and_skips():
    full = list(EpochShuffleSampler(10, seed=3))
    assert sorted(full) == list(range(10))
    again = EpochShuffleSampler(10, seed=3)
    again.set_epoch(0, skip=4)
    assert list(again) == full[4:] and len(again) == 6
    other_epoch = EpochShuffleSampler(10, seed=3)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != full
    ranks = [EpochShuffleSampler(5, seed=0, rank=r, world_size=2) for r in range(2)]
    shares = [list(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == 3  # padded so both ranks step equally often
    assert set(shares[0]) | set(shares[1]) == set(range(5))


def test_shard_sampler_sees_every_image_once():
    shards = [list(ShardSampler(7, rank, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(7))


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    np.random.normal()  # leaves a cached Gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.normal(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert random.random() == first[0] and np.random.normal() == first[1]
    assert torch.equal(torch.rand(3), first[2])


def test_loss_kinds_sum_over_layers():
    assert loss_kind("loss_vfl_aux_3") == "loss_vfl"
    assert loss_kind("loss_bbox_dn_pre") == "loss_bbox"
    assert loss_kind("loss_giou_enc_0") == "loss_giou"
    assert loss_kind("loss_fgl") == "loss_fgl"
    summed = sum_loss_kinds({"loss_vfl": 1.0, "loss_vfl_aux_0": 2.0, "loss_ddf_dn_1": 0.5})
    assert summed == {"loss_vfl": 3.0, "loss_ddf": 0.5}


def test_to_float32_nested():
    out = to_float32(
        {"a": torch.ones(2, dtype=torch.bfloat16), "b": [{"c": torch.ones(1, dtype=torch.int64)}]}
    )
    assert out["a"].dtype == torch.float32 and out["b"][0]["c"].dtype == torch.int64


# ============================================================================================ end to end
# Real D-FINE-n on a tiny synthetic data set (64 px inputs, 10 queries), 1-3 optimizer steps per epoch.


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return make_detection_data(root, {"train": 8, "val": 2, "test": 1}, backgrounds=("train_3.jpg",))


def _run(cfg, listeners=()):
    from src.dl.train import run

    return run(cfg, listeners)


class EventRecorder:
    """A listener of every training event: the names in the order they fired, and each one's arguments."""

    def __init__(self) -> None:
        self.fired: list[tuple[str, tuple]] = []

    def handlers(self) -> dict:
        from src.dl.train.events import EVENTS

        return {name: (lambda *args, name=name: self.fired.append((name, args))) for name in EVENTS}

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.fired]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """One full run (2 epochs, mosaic, EMA, background-ignoring epoch) shared by the checks below, with
    config.yaml's loggers (csv, tensorboard) and an event recorder."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = train_config(
        tmp, data_dir, "train.epochs=2", "train.mosaic.prob=1.0", "train.mosaic.no_mosaic_epochs=1",
        "train.ignore_background_epochs=1",
    )  # fmt: skip
    recorder = EventRecorder()
    summary = _run(cfg, [recorder.handlers()])
    return summary, Path(summary["exp_dir"]), recorder


def test_run_writes_a_complete_experiment_folder(trained):
    summary, folder, _ = trained
    for name in ("config.yaml", "train_log.txt", "history.csv", "curves.png", "last.pt", "best.pt",
                 "metrics.csv", "per_class.csv", "thresholds.json"):  # fmt: skip
        assert (folder / name).is_file(), name
    assert list((folder / "debug_images" / "train").glob("*.jpg"))
    assert list((folder / "eval_preds" / "val").glob("*.jpg"))
    assert (folder / "plots" / "val" / "confusion_matrix.png").is_file()
    assert (folder / "plots" / "test" / "threshold_curves.png").is_file()
    assert summary["epochs_trained"] == 2 and not summary["stopped_early"]
    assert set(summary) >= {"exp_dir", "best_epoch", "val", "test", "thresholds"}

    history = pd.read_csv(folder / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    for column in (
        "loss",
        "loss_vfl",
        "loss_bbox",
        "loss_giou",
        "loss_fgl",
        "lr_backbone",
        "lr_rest",
        "mAP_50",
        "f1",
        "epoch_time_s",
    ):
        assert column in history.columns, column
    assert np.isfinite(history["loss"]).all()
    assert (history["lr_backbone"] < history["lr_rest"]).all()  # backbone LR really is its own

    metrics = pd.read_csv(folder / "metrics.csv")
    assert list(metrics["split"]) == ["val", "test"]
    per_class = pd.read_csv(folder / "per_class.csv")
    assert set(per_class["class"]) == set(CLASSES)
    thresholds = json.loads((folder / "thresholds.json").read_text())
    assert 0 < thresholds["conf_thresh"] < 1 and set(thresholds["per_class"]) == set(CLASSES)
    log = (folder / "train_log.txt").read_text()
    assert "epoch 2:" in log and "thresholds (picked on val" in log


def test_events_fire_in_order_and_checkpoints_follow_their_state(trained):
    _, folder, recorder = trained
    per_epoch = ["on_epoch_start", "on_eval_end", "on_save_state", "on_epoch_end"]
    assert [name for name in recorder.names if name != "on_checkpoint"] == [
        "on_train_start", *per_epoch, *per_epoch, "on_train_end", "on_save_state", "on_teardown",
    ]  # fmt: skip
    names = recorder.names
    # last.pt is written right after its state is gathered: at each epoch's end and once finished
    assert [names[i + 1] for i, name in enumerate(names) if name == "on_save_state"] == ["on_checkpoint"] * 3
    written = [Path(args[0]).name for name, args in recorder.fired if name == "on_checkpoint"]
    assert written.count("last.pt") == 3 and "best.pt" in written
    rows = [args[0] for name, args in recorder.fired if name == "on_epoch_end"]
    assert [row["epoch"] for row in rows] == [1, 2]
    final = next(args for name, args in recorder.fired if name == "on_train_end")
    assert set(final[0]) == {"val", "test"} and final[1] == 4  # {split: metrics}, optimizer steps


def test_tensorboard_logger_writes_the_history_as_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, folder, _ = trained
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_vfl", "train/lr_backbone", "val/mAP_50", "final/test/mAP_50"} <= tags
    history = pd.read_csv(folder / "history.csv")
    loss = events.Scalars("train/loss")
    assert [point.step for point in loss] == [2, 4]  # optimizer steps at each epoch's end
    np.testing.assert_allclose([point.value for point in loss], history["loss"], rtol=1e-6)
    np.testing.assert_allclose([p.value for p in events.Scalars("val/mAP_50")], history["mAP_50"], rtol=1e-6)


def test_best_checkpoint_is_self_describing(trained):
    _, folder, _ = trained
    best = torch.load(folder / "best.pt", map_location="cpu", weights_only=False)
    meta = best["meta"]
    assert meta["model_name"] == "n" and meta["arch"] == "dfine" and meta["num_classes"] == 4
    assert meta["class_names"] == list(CLASSES) and meta["img_size"] == [64, 64]
    assert meta["keep_ratio"] is False and meta["num_queries"] == 10
    assert meta["thresholds"] == json.loads((folder / "thresholds.json").read_text())
    assert "mAP_50" in meta["metrics"] and meta["epoch"] in (1, 2)
    assert meta["arch_overrides"] == {}  # from scratch: the size table as is
    assert best["ema"] is None and isinstance(best["model"], dict)

    last = torch.load(folder / "last.pt", map_location="cpu", weights_only=False)
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config", "meta"):
        assert key in last, key
    assert last["epoch"] == 2 and last["step"] == 4
    assert len(last["rng"]) == 1 and {"python", "numpy", "torch"} <= set(last["rng"][0])
    # Both load as plain weights (torch.load(weights_only=True)), so either can be a pretrained_model_path.
    for name in ("best.pt", "last.pt"):
        torch.load(folder / name, map_location="cpu", weights_only=True)
    # best.pt holds the EMA weights, which are what was evaluated
    from src.models import build_model

    model = build_model("n", 4, img_size=(64, 64), num_queries=10)
    model.load_state_dict(best["model"])


def _has_load_pretrained() -> bool:
    try:
        from src.models import load_pretrained  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_load_pretrained(), reason="src.models.load_pretrained has not landed yet")
def test_fine_tune_from_own_checkpoint_keep_ratio_accumulation_no_ema(tmp_path, data_dir, trained):
    _, folder, _ = trained
    cfg = train_config(
        tmp_path, data_dir, f"train.pretrained_model_path={folder / 'best.pt'}", "model.keep_ratio=true",
        "train.mosaic.prob=0", "train.accumulation_steps=2", "train.max_steps_per_epoch=3", "train.use_ema=false",
    )  # fmt: skip
    summary = _run(cfg)
    last = torch.load(Path(summary["exp_dir"]) / "last.pt", map_location="cpu", weights_only=False)
    assert last["step"] == 2  # 3 batches with accumulation 2: one full window + one partial window
    assert last["ema"] is None
    best = torch.load(Path(summary["exp_dir"]) / "best.pt", map_location="cpu", weights_only=False)
    assert best["meta"]["keep_ratio"] is True
    # The architecture follows the pretrained file, and the metadata says how to rebuild it.
    from src.models import build_model, checkpoint_arch_overrides

    assert best["meta"]["arch_overrides"] == checkpoint_arch_overrides(folder / "best.pt") != {}
    model = build_model(
        "n", 4, img_size=(64, 64), num_queries=10, arch_overrides=best["meta"]["arch_overrides"]
    )
    model.load_state_dict(best["model"])
    assert "pretrained weights" in (Path(summary["exp_dir"]) / "train_log.txt").read_text()


def test_resume_mid_epoch_continues_exactly(tmp_path, data_dir):
    from src.dl.train import TrainingAborted

    common = (
        "train.epochs=2",
        "train.max_steps_per_epoch=3",
        "train.checkpoint_every_steps=1",
        "train.mosaic.prob=0.5",
    )
    straight = _run(train_config(tmp_path, data_dir, "exp_name=straight", *common))

    with pytest.raises(TrainingAborted):
        _run(train_config(tmp_path, data_dir, "exp_name=killed", "train.abort_after_steps=2", *common))
    killed = tmp_path / "output" / "killed"
    interrupted = torch.load(killed / "last.pt", map_location="cpu", weights_only=False)
    assert (interrupted["epoch"], interrupted["state"]["batch"], interrupted["step"]) == (0, 2, 2)
    assert not (killed / "metrics.csv").exists()

    resumed = _run(train_config(tmp_path, data_dir, "exp_name=killed", "train.resume=true", *common))
    assert resumed["epochs_trained"] == 2
    a = torch.load(Path(straight["exp_dir"]) / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(killed / "last.pt", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 6
    assert_same_weights(a, b)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    history_a, history_b = (
        pd.read_csv(Path(straight["exp_dir"]) / "history.csv"),
        pd.read_csv(killed / "history.csv"),
    )
    assert np.allclose(history_a["loss"], history_b["loss"])


def test_resume_after_a_real_kill(tmp_path, data_dir):
    """SIGKILL a training process mid-epoch; last.pt must be intact and the resumed run go on from it."""
    import subprocess
    import sys
    import time

    from src.common.config import ROOT
    from src.dl.train import TrainingAborted

    overrides = train_overrides(
        tmp_path, data_dir, "exp_name=killed", "train.epochs=20", "train.max_steps_per_epoch=null",
        "train.checkpoint_every_steps=1",
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "src.dl.train", *overrides]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = tmp_path / "output" / "killed" / "last.pt"
    try:
        deadline = time.monotonic() + 300
        while not (last.exists() and torch.load(last, weights_only=True)["step"] >= 2):
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no mid-epoch checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        process.kill()
        process.wait()
    killed = torch.load(last, weights_only=True)
    step, epoch, batch = killed["step"], killed["epoch"], killed["state"]["batch"]

    with pytest.raises(TrainingAborted):
        _run(load_config([*overrides, "train.resume=true", f"train.abort_after_steps={step + 1}"]))
    log = (last.parent / "train_log.txt").read_text()
    assert f"resuming {last}: epoch {epoch + 1}, batch {batch}, optimizer step {step}/" in log


def test_early_stopping(tmp_path, data_dir):
    # conf_thresh 1.0: nothing is ever confident, so f1 stays 0 and no epoch after the first improves.
    cfg = train_config(
        tmp_path, data_dir, "train.epochs=4", "train.early_stopping=1", "train.max_steps_per_epoch=1",
        "train.conf_thresh=1.0", "train.decision_metrics=[f1]",
    )  # fmt: skip
    summary = _run(cfg)
    assert summary["stopped_early"] and summary["epochs_trained"] == 2 and summary["best_epoch"] == 1


def test_background_only_batches_bf16_autocast_on_cpu_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B must work (or quietly switch off) without a network
    data = make_detection_data(
        tmp_path / "data", {"train": 2, "val": 2}, backgrounds=("train_0.jpg", "train_1.jpg")
    )
    cfg = train_config(tmp_path, data, "train.amp=bf16", "train.mosaic.prob=0", "train.loggers=[csv,wandb]")
    summary = _run(cfg)
    history = pd.read_csv(Path(summary["exp_dir"]) / "history.csv")
    assert np.isfinite(history["loss"]).all()
    assert "AMP bf16" in (Path(summary["exp_dir"]) / "train_log.txt").read_text()


def test_one_class_without_val_or_test_split(tmp_path):
    data = make_detection_data(tmp_path / "data", {"train": 3, "val": 0, "test": 0})
    summary = _run(train_config(tmp_path, data, "model.use_one_class=true", "train.max_steps_per_epoch=1"))
    folder = Path(summary["exp_dir"])
    best = torch.load(folder / "best.pt", weights_only=True)
    assert best["meta"]["class_names"] == ["object"] and best["meta"]["num_classes"] == 1
    # No val images: default thresholds, no metrics rows, and still a usable best.pt.
    assert json.loads((folder / "thresholds.json").read_text())["conf_thresh"] == 0.5
    assert "val" not in summary and "test" not in summary


def test_doctor_rejects_bad_labels_and_skip_bad_trains_without_them(tmp_path):
    from src.etl.doctor import DatasetError

    data = make_detection_data(tmp_path / "data", {"train": 3, "val": 2})
    (data / "labels" / "train_1.txt").write_text("0 0.5 0.5 0.2\n")  # a field missing: fatal, skippable
    with pytest.raises(DatasetError, match="train_1.txt"):
        _run(train_config(tmp_path, data))
    summary = _run(
        train_config(tmp_path, data, "exp_name=skip", "check.skip_bad=true", "train.max_steps_per_epoch=1")
    )
    assert Path(summary["exp_dir"], "best.pt").is_file()


def test_non_finite_losses_stop_the_run_with_a_clear_message(tmp_path, data_dir):
    from src.dl.train import TrainingDiverged, build_trainer
    from src.dl.train.distributed import DistContext

    cfg = train_config(tmp_path, data_dir, "train.max_bad_steps=2", "train.max_steps_per_epoch=3")
    Path(cfg.output_dir, cfg.exp_name).mkdir(parents=True)
    trainer = build_trainer(cfg, DistContext())
    criterion = trainer.runner.criterion

    def exploding(outputs, targets):  # fault injection around the real criterion
        return {k: v * math.inf for k, v in criterion(outputs, targets).items()}

    trainer.runner.criterion = exploding
    with pytest.raises(TrainingDiverged, match="train.max_bad_steps=2"):
        trainer.fit()
    assert trainer.state.global_step == 0


def test_frozen_backbone_does_not_move_and_the_loop_is_profiled(tmp_path, data_dir):
    from src.dl.train import build_trainer
    from src.dl.train.distributed import DistContext
    from src.dl.train.profile import SectionTimer

    cfg = train_config(tmp_path, data_dir, "train.max_steps_per_epoch=1", "train.freeze_backbone_epochs=1")
    Path(cfg.output_dir, cfg.exp_name).mkdir(parents=True)
    timer = SectionTimer()
    trainer = build_trainer(cfg, DistContext(), timer=timer)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_batches(0)  # epoch 0 < freeze_backbone_epochs: frozen
    after = trainer.model.state_dict()
    backbone = [k for k in before if k.startswith("backbone.")]
    assert all(torch.equal(before[k], after[k]) for k in backbone)  # weights and BN statistics
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    trainer.set_backbone_frozen(False)
    assert all(p.requires_grad for p in trainer.model.backbone.parameters())
    # benchmarks.train_speed --profile: where one batch's time went
    sections = {"loader wait", "host to device", "forward", "loss", "matcher", "backward", "optimizer", "ema"}
    assert sections <= set(timer.totals) and all(timer.totals[name] > 0 for name in sections)
    # the matcher runs inside the loss: the final layer, every earlier one, the pre box, the encoder
    decoder_layers = trainer.model.decoder.num_layers
    assert timer.counts["matcher"] == decoder_layers + 2 and timer.totals["matcher"] < timer.totals["loss"]


# ---------------------------------------------------------------- cheaper validation


def test_validated_epochs_follow_eval_every_the_last_epoch_and_the_no_aug_tail():
    from src.dl.train.settings import TrainSettings

    def validated(*overrides: str) -> list[int]:
        settings = TrainSettings.from_config(load_config(["train.epochs=10", *overrides])).evaluation
        return [epoch + 1 for epoch in range(10) if settings.validates(epoch)]

    assert validated("train.eval_every=1") == list(range(1, 11))
    assert validated("train.eval_every=3") == [3, 6, 9, 10]
    assert validated("train.eval_every=4", "train.no_aug_epochs=3") == [4, 8, 9, 10]
    assert validated("train.eval_every=20") == [10]


def test_eval_every_skips_validation_and_negatives_are_subsampled_while_training(tmp_path):
    data = make_detection_data(tmp_path / "data", {"train": 4, "val": 2})
    rng = np.random.default_rng(1)
    (data / "negatives").mkdir()
    for index in range(3):  # background-only images no split lists
        cv2.imwrite(str(data / "negatives" / f"neg_{index}.jpg"), draw_objects(rng, 90, 70, 0)[0])
    cfg = train_config(
        tmp_path, data, "train.epochs=4", "train.eval_every=3", "train.max_steps_per_epoch=1",
        "train.mosaic.prob=0", "train.negatives_max_images=2",
    )  # fmt: skip
    summary = _run(cfg)
    folder = Path(summary["exp_dir"])
    history = pd.read_csv(folder / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert history["mAP_50"].isna().tolist() == [True, True, False, False]  # empty cells: not validated
    assert history["neg_images"].tolist()[2:] == [2, 2]  # two of the three negatives per validation
    assert history.columns[-1] == "epoch_time_s"
    assert summary["best_epoch"] in (3, 4)  # best.pt only from a validated epoch
    metrics = pd.read_csv(folder / "metrics.csv").set_index("split")
    assert metrics.loc["negatives", "neg_images"] == 3  # best.pt's final evaluation scores them all
    assert (folder / "curves.png").is_file()


def test_early_stopping_counts_epochs_but_stops_only_at_a_validation(tmp_path, data_dir):
    # f1 stays 0 (conf_thresh 1.0): epoch 2 is the first validation, hence the best; epoch 3 (not validated)
    # is one epoch without improvement, but only epoch 4's validation may stop the run.
    cfg = train_config(
        tmp_path, data_dir, "train.epochs=6", "train.eval_every=2", "train.mosaic.prob=0",
        "train.early_stopping=1", "train.max_steps_per_epoch=1", "train.conf_thresh=1.0",
        "train.decision_metrics=[f1]",
    )  # fmt: skip
    summary = _run(cfg)
    assert summary["stopped_early"] and summary["epochs_trained"] == 4 and summary["best_epoch"] == 2


def test_skipping_validation_does_not_change_the_training(tmp_path, data_dir):
    # Validation draws no random number from the training's streams: the weights after 3 epochs are the
    # same whether epochs 1-2 were validated or not.
    weights = []
    for every in (1, 3):
        cfg = train_config(
            tmp_path / f"every{every}", data_dir, "train.epochs=3", f"train.eval_every={every}",
            "train.mosaic.prob=0",
        )  # fmt: skip
        folder = Path(_run(cfg)["exp_dir"])
        weights.append(torch.load(folder / "last.pt", map_location="cpu", weights_only=True))
    assert_same_weights(*weights)
