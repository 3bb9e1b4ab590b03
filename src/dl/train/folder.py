"""The experiment folder of a training run: refuse a taken one, replace a failed run's leftovers, move a run
that train.overwrite replaces aside and put it back when the new run fails before its first checkpoint."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig

from src.common.config import save_run_config
from src.common.errors import ExperimentError
from src.common.experiment import FILES, Experiment
from src.etl.splits import split_csv_path

# What a run writes before its first checkpoint: replaced when a retry finds them without a checkpoint.
LEFTOVER_KEYS = (
    "config", "manifest", "log", "history", "curves", "tensorboard", "debug_images", "eval_preds", "plots",
)  # fmt: skip


def refuse_taken_folder(cfg: DictConfig, exp: Experiment) -> None:
    """A folder with a checkpoint is a run: only train.overwrite or train.resume may use it."""
    if exp.has_checkpoint() and not cfg.train.overwrite and not cfg.train.resume:
        raise ExperimentError(
            f"experiment folder {exp.root} already holds a run. Pick a new exp_name, continue it with "
            "train.resume=true, or replace it with train.overwrite=true (the old run is moved aside, not deleted)"
        )


def prepare_folder(cfg: DictConfig, exp: Experiment) -> Path | None:
    """Make exp.root ready for this run (rank 0, after every check passed); returns where a replaced run was
    moved (None: nothing replaced). Writes config.yaml and the manifest of a new run."""
    if cfg.train.resume:
        return None
    refuse_taken_folder(cfg, exp)
    backup = None
    if exp.has_checkpoint():  # train.overwrite=true
        backup = exp.move_aside()
        logger.warning(
            f"train.overwrite=true: the previous run is moved to {backup} (put back if this run fails before "
            "its first checkpoint)"
        )
    elif exp.holds_anything():
        _replace_leftovers(exp)
    exp.root.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, exp.file("config"))

    exp.record_training(cfg, {split: split_csv_path(cfg, split) for split in ("train", "val", "test")})
    return backup


def _replace_leftovers(exp: Experiment) -> None:
    """Files of an earlier run that failed before any checkpoint: nothing there is worth keeping."""
    removed = []
    for key in LEFTOVER_KEYS:
        path = exp.file(key)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(FILES[key])
    if removed:
        logger.info(f"{exp.root}: replacing the files of an earlier run that ended before any checkpoint")


def put_back(exp: Experiment, backup: Path) -> str:
    """A failed run: without a checkpoint of its own the replaced run returns; with one, both are kept.
    Returns the sentence that says which."""
    if exp.has_checkpoint():
        return f"the previous run is kept in {backup} (this run has a checkpoint of its own)"
    exp.restore(backup)
    return f"the previous run is back in {exp.root}"


def old_run_note(backup: Path) -> dict[str, Callable]:
    """Event handlers: once the new run has a checkpoint, say where the run it replaced is kept."""
    said = []

    def on_checkpoint(path: Path) -> None:
        if not said:
            said.append(path)
            logger.info(f"the previous run is kept in {backup} (remove it yourself when happy)")

    return {"on_checkpoint": on_checkpoint}
