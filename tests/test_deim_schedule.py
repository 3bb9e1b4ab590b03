"""DEIM's training schedule: the flat-cosine LR, mixup in its epochs, no augmentation in the final epochs,
and a real (tiny) training run with all of it, resumed mid-epoch."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from src.common.config import load_config
from src.dl.train.augment import mix_up
from src.dl.train.dataset import build_collate
from src.dl.train.optim import FlatCosineLR, build_flat_cosine, build_lr_scheduler, build_optimizer, group_lrs
from src.dl.train.settings import DataSettings
from src.dl.train.setup import split_dataset
from tests.helpers.train_data import assert_same_weights, make_detection_data, train_config

BASE_LR, BACKBONE_LR = 1e-2, 1e-4


class TwoPartModel(nn.Module):
    """A backbone and a head: the two LR groups of the real model."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.decoder = nn.Linear(4, 2)


def _optimizer() -> torch.optim.Optimizer:
    return build_optimizer(TwoPartModel(), BASE_LR, BACKBONE_LR, weight_decay=0.01)


def _lr_curve(optimizer, scheduler, steps: int) -> list[dict[str, float]]:
    """The LR of each group at every optimizer step (read before the step, as the trainer uses it)."""
    curve = []
    for _ in range(steps):
        curve.append(group_lrs(optimizer))
        optimizer.step()
        scheduler.step()
    return curve


# ---------------------------------------------------------------- flat-cosine LR


def test_flat_cosine_shape_for_both_groups():
    """10 epochs x 10 steps: warm-up 4 steps, flat to epoch 5, cosine to epoch 8, 2 no-aug epochs at min."""
    optimizer = _optimizer()
    scheduler = build_flat_cosine(
        optimizer, [10] * 10, warmup_steps=4, flat_epochs=5, no_aug_epochs=2, min_lr_ratio=0.3
    )
    curve = _lr_curve(optimizer, scheduler, 100)
    for name, peak in (("lr_rest", BASE_LR), ("lr_backbone", BACKBONE_LR)):
        lrs = np.array([row[name] for row in curve])
        # quadratic warm-up (DEIM), its last step at the peak
        assert np.allclose(lrs[:4], peak * (np.arange(1, 5) / 4) ** 2)
        assert np.allclose(lrs[4:50], peak)  # flat
        decay = lrs[50:80]
        assert decay[0] == pytest.approx(peak) and np.all(np.diff(decay) < 0)  # cosine, strictly down
        assert decay[15] == pytest.approx(0.3 * peak + 0.7 * peak * 0.5)  # half way: the cosine's mid value
        assert np.allclose(lrs[80:], 0.3 * peak)  # the no-aug epochs at the minimum
    ratios = [row["lr_backbone"] / row["lr_rest"] for row in curve]
    assert np.allclose(ratios, BACKBONE_LR / BASE_LR)  # each group keeps its own max LR throughout


def test_flat_cosine_boundaries_follow_uneven_epochs_and_defaults():
    # Epoch lengths differ (background-ignoring epochs are shorter): boundaries are sums of real steps.
    scheduler = build_flat_cosine(_optimizer(), [3, 5, 7, 9], 2, None, 1, 0.5)
    assert (scheduler.flat_end, scheduler.decay_end) == (8, 15)  # flat_epochs null = half of the epochs
    # DEIM's 2000 warm-up steps would outlast a small run: capped at the flat phase
    assert build_flat_cosine(_optimizer(), [10] * 4, 2000, 2, 0, 0.5).warmup_steps == 20
    # A flat phase reaching into the no-aug epochs wins (DEIM checks it first): max LR to the end
    late = FlatCosineLR(_optimizer(), warmup_steps=0, flat_end=30, decay_end=20, min_lr_ratio=0.5)
    assert [late.lr_factor(s) for s in (0, 19, 29)] == [1.0, 1.0, 1.0] and late.lr_factor(30) == 0.5
    with pytest.raises(ValueError, match="min_lr_ratio"):
        FlatCosineLR(_optimizer(), 0, 1, 2, min_lr_ratio=1.5)


def test_flat_cosine_state_round_trips_through_a_weights_only_checkpoint():
    def fresh():
        optimizer = _optimizer()
        return optimizer, build_flat_cosine(optimizer, [10] * 6, 5, 2, 1, 0.2)

    optimizer, scheduler = fresh()
    _lr_curve(optimizer, scheduler, 23)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    expected = _lr_curve(optimizer, scheduler, 30)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    optimizer, scheduler = fresh()
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    assert _lr_curve(optimizer, scheduler, 30) == expected  # bit-exact continuation


