"""DDP through torchrun on CPU (gloo): two processes train, rank 0 writes, evaluation counts every image once."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from src.common.config import ROOT
from tests.helpers.train_data import make_detection_data, train_overrides

FAMILIES = [
    pytest.param((), id="dfine-n"),
    pytest.param(("model.arch=rtdetrv2", "model.name=r18"), id="rtdetrv2-r18", marks=pytest.mark.slow),
    pytest.param(
        ("model.arch=detr", "model.name=r50", "model.img_size=[128,128]"),
        id="detr-r50",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_torchrun_two_cpu_processes(tmp_path, family):
    # 3 val images over 2 ranks: one rank gets 2, the other 1; none may be counted twice or dropped.
    data = make_detection_data(
        tmp_path / "data", {"train": 8, "val": 3, "test": 1}, backgrounds=("train_2.jpg",)
    )
    overrides = train_overrides(
        tmp_path, data, "train.epochs=2", "train.max_steps_per_epoch=2", "exp_name=ddp", *family
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "src.dl.train",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command + overrides, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    folder = tmp_path / "output" / "ddp"
    log = (folder / "train_log.txt").read_text()
    assert "2 process(es)" in log and "= 4;" in log  # batch 2 x accumulation 1 x 2 processes
    last = torch.load(folder / "last.pt", map_location="cpu", weights_only=False)
    assert len(last["rng"]) == 2  # both ranks reached the checkpoint and handed in their RNG state
    assert not torch.equal(last["rng"][0]["torch"], last["rng"][1]["torch"])  # seeded per rank
    assert last["config"]["train"]["ddp"] is True and last["step"] == 4

    val_boxes = sum(
        len((data / "labels" / f"val_{i}.txt").read_text().splitlines())
        for i in range(3)
        if (data / "labels" / f"val_{i}.txt").exists()
    )
    metrics = pd.read_csv(folder / "metrics.csv").set_index("split")
    assert metrics.loc["val", "tp"] + metrics.loc["val", "fn"] == val_boxes
    for name in ("best.pt", "history.csv", "thresholds.json", "per_class.csv"):
        assert (folder / name).is_file(), name
