"""`python -m src.demo.screenshots` on a tiny experiment: every picture is written (the page screenshots only
where Debian's chromium is installed), and the record beside them names no machine path."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from src.common.config import load_config
from src.demo.screenshots import CHROMIUM, write_pictures
from tests.helpers.deploy_data import deploy_config, make_checkpoint, make_data, make_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A tiny detection experiment (data with a video, best.pt, curves.png) and a tiny segmentation one."""
    root = tmp_path_factory.mktemp("pictures")
    cfg = deploy_config(root)
    make_data(cfg)
    make_video(root / "data" / "videos" / "clip.mp4", frames=6)
    checkpoint = make_checkpoint(cfg)
    cv2.imwrite(str(checkpoint.with_name("curves.png")), np.full((40, 120, 3), 200, np.uint8))
    make_checkpoint(deploy_config(root, "exp_name=tiny_seg", "model.task=segment"), task="segment")
    return root


def staged(root):
    from src.common.experiment import stage_config

    return stage_config(load_config([f"output_dir={root / 'output'}", "exp_name=tiny", "device=cpu"]))


def test_pictures_without_browser(demo_folder, tmp_path):
    record = write_pictures(staged(demo_folder), tmp_path, browser=False, seg_exp_name="tiny_seg")
    expected = ["demo_tracking.png", "demo_segmentation.png", "demo_training_curves.png"]
    assert record["pictures"] == expected
    for name in expected:
        image = cv2.imread(str(tmp_path / name))
        assert image is not None and image.size > 0, name
    saved = json.loads((tmp_path / "pictures.json").read_text())
    assert saved["pictures"] == expected and len(saved["result_images"]) == 2
    assert isinstance(saved["same_class_pairs_iou_over_0.7"], int)
    assert str(demo_folder) not in (tmp_path / "pictures.json").read_text()  # names, no machine paths


def test_missing_segmentation_experiment_is_skipped(demo_folder, tmp_path):
    record = write_pictures(staged(demo_folder), tmp_path, browser=False, seg_exp_name="not_trained")
    assert "demo_segmentation.png" not in record["pictures"]
    assert (tmp_path / "demo_tracking.png").exists()


def test_page_screenshots(demo_folder, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (make browser: Debian's chromium)")
    record = write_pictures(staged(demo_folder), tmp_path, seg_exp_name="tiny_seg")
    assert record["pictures"][:2] == ["demo_ui.png", "demo_ui_result.png"]
    assert cv2.imread(str(tmp_path / "demo_ui_result.png")) is not None
