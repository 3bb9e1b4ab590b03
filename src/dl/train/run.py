"""The training stage: `python -m src.dl.train key=value ...` -> run(cfg), and the experiment folder around it.

    python -m src.dl.train exp_name=my_run model.name=s train.epochs=50
    torchrun --standalone --nproc_per_node=2 -m src.dl.train exp_name=my_run      # DDP, one node
    python -m src.dl.train exp_name=my_run train.resume=true                      # continue after a stop

Order: exp_name checked (nothing written before) -> resume config from last.pt -> every check on config and
data (Trainer(): doctor, datasets, negatives, model) -> only then the folder: a previous run is moved aside
(train.overwrite=true; put back if this run fails before its first checkpoint), leftovers of a run that
failed before any checkpoint are replaced -> config.yaml, manifest, train_log.txt -> fit.
"""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from src.common.config import complete_with_defaults, save_run_config, stage_main
from src.common.errors import ExperimentError, UserError
from src.common.experiment import FILES, Experiment
from src.dl.train.core import TrainingAborted, TrainState
from src.dl.train.loggers import Callback, WandbLogger
from src.dl.train.trainer import Trainer, on_main
from src.dl.train.trainer_utils import cleanup_distributed, remove_sink_safely, setup_distributed
from src.models.checkpoint import load_run_checkpoint, shared_checkpoint_reads

# Keys a resumed run may change (they do not change the result); everything else comes from last.pt.
RESUME_RUNTIME_KEYS = (
    "device",
    "train.resume",
    "train.num_workers",
    "train.threads",
    "train.compile",
    "train.cache",
    "train.cache_dir",
    "train.use_wandb",
    "train.abort_after_steps",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
)
# What a run writes before its first checkpoint: replaced when a retry finds them without a checkpoint.
LEFTOVER_KEYS = ("config", "manifest", "log", "history", "curves", "debug_images", "eval_preds", "plots")


# ---------------------------------------------------------------------------------------------- config


def follow_pretrained_arch(cfg: DictConfig) -> tuple[str, str] | None:
    """Check the pretrained checkpoint against model.arch / model.name, and follow its arch within the
    family where the file shows it (D-FINE vs DEIM-D-FINE weights; src.models.checkpoint_arch).

    A file of another family or size is refused in one line (UserError). Runs before the run's config is
    saved and before any model is built, so the experiment records (and later stages rebuild) the arch
    really trained. Returns (log level, message) to log once the log file is open; None without pretrained
    weights or on resume (the saved arch is kept).
    """
    path = cfg.train.pretrained_model_path
    if cfg.train.resume or not path:
        return None
    from src.models import ModelSpec, checkpoint_arch, family_of, pretrained_mismatch

    configured = str(cfg.model.arch)
    arch, reason = checkpoint_arch(str(path))
    if arch is not None and arch != configured and arch in family_of(configured).archs:
        OmegaConf.update(cfg, "model.arch", arch)
        note = ("WARNING", (
            f"MODEL ARCH CHANGED: model.arch={configured}, but the pretrained checkpoint {path} is {arch} "
            f"({reason}). Training model.arch={arch} to match the weights; it is saved with the experiment. "
            "To really train the other arch, start from a checkpoint of it or from scratch."
        ))  # fmt: skip
    elif arch is None:
        note = ("INFO", f"pretrained {path}: {reason}. Training model.arch={configured}")
    else:
        note = ("INFO", f"pretrained {path} is model.arch={arch} ({reason})")
    mismatch = pretrained_mismatch(str(path), ModelSpec.from_config(cfg))
    if mismatch:
        raise UserError(f"train.pretrained_model_path: {mismatch}")
    return note


def resume_point(cfg: DictConfig, exp: Experiment) -> tuple[DictConfig, TrainState]:
    """(the interrupted run's config with today's RESUME_RUNTIME_KEYS, where it stopped) from last.pt.

    A config saved before a key existed gets config.yaml's default for it."""
    last = exp.file("last")
    if not last.exists():
        raise ExperimentError(
            f"train.resume=true but {last} does not exist; start a new run without train.resume "
            "(or pick the exp_name of the interrupted run)"
        )
    checkpoint = load_run_checkpoint(last, mmap=True)
    state = TrainState(**checkpoint.training["state"])
    return config_for_resume(cfg, complete_with_defaults(checkpoint.config)), state


def is_finished(cfg: DictConfig, exp: Experiment, state: TrainState) -> bool:
    """Every epoch trained (or stopped early) and best.pt evaluated: nothing left to resume."""
    if state.finished:
        return True
    # A last.pt written before TrainState.finished existed: the final evaluation's files come after it.
    early_stop = int(cfg.train.early_stopping)
    trained = state.epoch >= int(cfg.train.epochs) or (
        early_stop > 0 and state.epochs_without_improvement >= early_stop
    )
    thresholds, last = exp.file("thresholds"), exp.file("last")
    return trained and thresholds.exists() and thresholds.stat().st_mtime >= last.stat().st_mtime


