"""Training callbacks (rank 0): history.csv + curves.png, and optional Weights & Biases.

The Trainer calls every callback's `on_checkpoint(path)` after writing best.pt / last.pt, `on_epoch_end(row,
state)` after each epoch, `on_final(results, step)`
with the final evaluation ({split: metrics}), and `close()` when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from src.common.experiment import Experiment
from src.dl.train.core import TrainState
from src.dl.train.trainer_utils import plot_curves, write_history

CURVE_METRICS = ("mAP_50", "mAP_50_95", "mask_mAP_50", "mask_mAP_50_95", "precision", "recall", "f1")


class Callback:
    def on_checkpoint(self, path: Path) -> None:
        """best.pt or last.pt was just written."""

    def on_epoch_end(self, row: dict, state: TrainState) -> None:
        pass

    def on_final(self, results: dict[str, dict], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class HistoryLogger(Callback):
    """Per epoch: every loss term, LR per group, val metrics and times in history.csv; curves in curves.png."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp

    def on_epoch_end(self, row: dict, state: TrainState) -> None:
        write_history(state.history, self.exp.file("history"))
        plot_curves(state.history, self.exp.file("curves"), CURVE_METRICS)


class WandbLogger(Callback):
    """Optional Weights & Biases logging; any wandb failure turns it off with a warning, never stops training."""

    def __init__(self, cfg: DictConfig, exp: Experiment, resume_id: str | None = None) -> None:
        self.run = None
        # offline.py defaults WANDB_MODE to "disabled" for every entry point; a user asking for W&B gets
        # offline logs unless WANDB_MODE=online says otherwise.
        mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
        try:
            import wandb

            self.run = wandb.init(
                project=str(cfg.train.wandb_project),
                name=exp.name,
                dir=str(exp.root),
                config=OmegaConf.to_container(cfg, resolve=True),
                mode=mode,
                id=resume_id,
                resume="allow" if resume_id else None,
            )
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            logger.warning(f"W&B disabled: wandb.init failed ({err})")

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None)

    def log(self, values: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(values, step=step)
        except Exception as err:  # noqa: BLE001
            logger.warning(f"W&B disabled: logging failed ({err})")
            self.run = None

    def on_epoch_end(self, row: dict, state: TrainState) -> None:
        self.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=state.global_step)

    def on_final(self, results: dict[str, dict], step: int) -> None:
        for split, metrics in results.items():
            self.log({f"final/{split}/{k}": float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.run is None:
            return
        with contextlib.suppress(Exception):
            self.run.finish()
        self.run = None
