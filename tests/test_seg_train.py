"""Segmentation training: masks move with boxes through every augmentation, the dataset's mask
targets, box-only labels refused or allowed, and a real 2-step D-FINE-n segmentation run."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from src.common.config import load_config
from src.common.errors import ConfigError, UserError
from src.common.masks import polygon_to_mask
from src.dl.train.augment import (
    MosaicParams,
    Sample,
    apply_augmentations,
    boxes_from_masks,
    build_augmentations,
    fit_boxes_to_masks,
    make_mosaic,
    mix_up,
    random_affine,
)
from src.dl.train.evaluation import check_decision_metrics
from src.dl.train.setup import split_dataset
from src.models.checkpoint import load_run_checkpoint
from tests.helpers.train_data import train_overrides, write_splits

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

# One distinct colour per object, so an object's pixels can be found in any augmented picture.
PALETTE = [(230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40), (230, 40, 230), (40, 230, 230)]


def polygon_sample(height: int, width: int, polygons: list[np.ndarray], first_colour: int = 0) -> Sample:
    """A dark picture with each normalised polygon filled in its own colour; masks = those pixels exactly."""
    image = np.full((height, width, 3), 20, np.uint8)
    masks = np.stack([polygon_to_mask(p, height, width) for p in polygons]).astype(np.uint8)
    for k, mask in enumerate(masks):
        image[mask.astype(bool)] = PALETTE[first_colour + k]
    boxes, _ = boxes_from_masks(masks)
    labels = np.arange(first_colour, first_colour + len(polygons), dtype=np.int64)  # label = colour index
    return Sample(image, boxes, labels, masks, np.ones(len(polygons), bool))


TRIANGLE = np.array([[0.1, 0.2], [0.45, 0.15], [0.3, 0.7]], np.float32)
SQUARE = np.array([[0.55, 0.4], [0.9, 0.4], [0.9, 0.85], [0.55, 0.85]], np.float32)


def colour_pixels(image: np.ndarray, label: int) -> np.ndarray:
    return np.abs(image.astype(int) - np.array(PALETTE[label])).max(-1) < 40


def near(pixels: np.ndarray) -> np.ndarray:
    """The pixels and those within 2 px (a tile's resize then the affine blur an edge over ~2 px)."""
    return cv2.dilate(pixels.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)


def assert_masks_on_objects(sample: Sample, box_tolerance: float = 2.0, exact_boxes: bool = True) -> None:
    """Pixel check: each mask covers its object's colour and lies on it within 2 px (edges blend), and its
    box is the bounding box of the object's pixels within box_tolerance px (exact_boxes), or at least
    encloses the mask (boxes loosened by rotation, or by clipping an object at the picture's edge)."""
    assert sample.masks.shape == (len(sample.labels), *sample.image.shape[:2])
    mask_boxes, present = boxes_from_masks(sample.masks)
    assert present.all()
    for mask, box, mask_box, label in zip(sample.masks, sample.boxes, mask_boxes, sample.labels, strict=True):
        colour, mask = colour_pixels(sample.image, int(label)), mask.astype(bool)
        assert colour.any(), label
        assert not (colour & ~near(mask)).any() and not (mask & ~near(colour)).any(), label
        ys, xs = np.where(colour)
        colour_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        if exact_boxes:
            assert np.abs(box - colour_box).max() <= box_tolerance, (label, box, colour_box)
        else:
            assert (mask_box[:2] >= box[:2] - box_tolerance).all(), (label, box, mask_box)
            assert (mask_box[2:] <= box[2:] + box_tolerance).all(), (label, box, mask_box)


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_keeps_masks_aligned_with_boxes(seed):
    samples = [
        polygon_sample(90, 120, [TRIANGLE, SQUARE], 0),
        polygon_sample(100, 80, [SQUARE], 2),
        polygon_sample(70, 110, [TRIANGLE], 3),
        polygon_sample(120, 120, [TRIANGLE, SQUARE], 4),
    ]
    params = MosaicParams(scale=(0.8, 1.2), degrees=0.0, shear=0.0, translate=0.1)
    out = make_mosaic(samples, (96, 128), True, params, np.random.default_rng(seed))
    assert out.image.shape == (96, 128, 3) and len(out.labels) > 0
    assert_masks_on_objects(out, exact_boxes=False)  # boxes of objects cut by a tile's edge stay loose ...
    assert_masks_on_objects(fit_boxes_to_masks(out))  # ... until fitted to the masks
    # A detection mosaic of the same samples draws the same picture and boxes (masks cost nothing there).
    plain = make_mosaic([s[:3] for s in samples], (96, 128), True, params, np.random.default_rng(seed))
    assert plain.masks is None and np.array_equal(plain.image, out.image)
    assert np.array_equal(plain.boxes, out.boxes) and np.array_equal(plain.labels, out.labels)


@pytest.mark.parametrize("seed", range(3))
def test_affine_with_rotation_and_shear_moves_masks_with_the_image(seed):
    sample = polygon_sample(100, 140, [TRIANGLE, SQUARE])
    params = MosaicParams(scale=(0.7, 1.1), degrees=25.0, shear=5.0, translate=0.1)
    out = random_affine(*sample[:3], (96, 128), params, np.random.default_rng(seed), *sample[3:])
    assert_masks_on_objects(out, exact_boxes=False)  # corner-transformed boxes enclose the masks
    assert_masks_on_objects(fit_boxes_to_masks(out))  # ... and fit the objects once fitted to the masks


@pytest.mark.parametrize("seed", range(6))
def test_albumentations_flip_rotate_keep_masks_of_the_boxes_they_keep(seed):
    augs = {
        "left_right_flip": 0.5, "up_down_flip": 0.5, "rotate_90": 0.5, "rotation_degree": 30, "rotation_p": 0.5,
        "brightness_contrast": 0.0, "gamma": 0.0, "blur": 0.0, "noise": 0.0, "to_gray": 0.0, "coarse_dropout": 0.0,
    }  # fmt: skip
    sample = polygon_sample(90, 130, [TRIANGLE, SQUARE])
    out = apply_augmentations(build_augmentations(augs, seed=seed), *sample)
    assert_masks_on_objects(out, exact_boxes=False)
    assert_masks_on_objects(fit_boxes_to_masks(out))
    # An object albumentations drops (moved out of the picture) takes its mask with it.
    far = sample._replace(boxes=np.concatenate([sample.boxes, [[0, 0, 0.5, 0.5]]]).astype(np.float32))
    far = far._replace(labels=np.array([0, 1, 5]), masks=np.concatenate([sample.masks, sample.masks[:1] * 0]))
    far = far._replace(has_mask=np.ones(3, bool))
    dropped = apply_augmentations(build_augmentations(augs, seed=seed), *far)
    assert 5 not in dropped.labels.tolist() and len(dropped.masks) == len(dropped.labels)


def test_mix_up_keeps_the_masks_of_both_samples():
    first, second = polygon_sample(90, 120, [TRIANGLE], 0), polygon_sample(60, 60, [SQUARE], 1)
    out = mix_up(first, second, (64, 96), True, 0.5)
    assert out.masks.shape == (2, 64, 96) and out.has_mask.tolist() == [True, True]
    mask_boxes, present = boxes_from_masks(out.masks)
    assert present.all() and np.abs(mask_boxes - out.boxes).max() <= 1.5


# ---------------------------------------------------------------- the dataset


def make_polygon_data(root: Path, splits: dict[str, int], box_line_in: str | None = None) -> Path:
    """Images with 1-3 triangles/quads as YOLO-seg polygon lines (+ one box line in `box_line_in`)."""

    def sample(rng, name):
        width, height = int(rng.integers(90, 140)), int(rng.integers(90, 140))
        image = rng.integers(0, 50, (height, width, 3), dtype=np.uint8)
        lines = []
        for _ in range(int(rng.integers(1, 4))):
            centre, size = rng.uniform(0.3, 0.7, 2), rng.uniform(0.15, 0.3)
            corners = int(rng.integers(3, 5))
            angles = np.sort(rng.uniform(0, 2 * np.pi, corners)) if corners == 3 else np.arange(4) * np.pi / 2
            polygon = np.clip(centre + size * np.stack([np.cos(angles), np.sin(angles)], 1), 0.02, 0.98)
            class_id = corners - 3  # 0 triangle, 1 quad
            image[polygon_to_mask(polygon, height, width)] = (200, 120 + 100 * class_id, 60)
            lines.append(f"{class_id} " + " ".join(f"{v:.5f}" for v in polygon.reshape(-1)))
        if name == box_line_in:
            lines.append("1 0.2 0.2 0.1 0.1")
        return image, lines

    return write_splits(root, splits, sample)


def overrides(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return train_overrides(
        tmp_path,
        data,
        "exp_name=seg",
        "label_to_name={0: triangle, 1: quad}",
        "model.task=segment",
        "train.eval_images=1",
        "train.mask_loss.points=64",
        "train.allow_leaks=true",  # one diamond on dark noise: train_2 and val_0 are near-duplicates
        *extra,
    )


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    return make_polygon_data(tmp_path_factory.mktemp("seg"), {"train": 6, "val": 2, "test": 1})


def test_segmentation_targets_carry_masks_that_fit_their_boxes(tmp_path, seg_data):
    cfg = load_config(overrides(tmp_path, seg_data, "train.mosaic.prob=1.0", "train.augs.rotation_p=1.0"))
    train = split_dataset(cfg, "train")
    for position in range(len(train)):
        image, target = train[position]
        masks = target["masks"]
        assert masks.dtype == torch.bool and masks.shape == (len(target["labels"]), 64, 64)
        assert target["has_mask"].all() and "polygons" not in target  # augmented: no label polygons
        if len(masks):
            fitted, present = boxes_from_masks(masks.numpy())
            boxes = target["boxes"].numpy()  # normalised cxcywh
            xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1) * 64
            assert present.all() and np.abs(xyxy - fitted).max() < 1e-3
    for keep_ratio in ("true", "false"):  # plain samples: polygons drawn straight at the network input
        val = split_dataset(
            load_config(overrides(tmp_path, seg_data, f"model.keep_ratio={keep_ratio}")), "val"
        )
        for position in range(len(val)):
            _, target = val[position]
            assert len(target["polygons"]) == len(target["labels"]) == len(target["masks"])
            fitted, present = boxes_from_masks(target["masks"].numpy())
            boxes = target["boxes"].numpy()  # the label boxes: the polygons' own boxes
            xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1) * 64
            assert present.all() and np.abs(xyxy - fitted).max() <= 1.0
    # A detection run of the same data rasterises nothing.
    detect = split_dataset(load_config(overrides(tmp_path, seg_data, "model.task=detect")), "train")
    assert "masks" not in detect[0][1] and detect.load_sample(0).masks is None


