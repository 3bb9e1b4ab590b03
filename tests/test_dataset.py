"""The training dataset on a tiny real data set: geometry, augmentation, epochs, batching, debug images."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from src.common.network_input import network_boxes_to_original_xyxy
from src.dl.train.dataset import (
    build_collate,
    collate_fn,
    save_all_debug_images,
    tensor_to_image,
)
from src.dl.train.settings import DataSettings
from src.dl.train.setup import datasets_of, split_dataset
from tests.helpers.train_data import COLORS, IMAGES, make_dataset_images
from tests.helpers.train_data import dataset_config as config


@pytest.fixture
def data_root(tmp_path) -> Path:
    """The five images of tests/helpers/train_data.py with their labels and split CSVs."""
    return make_dataset_images(tmp_path / "data")


def pixel_boxes(name: str) -> tuple[np.ndarray, np.ndarray]:
    objects = IMAGES[name][2]
    boxes = np.array([o[1:] for o in objects], np.float32).reshape(-1, 4)
    return boxes, np.array([o[0] for o in objects], np.int64)


def assert_boxes_cover_colours(image: torch.Tensor, target: dict, tolerance: float = 1.5) -> None:
    """Every target box encloses the clearly coloured pixels of its class nearest to it."""
    picture = tensor_to_image(image).astype(int)
    height, width = picture.shape[:2]
    boxes = network_boxes_to_original_xyxy(target["boxes"], target["letterbox"].identity(width, height))
    for box, label in zip(boxes, target["labels"].tolist(), strict=True):
        mask = np.abs(picture - np.array(COLORS[label])).max(-1) < 40
        x1, y1, x2, y2 = box
        near = mask.copy()
        near[: max(0, int(y1) - 3)] = False
        near[int(y2) + 3 :] = False
        near[:, : max(0, int(x1) - 3)] = False
        near[:, int(x2) + 3 :] = False
        ys, xs = np.where(near)
        assert len(xs), f"no {COLORS[label]} pixels near box {box}"
        assert xs.min() >= x1 - tolerance and xs.max() + 1 <= x2 + tolerance
        assert ys.min() >= y1 - tolerance and ys.max() + 1 <= y2 + tolerance


@pytest.mark.parametrize("keep_ratio", [True, False])
def test_eval_samples_map_labels_exactly(data_root, keep_ratio):
    dataset = split_dataset(config(data_root, f"model.keep_ratio={keep_ratio}"), "val")
    assert len(dataset) == len(IMAGES) and not dataset.train
    for position, name in enumerate(IMAGES):
        image, target = dataset[position]
        assert image.shape == (3, 64, 96) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        height, width, _ = IMAGES[name]
        assert target["orig_size"].tolist() == [width, height]
        assert target["image_id"] == position and Path(target["path"]).name == name
        assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
        boxes, labels = pixel_boxes(name)
        assert target["labels"].tolist() == labels.tolist()
        assert target["boxes"].shape == (len(labels), 4)
        back = network_boxes_to_original_xyxy(target["boxes"], target["letterbox"])
        np.testing.assert_allclose(back, boxes, atol=0.01)
        meta = target["letterbox"]
        assert_boxes_cover_colours(image, target, tolerance=max(1.5, meta.scale_x, meta.scale_y))


def test_background_sample_has_empty_targets(data_root):
    dataset = split_dataset(config(data_root), "val")
    _, target = dataset[list(IMAGES).index("empty.png")]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["labels"].dtype == torch.int64


def test_use_one_class(data_root):
    dataset = split_dataset(config(data_root, "model.use_one_class=true"), "val")
    assert dataset.class_names == ["object"]
    labels = torch.cat([dataset[i][1]["labels"] for i in range(len(dataset))])
    assert labels.unique().tolist() == [0]


@pytest.mark.parametrize("keep_ratio", [True, False])
def test_training_samples_with_mosaic_and_augs_stay_consistent(data_root, keep_ratio):
    cfg = config(
        data_root,
        f"model.keep_ratio={keep_ratio}",
        "train.mosaic.prob=0.7",
        "train.augs.left_right_flip=0.5",
        "train.augs.up_down_flip=0.5",
        "train.augs.rotate_90=0.5",
    )
    dataset = split_dataset(cfg, "train")
    dataset.set_epoch(0)
    mosaics = 0
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for position in range(len(dataset)):
            image, target = dataset[position]
            mosaics += target["mosaic"]
            assert image.shape == (3, 64, 96)
            boxes = target["boxes"]
            assert target["labels"].dtype == torch.int64 and boxes.dtype == torch.float32
            assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
            assert_boxes_cover_colours(image, target, tolerance=3.0)
    assert 0 < mosaics < 3 * len(dataset)


def test_training_samples_are_reproducible_per_epoch(data_root):
    cfg = config(data_root, "train.mosaic.prob=0.5", "train.augs.left_right_flip=0.5", "train.augs.noise=0.5")
    first, second = split_dataset(cfg, "train"), split_dataset(cfg, "train")
    first.set_epoch(1)
    second.set_epoch(1)
    for position in range(len(first)):
        assert torch.equal(first[position][0], second[position][0])
    second.set_epoch(2)
    assert any(not torch.equal(first[p][0], second[p][0]) for p in range(len(first)))


def test_set_epoch_closes_mosaic_and_ignores_background(data_root):
    cfg = config(
        data_root,
        "train.epochs=10",
        "train.mosaic.prob=1.0",
        "train.mosaic.no_mosaic_epochs=3",
        "train.ignore_background_epochs=2",
    )
    dataset = split_dataset(cfg, "train")
    dataset.set_epoch(0)
    assert len(dataset) == len(IMAGES) - 1  # the background image is left out...
    assert all(dataset[p][1]["mosaic"] for p in range(len(dataset)))
    assert all(Path(dataset[p][1]["path"]).name != "empty.png" for p in range(len(dataset)))
    dataset.set_epoch(2)
    assert len(dataset) == len(IMAGES)  # ... only for the first 2 epochs
    dataset.set_epoch(6)
    assert dataset.mosaic_enabled
    dataset.set_epoch(7)  # the last 3 epochs: no mosaic
    assert not dataset.mosaic_enabled
    assert not any(dataset[p][1]["mosaic"] for p in range(len(dataset)))
    val = split_dataset(cfg, "val")
    val.set_epoch(0)
    assert len(val) == len(IMAGES) and not val.mosaic_enabled  # evaluation never drops or mixes images


def test_loader_batches_multiscale_and_workers_see_the_epoch(data_root):
    cfg = config(
        data_root, "train.multiscale_prob=1.0", "train.ignore_background_epochs=1", "train.batch_size=2"
    )
    dataset = split_dataset(cfg, "train")
    dataset.set_epoch(0)
    loader = DataLoader(
        dataset,
        batch_size=2,
        num_workers=2,
        collate_fn=build_collate(DataSettings.from_config(cfg), train=True),
    )
    batches = list(loader)
    assert sum(len(targets) for _, targets in batches) == len(IMAGES) - 1
    for images, targets in batches:
        height, width = images.shape[2:]
        assert (height, width) != (64, 96) and height % 32 == 0 and width % 32 == 0
        assert width - 96 == height - 64
        assert isinstance(targets, list) and all("boxes" in t for t in targets)
    assert build_collate(DataSettings.from_config(cfg), train=False) is collate_fn
    images, targets = collate_fn([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 64, 96) and len(targets) == 2


def test_build_datasets_and_debug_images(data_root, tmp_path):
    cfg = config(data_root, "train.mosaic.prob=0.5")
    datasets = datasets_of(cfg, exclude=["odd.png"])
    assert set(datasets) == {"train", "val", "test"}
    assert len(datasets["train"]) == len(IMAGES) - 1 and len(datasets["test"]) == 2
    saved = save_all_debug_images(datasets, tmp_path / "exp", n=3)
    assert len(saved) == 3 + 3 + 2
    assert sorted(p.parent.name for p in saved) == ["test"] * 2 + ["train"] * 3 + ["val"] * 3
    assert all(p.stat().st_size > 0 and p.parent.parent.name == "debug_images" for p in saved)


def test_empty_test_split_is_left_out(data_root):
    pd.DataFrame({"image": []}).to_csv(data_root / "test.csv", index=False)
    assert set(datasets_of(config(data_root), log=False)) == {"train", "val"}


def test_clear_errors(data_root):
    (data_root / "labels" / "tall.txt").write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(ValueError, match=r"tall\.txt:1"):
        split_dataset(config(data_root), "val")
    (data_root / "val.csv").unlink()
    with pytest.raises(FileNotFoundError, match="val.csv"):
        split_dataset(config(data_root), "val")
    pd.DataFrame({"file": ["a.png"]}).to_csv(data_root / "train.csv", index=False)
    with pytest.raises(ValueError, match="column named 'image'"):
        split_dataset(config(data_root), "train")
