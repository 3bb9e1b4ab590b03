"""A tiny trained-looking experiment for the deployment tests (export, inference API, bench, infer, ...).

Data: the demo generator (shapes on clutter, 64-96 px) split into train/val/test. Model: D-FINE n at
64x64 with few queries and the deterministic weights of tests/detinit.py, saved as output/<exp>/best.pt
in the trainer's format (weights + "meta") with thresholds.json and the run's config.yaml beside it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from src.common.config import load_config, save_run_config
from src.common.experiment import exp_dir
from src.common.io import atomic_write_json
from tests.detinit import deterministic_state_dict

IMG_SIZE = 96
NUM_QUERIES = 30
CLASS_NAMES = ["circle", "square", "triangle", "star"]  # config.yaml's default label_to_name


def deploy_config(root: Path, *overrides: str):
    data = root / "data"
    return load_config(
        [
            f"data_path={data}",
            f"output_dir={root / 'output'}",
            "exp_name=tiny",
            "device=cpu",
            f"check.report_dir={root / 'report'}",
            "check.workers=1",
            "demo_data.num_images=14",
            "demo_data.num_negatives=0",
            "demo_data.num_videos=0",
            "demo_data.min_size=64",
            "demo_data.max_size=96",
            "split.train=0.5",
            "split.val=0.3",
            "split.test=0.2",
            f"model.img_size=[{IMG_SIZE},{IMG_SIZE}]",
            f"model.num_queries={NUM_QUERIES}",
            "export.parity_images=4",
            "export.int8=false",  # NNCF takes ~1 min: only the tests about int8 turn it on
            "export.latency_runs=3",
            "export.formats=[onnx,openvino]",
            "bench.warmup=1",
            "bench.save_images=2",
            *overrides,
        ]
    )


def make_data(cfg) -> Path:
    from src.etl import make_demo_data, split

    make_demo_data.run(cfg)
    split.run(cfg)
    return Path(cfg.data_path)


def tiny_model(cfg, num_classes: int = len(CLASS_NAMES), task: str = "detect"):
    """task="segment": with the mask branch (deterministic weights too)."""
    from src.models import build_model

    model = build_model(
        "n", num_classes, img_size=tuple(cfg.model.img_size), num_queries=NUM_QUERIES, task=task
    )
    skip = {k for k in model.state_dict() if k.endswith(("anchors", "valid_mask"))}
    model.load_state_dict(deterministic_state_dict(model.state_dict(), skip=skip))
    return model.eval()


def make_checkpoint(cfg, thresholds: dict | None = None, task: str = "detect") -> Path:
    """output/<exp>/best.pt (+ thresholds.json, config.yaml) as the trainer writes them (through
    src/models/checkpoint.py): the classes of cfg.label_to_name, or the one class "object" with
    model.use_one_class=true; task="segment": a segmentation model (mask branch, "task" in its meta)."""
    from omegaconf import OmegaConf

    from src.common.config import label_names
    from src.models.checkpoint import RunCheckpoint, save_run_checkpoint
    from src.models.spec import ModelSpec

    spec = ModelSpec(
        arch="dfine", size="n", img_size=(IMG_SIZE, IMG_SIZE), data_class_names=tuple(label_names(cfg)),
        num_queries=NUM_QUERIES, keep_ratio=bool(cfg.model.keep_ratio),
        use_one_class=bool(cfg.model.use_one_class), task=task,
    )  # fmt: skip
    model = tiny_model(cfg, spec.num_classes, task)
    default_per_class = {"square": 0.4} if "square" in spec.class_names else {}
    thresholds = thresholds or {"conf_thresh": 0.3, "f1": 0.0, "per_class": default_per_class}
    out = exp_dir(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    path = save_run_checkpoint(out / "best.pt", RunCheckpoint(spec, model.state_dict(), config, thresholds))
    atomic_write_json(out / "thresholds.json", thresholds)
    save_run_config(cfg, out / "config.yaml")
    return path


def make_video(path: Path, frames: int = 5, size: tuple[int, int] = (96, 72), fps: float = 10.0) -> Path:
    """A small mp4 (moving white square on grey) written with cv2.VideoWriter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(frames):
        frame = np.full((size[1], size[0], 3), 120, np.uint8)
        cv2.rectangle(frame, (5 + 4 * i, 10), (35 + 4 * i, 40), (255, 255, 255), -1)
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """(cfg, checkpoint path) of a fresh tiny experiment with data, shared by a test module."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("deploy")
    cfg = deploy_config(root)
    make_data(cfg)
    return cfg, make_checkpoint(cfg)


def exported_experiment(root: Path, *overrides: str):
    """(cfg, export's report) of a tiny experiment under root with data and a checkpoint, exported by the
    real export stage with `overrides`."""
    from src.dl import export  # a stage: imported only by the tests that export

    cfg = deploy_config(root, *overrides)
    make_data(cfg)
    make_checkpoint(cfg)
    return cfg, export.run(cfg)