def test_train_scheduler_key_picks_the_schedule():
    from dataclasses import replace

    from src.dl.train.settings import TrainSettings

    def schedule(*overrides: str):
        return TrainSettings.from_config(load_config(list(overrides))).optim.schedule

    onecycle = schedule("train.scheduler=onecycle")
    assert isinstance(build_lr_scheduler(_optimizer(), onecycle, [5, 5]), torch.optim.lr_scheduler.OneCycleLR)
    flat = schedule("train.scheduler=flat_cosine", "train.no_aug_epochs=1")
    scheduler = build_lr_scheduler(_optimizer(), flat, [5, 5, 5, 5])
    assert isinstance(scheduler, FlatCosineLR) and (scheduler.flat_end, scheduler.decay_end) == (10, 15)
    with pytest.raises(ValueError, match="train.scheduler"):
        build_lr_scheduler(_optimizer(), replace(onecycle, name="step"), [5])


# ---------------------------------------------------------------- mixup transform


def test_mix_up_blends_the_pictures_and_keeps_the_boxes_of_both():
    first = np.full((40, 80, 3), 200, np.uint8)  # w 80, h 40: resized to (64, 64) -> x * 0.8, y * 1.6
    second = np.full((64, 32, 3), 0, np.uint8)  # w 32, h 64 -> x * 2, y * 1
    second[0:32, 0:16] = 100
    first_boxes, second_boxes = (
        np.array([[10, 5, 50, 20]], np.float32),
        np.array([[0, 0, 16, 32]], np.float32),
    )
    image, boxes, labels, *_ = mix_up(
        (first, first_boxes, np.array([1])),
        (second, second_boxes, np.array([3])),
        img_size=(64, 64),
        keep_ratio=False,
        ratio=0.5,
    )
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image[10, 10, 0] == 150  # 0.5 * 200 + 0.5 * 100 (inside the second picture's bright block)
    assert image[50, 50, 0] == 100  # 0.5 * 200 + 0.5 * 0
    assert np.allclose(boxes, [[8, 8, 40, 32], [0, 0, 32, 32]])
    assert labels.tolist() == [1, 3] and labels.dtype == np.int64


def test_mix_up_with_a_background_sample():
    empty = (np.zeros((4, 0), np.float32).reshape(0, 4), np.zeros(0, np.int64))
    sample = (np.zeros((32, 32, 3), np.uint8), np.array([[1, 1, 9, 9]], np.float32), np.array([0]))
    _, boxes, labels, *_ = mix_up(sample, (np.zeros((16, 16, 3), np.uint8), *empty), (32, 32), True, 0.55)
    assert boxes.tolist() == [[1, 1, 9, 9]] and labels.tolist() == [0]


# ---------------------------------------------------------------- dataset epochs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return make_detection_data(root, {"train": 6, "val": 2, "test": 1})


def _dataset(tmp_path, data_dir, *overrides):
    cfg = train_config(tmp_path, data_dir, "train.epochs=6", *overrides)
    return split_dataset(cfg, "train"), cfg


def test_mixup_only_inside_its_epochs_and_reproducible(tmp_path, data_dir):
    dataset, _ = _dataset(
        tmp_path, data_dir, "train.mixup.prob=1.0", "train.mixup.epochs=[1,3]", "train.mosaic.prob=0"
    )
    mixed = {}
    for epoch in range(6):
        dataset.set_epoch(epoch)
        mixed[epoch] = [dataset[p][1]["mixup"] for p in range(len(dataset))]
    assert [all(mixed[e]) for e in range(6)] == [False, True, True, False, False, False]
    assert not any(mixed[0] + mixed[3] + mixed[5])

    dataset.set_epoch(1)
    image, target = dataset[2]
    again_image, again_target = dataset[2]  # same (seed, epoch, index): same partner, ratio and boxes
    assert torch.equal(image, again_image) and torch.equal(target["boxes"], again_target["boxes"])
    alone = split_dataset(_dataset(tmp_path, data_dir, "train.mosaic.prob=0")[1], "train", train=False)
    assert len(target["boxes"]) > len(alone[2][1]["boxes"])  # its own boxes and the partner's


def test_mixup_epochs_must_be_a_pair(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"train.mixup.epochs must be \[start, end\]"):
        _dataset(tmp_path, data_dir, "train.mixup.epochs=[4]")


def test_no_aug_epochs_switch_off_every_augmentation(tmp_path, data_dir):
    every_aug = [f"train.augs.{k}=1.0" for k in ("left_right_flip", "up_down_flip", "brightness_contrast")]
    dataset, cfg = _dataset(
        tmp_path, data_dir, "train.no_aug_epochs=2", "train.mosaic.prob=1.0", "train.mosaic.no_mosaic_epochs=0",
        "train.mixup.prob=1.0", "train.mixup.epochs=[0,null]", "train.multiscale_prob=1.0", *every_aug,
    )  # fmt: skip
    plain = split_dataset(cfg, "train", train=False)
    collate = build_collate(DataSettings.from_config(cfg), train=True)

    dataset.set_epoch(3)  # the last epoch with augmentation
    collate.set_epoch(3)
    image, target = dataset[0]
    assert target["mosaic"] and target["mixup"] and collate.enabled

    for epoch in (4, 5):
        dataset.set_epoch(epoch)
        collate.set_epoch(epoch)
        assert not (dataset.mosaic_enabled or dataset.mixup_enabled or collate.enabled)
        for position in range(len(dataset)):
            image, target = dataset[position]
            expected_image, expected = plain[position]
            assert torch.equal(image, expected_image)  # no flip, no colour change, no mosaic, no mixup
            assert torch.equal(target["boxes"], expected["boxes"])
            assert not target["mosaic"] and not target["mixup"]
        batch_images, _ = collate([dataset[0], dataset[1]])
        assert tuple(batch_images.shape[-2:]) == tuple(cfg.model.img_size)  # no multiscale either


