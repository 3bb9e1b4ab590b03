"""The per-epoch record of a run: loss terms summed per kind, history.csv and curves.png."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from src.common.io import atomic_write, atomic_write_csv

CURVE_METRICS = ("mAP_50", "mAP_50_95", "mask_mAP_50", "mask_mAP_50_95", "precision", "recall", "f1")

# loss_fgl_pre ...). History keeps one column per kind: the sum over layers, which is what is optimised.
_LAYER_SUFFIX = re.compile(r"_(aux|dn|enc|pre)(_\w+)?$")


def loss_kind(term: str) -> str:
    return _LAYER_SUFFIX.sub("", term)


def sum_loss_kinds(loss_dict: dict[str, float]) -> dict[str, float]:
    kinds: dict[str, float] = {}
    for term, value in loss_dict.items():
        kinds[loss_kind(term)] = kinds.get(loss_kind(term), 0.0) + float(
            value.detach() if torch.is_tensor(value) else value
        )
    return kinds


def plot_curves(history: Sequence[dict], path: Path, metric_names: Sequence[str]) -> None:
    """curves.png: loss terms, validation metrics and learning rates per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    if not history:
        return
    panels = {
        "loss (train, per batch)": [k for k in history[-1] if k == "loss" or k.startswith("loss_")],
        "validation metrics": [k for k in metric_names if any(k in row for row in history)],
        "learning rate": [k for k in history[-1] if k.startswith("lr_")],
    }
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (title, keys) in zip(axes, panels.items()):
        for key in keys:
            # Epochs without a value (not validated: train.eval_every) are left out, not drawn as gaps.
            points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
            ax.plot(*zip(*points), marker=".", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_history(history: Sequence[dict], path: Path) -> None:


    frame = pd.DataFrame(list(history))  # an epoch without validation (train.eval_every): empty metric cells
    # Columns in first-seen order, the epoch's total time last (a first epoch without validation would put it
    # before the metric columns).
    columns = [c for c in frame.columns if c != "epoch_time_s"] + ["epoch_time_s"] * ("epoch_time_s" in frame)
    atomic_write_csv(path, frame[columns])
