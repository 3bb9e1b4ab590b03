"""etl.split: deterministic train/val/test CSVs of the doctor's usable images."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from src.etl import split
from src.etl.doctor import DatasetError
from tests.etl_data import etl_config, make_dataset


def labels_for(i: int) -> str | None:
    """100 images: every 10th background, 10 of them hold the rare class 3."""
    if i % 10 == 0:
        return None
    return f"{3 if i % 10 == 1 else i % 3} 0.5 0.5 0.2 0.2\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("split") / "data",
        {f"im{i:03d}.jpg": labels_for(i) for i in range(100)},
        size=(8, 8),
    )


def read_splits(folder):
    return {name: pd.read_csv(folder / f"{name}.csv")["image"].tolist() for name in split.SPLITS}


def test_ratios_deterministic_disjoint(tmp_path, data):
    cfg = etl_config(tmp_path, data, f"splits_dir={tmp_path / 'a'}")
    first = split.run(cfg)
    assert [len(first[s]) for s in split.SPLITS] == [80, 10, 10]
    assert sorted(sum(first.values(), [])) == sorted(p.name for p in (data / "images").iterdir())
    assert read_splits(tmp_path / "a") == first
    assert list(pd.read_csv(tmp_path / "a" / "train.csv").columns) == ["image"]
    assert split.run(etl_config(tmp_path, data, f"splits_dir={tmp_path / 'b'}")) == first
    assert split.run(etl_config(tmp_path, data, f"splits_dir={tmp_path / 'c'}", "seed=7")) != first


def test_test_zero_writes_empty_test_csv(tmp_path, data):
    out = tmp_path / "s"
    out.mkdir()
    (out / "test.csv").write_text("image\nstale.jpg\n")
    result = split.run(
        etl_config(tmp_path, data, f"splits_dir={out}", "split.train=0.9", "split.val=0.1", "split.test=0")
    )
    assert [len(result[s]) for s in split.SPLITS] == [90, 10, 0]
    assert read_splits(out)["test"] == []


def test_ignore_negatives(tmp_path, data):
    result = split.run(etl_config(tmp_path, data, f"splits_dir={tmp_path}", "split.ignore_negatives=true"))
    names = sum(result.values(), [])
    assert len(names) == 90 and "im000.jpg" not in names


def test_no_shuffle_keeps_sorted_blocks(tmp_path, data):
    result = split.run(etl_config(tmp_path, data, f"splits_dir={tmp_path}", "split.shuffle=false"))
    assert result["train"][-1] == "im079.jpg" and result["val"] == [f"im{i:03d}.jpg" for i in range(80, 90)]


def test_stratify_spreads_rare_class(tmp_path, data):
    result = split.run(etl_config(tmp_path, data, f"splits_dir={tmp_path}", "split.stratify=true"))
    rare = {
        s: sum(labels_for(int(n[2:5])) is not None and labels_for(int(n[2:5]))[0] == "3" for n in result[s])
        for s in split.SPLITS
    }
    assert rare == {"train": 8, "val": 1, "test": 1}  # 10 rare images dealt 80/10/10
    background = {s: sum(labels_for(int(n[2:5])) is None for n in result[s]) for s in split.SPLITS}
    assert background == {"train": 8, "val": 1, "test": 1}
    assert [len(result[s]) for s in split.SPLITS] == [80, 10, 10]


def test_duplicates_stay_together(tmp_path):
    data = make_dataset(
        tmp_path / "data", {f"im{i:02d}.jpg": "0 0.5 0.5 0.2 0.2\n" for i in range(20)}, size=(8, 8)
    )
    for copy in ["dup_a.jpg", "dup_b.jpg", "dup_c.jpg"]:
        shutil.copy(data / "images" / "im05.jpg", data / "images" / copy)
    result = split.run(
        etl_config(
            tmp_path, data, f"splits_dir={tmp_path}", "split.val=0.45", "split.test=0.45", "split.train=0.1"
        )
    )
    homes = {
        s
        for s, names in result.items()
        for n in names
        if n in {"im05.jpg", "dup_a.jpg", "dup_b.jpg", "dup_c.jpg"}
    }
    assert len(homes) == 1


def test_runs_the_doctor_first(tmp_path):
    data = make_dataset(
        tmp_path / "data",
        {f"im{i}.jpg": "0 0.5 0.5 0.2 0.2\n" for i in range(5)} | {"bad.jpg": "0 2 2 1 1\n"},
        size=(8, 8),
    )
    with pytest.raises(DatasetError, match=r"bad\.txt:1"):
        split.run(etl_config(tmp_path, data, f"splits_dir={tmp_path / 'x'}"))
    assert not (tmp_path / "x" / "train.csv").exists()
    result = split.run(etl_config(tmp_path, data, f"splits_dir={tmp_path / 'x'}", "check.skip_bad=true"))
    assert "bad.jpg" not in sum(result.values(), []) and len(sum(result.values(), [])) == 5


def test_bad_fractions(tmp_path, data):
    # refused when the config is built (src.common.config validates every key)
    with pytest.raises(ValueError, match=r"split\.train must be a number > 0"):
        split.run(etl_config(tmp_path, data, f"splits_dir={tmp_path}", "split.train=0"))
    with pytest.raises(ValueError, match=r"split\.val must be a number in \[0, 1\], got -0.1"):
        split.run(etl_config(tmp_path, data, f"splits_dir={tmp_path}", "split.val=-0.1"))
