"""A checkpoint in our format with freshly initialised weights, for the benchmarks whose figures do not
depend on training (latency): written by src/models/checkpoint.py like every best.pt."""

from __future__ import annotations

from pathlib import Path

import torch


def random_checkpoint(
    folder: Path, size: str, img: int, task: str = "detect", num_classes: int = 80, queries: int = 300
) -> Path:
    """folder/best.pt of D-FINE-`size` at img x img; the same seed for every task, so the detection part of
    a detect and a segment model is identical."""
    from src.models import ModelSpec, RunCheckpoint, build, save_run_checkpoint

    spec = ModelSpec(
        arch="dfine", size=size, img_size=(img, img), task=task, num_queries=queries,
        data_class_names=tuple(f"class{i}" for i in range(num_classes)),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build(spec).model
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = RunCheckpoint(spec, model.state_dict(), config={}, thresholds={"conf_thresh": 0.5})
    return save_run_checkpoint(folder / "best.pt", checkpoint)
