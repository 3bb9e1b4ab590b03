"""train.cache (src/dl/train/cache.py): the same samples as without it, a disk cache reused, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.common.errors import ConfigError
from src.dl.train import cache as cache_module
from src.dl.train.setup import datasets_of
from tests.helpers.train_data import dataset_config as config
from tests.helpers.train_data import make_dataset_images


@pytest.fixture
def data_root(tmp_path) -> Path:
    """The five images of tests/helpers/train_data.py with their labels and split CSVs."""
    return make_dataset_images(tmp_path / "data")


def _datasets(data_root, mode: str, *overrides: str):
    cfg = config(
        data_root, f"train.cache={mode}", f"train.cache_dir={data_root.parent / 'cache'}", *overrides
    )
    return datasets_of(cfg, log=False)


def _all_samples(dataset, epoch: int = 0):
    dataset.set_epoch(epoch)
    return [dataset[position] for position in range(len(dataset))]


def _assert_same(samples, expected):
    for (image, target), (image_0, target_0) in zip(samples, expected, strict=True):
        assert torch.equal(image, image_0)
        assert target["orig_size"].tolist() == target_0["orig_size"].tolist()
        assert target["letterbox"] == target_0["letterbox"]
        assert target["labels"].tolist() == target_0["labels"].tolist()
        torch.testing.assert_close(target["boxes"], target_0["boxes"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("keep_ratio", [True, False])
def test_cached_val_samples_equal_uncached_ones_bit_for_bit(data_root, keep_ratio):
    ratio = f"model.keep_ratio={keep_ratio}"
    expected = _all_samples(_datasets(data_root, "off", ratio)["val"])
    for mode in ("ram", "disk"):
        datasets = _datasets(data_root, mode, ratio)
        assert datasets["val"].cache.mode == mode and "test" in datasets and datasets["test"].cache is None
        _assert_same(_all_samples(datasets["val"]), expected)


def test_cached_mosaics_equal_uncached_ones(data_root):
    mosaic = ("train.mosaic.prob=1.0", "train.epochs=5")
    expected = _all_samples(_datasets(data_root, "off", *mosaic)["train"], epoch=1)
    samples = _all_samples(_datasets(data_root, "ram", *mosaic)["train"], epoch=1)
    assert all(target["mosaic"] for _, target in samples)
    _assert_same(samples, expected)


def test_disk_cache_is_reused_and_misses_an_edited_image(data_root, monkeypatch):
    _datasets(data_root, "disk")
    files = sorted((data_root.parent / "cache").rglob("*.npy"))
    assert len(files) == 5  # train and val list the same 5 images: one file each
    decoded = []
    monkeypatch.setattr(cache_module, "read_image_rgb", lambda path: decoded.append(path) or 1 / 0)
    _datasets(data_root, "disk")  # every image from the cache: nothing decoded
    assert decoded == []
    monkeypatch.undo()
    (data_root / "images" / "odd.png").touch()  # a newer modification time: its cache file is stale
    _datasets(data_root, "disk")
    assert len(sorted((data_root.parent / "cache").rglob("*.npy"))) == 6


def test_a_cache_that_does_not_fit_is_refused_before_decoding(data_root, monkeypatch):
    monkeypatch.setattr(cache_module, "ram_available_bytes", lambda: 10_000)
    monkeypatch.setattr(cache_module, "read_image_rgb", lambda path: pytest.fail("decoded before refusing"))
    with pytest.raises(
        ConfigError, match=r"train.cache=ram: 10 images need up to 180.0 KiB but memory has 7.8 KiB"
    ):
        _datasets(data_root, "ram")
    monkeypatch.setattr(cache_module, "disk_free_bytes", lambda path: 1000)
    with pytest.raises(ConfigError, match=r"train.cache=disk: 5 images need .* available"):
        _datasets(data_root, "disk")
    with pytest.raises(ConfigError, match="train.cache must be one of off | ram | disk"):
        _datasets(data_root, "gpu")
