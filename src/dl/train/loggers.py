"""Training loggers, chosen by train.loggers and attached through the event table (src/dl/train/events.py).

    csv          history.csv (one row per epoch: every loss kind, LR per group, val metrics, times) + curves.png
    tensorboard  the same numbers as TensorBoard scalars in <exp>/tensorboard/ (`tensorboard --logdir output`)
    wandb        Weights & Biases (offline unless WANDB_MODE=online); a resumed run continues its W&B run

Each logger gives its handlers as a table, `handlers()`; none of them can stop training except csv, whose
history is part of the run's results.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from loguru import logger

from src.common.experiment import Experiment
from src.dl.train.core import TrainState
from src.dl.train.history import CURVE_METRICS, plot_curves, write_history


def scalars(values: Mapping) -> dict[str, float]:
    """The numeric entries of a history row or metrics dict (bools and text left out)."""
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class CsvLogger:
    """history.csv and curves.png, rewritten after every epoch (atomic writes)."""

    def __init__(self, exp: Experiment) -> None:
        self.history_path, self.curves_path = exp.file("history"), exp.file("curves")

    def handlers(self) -> dict[str, Callable]:
        return {"on_epoch_end": self.epoch_end}

    def epoch_end(self, row: dict, state: TrainState) -> None:
        write_history(state.history, self.history_path)
        plot_curves(state.history, self.curves_path, CURVE_METRICS)


class TensorBoardLogger:
    """Scalars per optimizer step: each epoch's row under train/ (losses, LRs, times) and val/ (metrics), and
    best.pt's final metrics under final/<split>/."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def handlers(self) -> dict[str, Callable]:
        return {
            "on_epoch_end": self.epoch_end,
            "on_train_end": self.train_end,
            "on_teardown": self.close,
        }

    def epoch_end(self, row: dict, state: TrainState) -> None:
        for key, value in scalars(row).items():
            if key != "epoch":
                section = "train" if key.startswith(("loss", "lr_")) or key.endswith("_time_s") else "val"
                self.writer.add_scalar(f"{section}/{key}", value, global_step=state.global_step)
        self.writer.flush()

    def train_end(self, results: dict[str, dict], step: int) -> None:
        for split, metrics in results.items():
            for key, value in scalars(metrics).items():
                self.writer.add_scalar(f"final/{split}/{key}", value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Optional Weights & Biases logging; any wandb failure turns it off with a warning, never stops training.

    Its run id is saved in last.pt ("wandb_id"), so a resumed training run continues the same W&B run."""

    def __init__(self, project: str, name: str, folder: Path, config: dict, resume_id: str | None) -> None:
        self.run = None
        self.resume_id = resume_id
        # offline.py defaults WANDB_MODE to "disabled" for every entry point; a user asking for W&B gets
        # offline logs unless WANDB_MODE=online says otherwise.
        mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
        try:
            import wandb

            self.run = wandb.init(
                project=project, name=name, dir=str(folder), config=config, mode=mode, id=resume_id,
                resume="allow" if resume_id else None,
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            logger.warning(f"W&B disabled: wandb.init failed ({err})")

    def handlers(self) -> dict[str, Callable]:
        return {
            "on_epoch_end": self.epoch_end,
            "on_save_state": self.save_state,
            "on_train_end": self.train_end,
            "on_teardown": self.close,
        }

    def log(self, values: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(values, step=step)
        except Exception as err:  # noqa: BLE001
            logger.warning(f"W&B disabled: logging failed ({err})")
            self.run = None

    def epoch_end(self, row: dict, state: TrainState) -> None:
        self.log(scalars(row), step=state.global_step)

    def save_state(self, training: dict) -> None:
        training["wandb_id"] = getattr(self.run, "id", None) or self.resume_id

    def train_end(self, results: dict[str, dict], step: int) -> None:
        for split, metrics in results.items():
            self.log({f"final/{split}/{k}": v for k, v in scalars(metrics).items()}, step=step)

    def close(self) -> None:
        if self.run is None:
            return
        with contextlib.suppress(Exception):
            self.run.finish()
        self.run = None


def build_loggers(
    names: Sequence[str], exp: Experiment, project: str, config: dict, resumed: Mapping | None = None
) -> list:
    """The loggers train.loggers names, in that order. resumed: last.pt's training state of a resumed run."""
    resumed = resumed or {}
    makers = {
        "csv": lambda: CsvLogger(exp),
        "tensorboard": lambda: TensorBoardLogger(exp.file("tensorboard")),
        "wandb": lambda: WandbLogger(project, exp.name, exp.root, config, resumed.get("wandb_id")),
    }
    return [makers[name]() for name in names]