def test_box_only_labels_are_refused_unless_allowed(tmp_path):
    data = make_polygon_data(tmp_path / "mixed", {"train": 3, "val": 1}, box_line_in="train_1.jpg")
    with pytest.raises(UserError, match=r"train_1\.txt.*train\.allow_box_only=true"):
        split_dataset(load_config(overrides(tmp_path, data)), "train")
    cfg = load_config(overrides(tmp_path, data, "train.allow_box_only=true", "train.mosaic.prob=1.0"))
    _, target = split_dataset(cfg, "train", train=False)[1]
    assert target["has_mask"].tolist()[-1] is False and target["has_mask"][:-1].all()
    assert not target["masks"][-1].any()  # the box-only object: an empty mask, no mask loss
    augmented = split_dataset(cfg, "train")  # mosaics: the box-only object keeps its box (no mask to fit)
    flags = torch.cat([augmented[i][1]["has_mask"] for i in range(len(augmented))])
    assert not flags.all() and flags.any()


def test_segmentation_run_on_box_labels_is_refused_in_one_line(tmp_path):
    """The stage (python -m src.dl.train): exit 2, the message names the file, no traceback, no run folder."""
    import subprocess
    import sys

    data = make_polygon_data(tmp_path / "mixed", {"train": 2, "val": 1}, box_line_in="train_0.jpg")
    command = [sys.executable, "-m", "src.dl.train", *overrides(tmp_path, data)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train_0.txt" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "output" / "seg" / "last.pt").exists()


def test_mask_decision_metrics_need_a_segmentation_model():
    check_decision_metrics(["mask_mAP_50", "f1"], "segment")
    with pytest.raises(ConfigError, match=r"mask_mAP_50_95.*model\.task=segment"):
        check_decision_metrics(["mask_mAP_50_95"], "detect")


def test_two_step_segmentation_training_writes_mask_metrics(tmp_path, seg_data):
    from src.dl.train import run

    extra = (
        "train.decision_metrics=[mask_mAP_50,mAP_50]",
        "train.multiscale_prob=1.0",  # masks stay at the input size: the mask loss samples normalised points
        "train.mosaic.prob=0.5",
        "train.mixup.prob=0.5",
        "train.mixup.epochs=[0,null]",
    )
    cfg = load_config(overrides(tmp_path, seg_data, *extra))
    run(cfg)
    exp = tmp_path / "output" / "seg"
    history = pd.read_csv(exp / "history.csv")
    for column in ("loss_mask_bce", "loss_mask_dice", "mask_mAP_50", "mask_mAP_50_95", "mAP_50"):
        assert column in history.columns and history[column].notna().all(), column
    assert (history["loss_mask_bce"] > 0).all()
    metrics = pd.read_csv(exp / "metrics.csv")
    assert {"mask_mAP_50", "mask_mAP_50_95"} <= set(metrics.columns)
    assert set(metrics["split"]) >= {"val", "test"}
    per_class = pd.read_csv(exp / "per_class.csv")
    assert {"mask_AP50", "mask_AP50_95"} <= set(per_class.columns)
    assert len(list((exp / "debug_images" / "train").glob("*.jpg"))) == 2
    best = load_run_checkpoint(exp / "best.pt")
    assert best.spec.task == "segment" and "mask_mAP_50" in best.metrics
