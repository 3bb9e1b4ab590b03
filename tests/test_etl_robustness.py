"""Classes named by label_to_name, and the measured robustness defects: read-only images/,
truncated JPEGs judged by their header, atomic writes with mode 0600."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.common.errors import UserError
from src.common.io import atomic_write_csv, atomic_write_json, atomic_write_text
from src.etl import preprocess, split
from src.etl.doctor import DatasetError, check_dataset
from tests.etl_data import etl_config, make_dataset, save_image

THREE_CLASSES = ["~label_to_name", "+label_to_name={0: a, 1: b, 2: c}"]


def test_unnamed_class_ids_stop_check_and_split_with_files_listed(tmp_path):
    data = make_dataset(
        tmp_path / "data",
        {
            "ok.jpg": "0 0.5 0.5 0.2 0.2\n",
            "x.jpg": "1 0.5 0.5 0.2 0.2\n3 0.3 0.3 0.1 0.1\n",
            "y.jpg": "5 .5 .5 .1 .1\n",
        },
    )
    for stage in (check_dataset, split.run):
        # skip_bad does not hide it: the labels use a class the config does not have
        cfg = etl_config(tmp_path, data, *THREE_CLASSES, "check.skip_bad=true")
        with pytest.raises(DatasetError) as info:
            stage(cfg)
        message = str(info.value)
        assert "class id(s) 3, 5" in message and "labels/x.txt:2" in message and "labels/y.txt:1" in message
        assert "{0: a, 1: b, 2: c}" in message
    assert not (data / "train.csv").exists()


def test_names_that_never_occur_are_a_warning(tmp_path, caplog_loguru):
    data = make_dataset(tmp_path / "data", {"a.jpg": "0 0.5 0.5 0.2 0.2\n", "b.jpg": "1 0.5 0.5 0.2 0.2\n"})
    report = check_dataset(etl_config(tmp_path, data, *THREE_CLASSES))
    assert report.usable_images == ["a.jpg", "b.jpg"]
    assert "no label uses: 2: c" in caplog_loguru.text


def _make_read_only(folder: Path) -> bool:
    """chmod, and where that does not bind (root), the immutable flag; False when neither works here."""
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.touch()
    except OSError:
        return True
    probe.unlink()
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def test_read_only_images_folder_refused_before_anything_moves(tmp_path):
    data = tmp_path / "data"
    save_image(data / "images" / "a.png", (20, 10))
    save_image(data / "images" / "b.jpg", (20, 10))
    before = sorted(p.name for p in (data / "images").iterdir())
    if not _make_read_only(data / "images"):
        pytest.skip("cannot make a folder read-only here")
    try:
        with pytest.raises(UserError, match=r"cannot write in .*images.*Nothing was changed"):
            preprocess.run(etl_config(tmp_path, data))
    finally:
        subprocess.run(["chattr", "-i", str(data / "images")], capture_output=True)
        (data / "images").chmod(0o755)
    assert sorted(p.name for p in (data / "images").iterdir()) == before
    assert not (data / "originals").exists()


def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is intact but whose last scan lines are missing (what an interrupted copy leaves)."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:-2000])
    with Image.open(path) as header:  # the header alone looks fine: the old check let it pass
        assert header.size == (128, 96)
    return path


def test_truncated_jpeg_reported_and_kept(tmp_path):
    data = tmp_path / "data"
    save_image(data / "images" / "good.jpg", (20, 10))
    cut = truncated_jpeg(data / "images" / "cut.jpg")
    cut_bytes = cut.read_bytes()
    summary = preprocess.run(etl_config(tmp_path, data))
    unreadable = {o.source.name: o.message for o in summary.by_status(preprocess.UNREADABLE)}
    assert list(unreadable) == ["cut.jpg"] and "truncated" in unreadable["cut.jpg"]
    assert cut.read_bytes() == cut_bytes  # left in place, never deleted or moved
    # the doctor names it too, and with skip_bad leaves it out
    report = check_dataset(etl_config(tmp_path, data, "check.skip_bad=true"))
    assert report.excluded_images == ["cut.jpg"] and report.usable_images == ["good.jpg"]
    assert cut.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writes_keep_the_umask(tmp_path, umask):
    import pandas as pd

    old = os.umask(umask)
    try:
        paths = [
            atomic_write_text(tmp_path / "a.txt", "x"),
            atomic_write_json(tmp_path / "b.json", {"a": 1}),
            atomic_write_csv(tmp_path / "c.csv", pd.DataFrame({"a": [1]})),
        ]
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