# ---------------------------------------------------------------- real training


DEIM_RUN = (
    "train.epochs=2",
    "train.max_steps_per_epoch=2",
    "train.scheduler=flat_cosine",
    "train.flat_cosine.warmup_steps=1",
    "train.flat_cosine.flat_epochs=1",
    "train.flat_cosine.min_lr_ratio=0.25",
    "train.no_aug_epochs=1",
    "train.mixup.prob=1.0",
    "train.mixup.epochs=[0,null]",
    "train.mosaic.prob=0.5",
    "train.checkpoint_every_steps=1",
)


def _save_weights(path: Path, num_classes: int = 3) -> Path:
    from src.models import build_model

    torch.save({"model": build_model("n", num_classes, img_size=(64, 64)).state_dict()}, path)
    return path


def test_trainer_follows_the_pretrained_arch_or_says_it_cannot_tell(tmp_path):
    from src.dl.train.run import follow_pretrained_arch

    deim = _save_weights(tmp_path / "deim_dfine_hgnetv2_n_coco.pth")
    cfg = load_config(["model.arch=dfine", f"train.pretrained_model_path={deim}"])
    level, message = follow_pretrained_arch(cfg)
    assert level == "WARNING" and "MODEL ARCH CHANGED" in message and cfg.model.arch == "deim_dfine"
    assert follow_pretrained_arch(cfg)[0] == "INFO"  # now they agree

    unknown = _save_weights(tmp_path / "weights.pth")
    cfg = load_config(["model.variant=dfine", f"train.pretrained_model_path={unknown}"])
    level, message = follow_pretrained_arch(cfg)
    assert level == "INFO" and "Training model.arch=dfine" in message and "cannot be told apart" in message
    assert cfg.model.arch == "dfine"
    cfg = load_config(["train.resume=true", f"train.pretrained_model_path={deim}"])
    assert follow_pretrained_arch(cfg) is None  # a resumed run keeps its saved arch
    assert follow_pretrained_arch(load_config(["train.pretrained_model_path=null"])) is None


@pytest.mark.usefixtures("one_torch_thread")
def test_training_with_the_deim_schedule_resumes_exactly(tmp_path, data_dir):
    """flat_cosine + mixup + no-aug epoch on D-FINE-n, started from DEIM weights with model.variant=dfine (the
    weights win: DEIM); killed after step 1 and resumed it ends with the same weights as a straight run."""
    from src.dl.train import TrainingAborted, run

    weights = _save_weights(tmp_path / "deim_n_weights.pth")
    deim_run = (*DEIM_RUN, "model.variant=dfine", f"train.pretrained_model_path={weights}")
    straight = run(train_config(tmp_path, data_dir, "exp_name=straight", *deim_run))
    folder = Path(straight["exp_dir"])
    saved = OmegaConf.load(folder / "config.yaml")
    assert saved.model.arch == "deim_dfine" and saved.train.scheduler == "flat_cosine"
    assert torch.load(folder / "best.pt", weights_only=True)["meta"]["arch"] == "deim_dfine"
    history = pd.read_csv(folder / "history.csv")
    base_lr = float(load_config([]).train.lrs.n.base_lr)
    # 2 steps per epoch: step 0 warm-up (at the max), step 1 flat, then the no-aug epoch at the minimum
    assert history["lr_rest"].tolist() == pytest.approx([0.25 * base_lr, 0.25 * base_lr])
    assert "loss_mal" in history.columns  # the DEIM variant trains with MAL
    log = (folder / "train_log.txt").read_text()
    assert "LR schedule: flat_cosine" in log and "no augmentation for the last 1 epoch" in log
    assert "MODEL ARCH CHANGED" in log
    assert list((folder / "debug_images" / "train").glob("*_mixup.jpg"))

    with pytest.raises(TrainingAborted):
        run(train_config(tmp_path, data_dir, "exp_name=killed", "train.abort_after_steps=1", *deim_run))
    resumed = run(train_config(tmp_path, data_dir, "exp_name=killed", "train.resume=true", *deim_run))
    assert resumed["epochs_trained"] == 2
    a = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(Path(resumed["exp_dir"]) / "last.pt", map_location="cpu", weights_only=True)
    assert a["scheduler"] == b["scheduler"]
    assert_same_weights(a, b, ema=False)
    assert math.isclose(a["optimizer"]["param_groups"][0]["lr"], b["optimizer"]["param_groups"][0]["lr"])
