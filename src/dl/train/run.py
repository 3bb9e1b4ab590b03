"""The training stage: `python -m src.dl.train key=value ...` -> run(cfg), and the experiment folder around it.

    python -m src.dl.train exp_name=my_run model.name=s train.epochs=50
    torchrun --standalone --nproc_per_node=2 -m src.dl.train exp_name=my_run      # DDP, one node
    python -m src.dl.train exp_name=my_run train.resume=true                      # continue after a stop

Order: exp_name checked (nothing written before) -> resume config from last.pt -> every check on config and
data (setup.build_trainer: pretrained file, doctor, datasets, negatives, model) -> only then the folder
(folder.py): a previous run is moved aside (train.overwrite=true; put back if this run fails or is stopped
before its first checkpoint, Ctrl-C and SIGTERM included), leftovers of a run that failed before any
checkpoint are replaced -> config.yaml, manifest, train_log.txt -> loggers attached -> fit.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from src.common.config import complete_with_defaults, stage_main
from src.common.errors import ExperimentError, UserError
from src.common.experiment import Experiment
from src.dl.train.core import TrainingAborted, TrainState
from src.dl.train.distributed import DistContext, cleanup_distributed, on_main, setup_distributed
from src.dl.train.folder import old_run_note, prepare_folder, put_back, refuse_taken_folder
from src.dl.train.loggers import build_loggers
from src.dl.train.profile import NO_TIMER
from src.dl.train.setup import build_trainer
from src.dl.train.trainer import Trainer
from src.models import ModelSpec, checkpoint_arch, family_of, pretrained_mismatch
from src.models.checkpoint import RunCheckpoint, load_run_checkpoint, read_checkpoint, shared_checkpoint_reads
from src.models.detr.weights import RELEASE_FILES as DETR_FILES
from src.models.dfine.weights import DEIM_DRIVE_LINKS, DFINE_RELEASE_FILES, DFINE_RELEASE_URL
from src.models.rtdetr.weights import IMAGENET_FILES
from src.models.rtdetr.weights import RELEASE_FILES as RTDETR_FILES

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
    "train.loggers",
    "train.abort_after_steps",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
)


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


def release_addresses() -> dict[str, str]:
    """Official release file name -> where to download it, for every family (detectors and the ImageNet
    backbones the ResNet families start from)."""
    official = {name: DFINE_RELEASE_URL + name for name in DFINE_RELEASE_FILES.values()}
    official |= {
        f"deim_dfine_hgnetv2_{size}_{data}.pth": link for (size, data), link in DEIM_DRIVE_LINKS.items()
    }
    return official | RTDETR_FILES | IMAGENET_FILES | DETR_FILES


def check_pretrained_file(path: str) -> None:
    """train.pretrained_model_path must be a readable checkpoint: a missing or unreadable file is refused in
    one line naming it and what to do (an official release file name says where to get it)."""
    file = Path(path)
    if not file.is_file():
        where = release_addresses().get(file.name)
        get_it = (
            f"it is an official release file: download {where} and save it as {file}"
            if where
            else "point it at an existing checkpoint (best.pt / last.pt or a released .pth)"
        )
        raise UserError(
            f"train.pretrained_model_path: {file} does not exist; {get_it}, "
            "or train from scratch with train.pretrained_model_path=null"
        )
    try:
        read_checkpoint(file)  # kept by shared_checkpoint_reads for the reads that follow
    except (ValueError, OSError, RuntimeError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"train.pretrained_model_path: {file} is not a usable checkpoint ({reason[:200]}); the file may be "
            "cut or corrupt: download or copy it again, or pick another file"
        ) from err


def resume_point(cfg: DictConfig, exp: Experiment) -> tuple[DictConfig, RunCheckpoint]:
    """(the interrupted run's config with today's RESUME_RUNTIME_KEYS, its last.pt).

    A config saved before a key existed gets config.yaml's default for it."""
    last = exp.file("last")
    if not last.exists():
        raise ExperimentError(
            f"train.resume=true but {last} does not exist; start a new run without train.resume "
            "(or pick the exp_name of the interrupted run)"
        )
    checkpoint = load_run_checkpoint(last)
    return config_for_resume(cfg, complete_with_defaults(checkpoint.config)), checkpoint


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


def remove_sink_safely(sink_id: int | None) -> None:
    if sink_id is None:
        return
    with contextlib.suppress(ValueError):  # already removed
        logger.remove(sink_id)


# ---------------------------------------------------------------------------------------------- stopping


class Terminated(BaseException):
    """SIGTERM, raised where the main thread is (like KeyboardInterrupt for SIGINT): the run unwinds through
    its cleanup, so a replaced run is put back. A BaseException, so no `except Exception` swallows it."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_unwinds():
    """Within the block, SIGTERM raises Terminated in the main thread instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


STOP_REASONS = {KeyboardInterrupt: "interrupted (Ctrl-C)", Terminated: "terminated (SIGTERM)"}