def config_for_resume(cfg: DictConfig, saved: DictConfig | dict) -> DictConfig:
    """The run's saved config with only RESUME_RUNTIME_KEYS taken from `cfg` (warns about other changes)."""
    resumed = OmegaConf.create(saved)
    for key in RESUME_RUNTIME_KEYS:
        OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), force_add=True)
    now = OmegaConf.to_container(cfg, resolve=True)
    changed = sorted(_changed_keys(now, OmegaConf.to_container(resumed, resolve=True)))
    if changed:
        logger.warning(
            f"resume: using the interrupted run's values for {', '.join(changed)} (not today's overrides)"
        )
    return resumed


def _changed_keys(now: dict, then: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in set(now) | set(then):
        a, b = now.get(key), then.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


# ---------------------------------------------------------------------------------------------- the folder


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
    from src.etl.splits import split_csv_path

    exp.record_training(cfg, {split: split_csv_path(cfg, split) for split in ("train", "val", "test")})
    return backup


def _replace_leftovers(exp: Experiment) -> None:
    """Files of an earlier run that failed before any checkpoint: nothing there is worth keeping."""
    import shutil

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


class OldRunNote(Callback):
    """Once the new run has a checkpoint, say where the run it replaced is kept."""

    def __init__(self, backup: Path) -> None:
        self.backup = backup
        self.said = False

    def on_checkpoint(self, path: Path) -> None:
        if not self.said:
            self.said = True
            logger.info(f"the previous run is kept in {self.backup} (remove it yourself when happy)")


class SetupLog:
    """Log lines of the setup, kept in memory until the experiment folder may be written."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.sink = logger.add(self.lines.append, level="INFO", enqueue=False)

    def into_file(self, path: Path) -> int:
        """Write the kept lines to `path` and log there from now on; returns the file sink's id."""
        remove_sink_safely(self.sink)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.writelines(self.lines)
        return logger.add(path, level="INFO", enqueue=False)

    def close(self) -> None:
        remove_sink_safely(self.sink)


# ---------------------------------------------------------------------------------------------- entry point


def run(cfg: DictConfig) -> dict:
    """Train as cfg says (under torchrun: this process's share); returns a summary (exp_dir, best metrics)."""
    exp = Experiment.of(cfg)  # exp_name is a plain folder name, or nothing is done at all
    ctx = setup_distributed(str(cfg.device))
    setup_log = sink = trainer = backup = None
    failed = True
    try:
        if not ctx.is_main:
            logger.remove()  # other ranks: warnings and errors only (rank 0 tells the story)
            logger.add(sys.stderr, level="WARNING")
        if cfg.train.resume:
            cfg, state = resume_point(cfg, exp)
            if is_finished(cfg, exp, state):
                failed = False
                return _finished(exp, state)
        refuse_taken_folder(cfg, exp)
        with shared_checkpoint_reads():  # the pretrained file is read once for arch, architecture, weights
            arch_note = follow_pretrained_arch(cfg)  # before the config is saved and the model built
            OmegaConf.update(cfg, "train.ddp", ctx.distributed, force_add=True)
            setup_log = SetupLog() if ctx.is_main else None
            trainer = Trainer(cfg, ctx)  # every check on config and data; writes nothing
        backup = on_main(ctx, prepare_folder, cfg, exp)
        if ctx.is_main:
            sink = setup_log.into_file(exp.file("log"))
            logger.info(f"experiment folder: {exp.root}")
            if arch_note:
                logger.log(*arch_note)
            if backup is not None:
                trainer.callbacks.append(OldRunNote(backup))
            if cfg.train.use_wandb:
                trainer.callbacks.append(WandbLogger(cfg, exp, trainer.wandb_id))
        summary = trainer.fit()
        failed = False
        if ctx.is_main:
            logger.info(f"done: {summary}")
        return summary
    except (KeyboardInterrupt, TrainingAborted):
        if ctx.is_main and exp.file("last").exists():
            logger.warning(
                f"stopped; continue with: python -m src.dl.train exp_name={exp.name} train.resume=true"
            )
        raise
    finally:
        if trainer is not None:
            trainer._call("close")
        if setup_log is not None:
            setup_log.close()
        remove_sink_safely(sink)
        if failed and backup is not None and ctx.is_main:
            _put_back(exp, backup)
        cleanup_distributed()


def _put_back(exp: Experiment, backup: Path) -> None:
    """A failed run: without a checkpoint of its own the replaced run returns; with one, both are kept."""
    if exp.has_checkpoint():
        logger.warning(f"this run failed after its first checkpoint; the previous run is kept in {backup}")
        return
    exp.restore(backup)
    logger.warning(f"this run failed before its first checkpoint: the previous run is back in {exp.root}")


def _finished(exp: Experiment, state: TrainState) -> dict:
    logger.info(
        f"experiment {exp.name!r} is finished ({state.epoch} epochs, best epoch {state.best_epoch + 1}); "
        f"nothing to resume. Its results are in {exp.root}"
    )
    return {
        "exp_dir": str(exp.root),
        "finished": True,
        "best_epoch": state.best_epoch + 1,
        "epochs_trained": state.epoch,
        "stopped_early": state.stopped_early,
    }


main = stage_main(run)