def _stopped_line(err: BaseException, exp: Experiment, resumable: bool, restored: str | None) -> str:
    """One line for a run stopped from outside (or by train.abort_after_steps)."""
    why = next((text for kind, text in STOP_REASONS.items() if isinstance(err, kind)), str(err))
    parts = [f"training {why}"]
    if resumable:
        parts.append(f"continue with: python -m src.dl.train exp_name={exp.name} train.resume=true")
    if restored:
        parts.append(restored)
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- entry point


@dataclass
class _Held:
    """What a run holds while it runs, released however it ends."""

    setup_log: SetupLog | None = None
    sink: int | None = None  # the train_log.txt sink
    trainer: Trainer | None = None
    backup: Path | None = None  # where train.overwrite moved the previous run


def run(cfg: DictConfig, listeners: Sequence[Mapping[str, Callable]] = (), timer=NO_TIMER) -> dict:
    """Train as cfg says (under torchrun: this process's share); returns a summary (exp_dir, best metrics).
    listeners: more event handler tables (src/dl/train/events.py) beside the loggers, e.g. a benchmark's;
    timer: a profile.SectionTimer that splits the loop's time (benchmarks.train_speed --profile)."""
    exp = Experiment.of(cfg)  # exp_name is a plain folder name, or nothing is done at all
    ctx = setup_distributed(str(cfg.device))
    held = _Held()
    try:
        with sigterm_unwinds():
            return _train(cfg, ctx, exp, held, listeners, timer)
    except BaseException as err:
        resumable = exp.file("last").exists()  # this run's own last.pt (a replaced run's is aside)
        restored = put_back(exp, held.backup) if held.backup is not None and ctx.is_main else None
        if isinstance(err, (KeyboardInterrupt, Terminated, TrainingAborted)):
            if ctx.is_main:
                logger.warning(_stopped_line(err, exp, resumable, restored))
        elif restored:
            logger.warning(f"this run failed: {restored}")
        raise
    finally:
        if held.trainer is not None and ctx.is_main:
            held.trainer.events.fire("on_teardown")
        if held.setup_log is not None:
            held.setup_log.close()
        remove_sink_safely(held.sink)
        cleanup_distributed()


def _train(cfg: DictConfig, ctx: DistContext, exp: Experiment, held: _Held, listeners, timer) -> dict:
    if not ctx.is_main:
        logger.remove()  # other ranks: warnings and errors only (rank 0 tells the story)
        logger.add(sys.stderr, level="WARNING")
    resumed = None
    if cfg.train.resume:
        cfg, resumed = resume_point(cfg, exp)
        state = TrainState(**resumed.training["state"])
        if is_finished(cfg, exp, state):
            return _finished(exp, state)
    refuse_taken_folder(cfg, exp)
    with shared_checkpoint_reads():  # the pretrained file is read once for arch, architecture, weights
        if cfg.train.pretrained_model_path and not cfg.train.resume:
            check_pretrained_file(str(cfg.train.pretrained_model_path))
        arch_note = follow_pretrained_arch(cfg)  # before the config is saved and the model built
        OmegaConf.update(cfg, "train.ddp", ctx.distributed, force_add=True)
        held.setup_log = SetupLog() if ctx.is_main else None
        # every check on config and data; writes nothing
        held.trainer = trainer = build_trainer(cfg, ctx, resumed, timer=timer)
    held.backup = on_main(ctx, prepare_folder, cfg, exp)
    if ctx.is_main:
        held.sink = held.setup_log.into_file(exp.file("log"))
        _start_log(exp, arch_note)
        _attach_listeners(trainer, held.backup, resumed.training if resumed else None)
        for handlers in listeners:
            trainer.events.add(handlers)
    del resumed  # its tensors are in the model now
    summary = trainer.fit()
    if ctx.is_main:
        logger.info(f"done: {summary}")
    return summary


def _start_log(exp: Experiment, arch_note: tuple[str, str] | None) -> None:
    logger.info(f"experiment folder: {exp.root}")
    if arch_note:
        logger.log(*arch_note)


def _attach_listeners(trainer: Trainer, backup: Path | None, resumed: dict | None) -> None:
    """The loggers train.loggers names (they write into the folder, so only now), and the old-run note.
    resumed: last.pt's training state of a resumed run (a logger may continue its own record)."""
    settings, events = trainer.settings, trainer.events
    loggers = build_loggers(
        settings.loggers, trainer.exp, settings.wandb_project, trainer.run_config, resumed
    )
    for listener in loggers:
        events.add(listener.handlers())
    if backup is not None:
        events.add(old_run_note(backup))


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


def run_as_stage(cfg: DictConfig, listeners: Sequence[Mapping[str, Callable]] = ()) -> dict:
    """run(cfg) for the command line: a run stopped from outside ends with its one line (run logged it) and
    the usual exit code (130 Ctrl-C, 143 SIGTERM), no traceback."""
    try:
        return run(cfg, listeners)
    except KeyboardInterrupt:
        sys.exit(130)
    except Terminated:
        sys.exit(143)


main = stage_main(run_as_stage)
