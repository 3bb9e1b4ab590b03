"""The training stage as a package: `python -m src.dl.train` runs `run.main`.

The stage (reads the config): run (resume, the folder, signals, run(cfg)), setup (builds every part from the
config: build_trainer), folder (the experiment folder), settings (train.* as plain values), negatives (the
false-positive stage for any experiment).
The parts (plain values in): trainer (the epochs and checkpoints, by composition), epoch (one epoch:
EpochRunner), evaluation (val/test/negatives, best-model choice, final files), events (named events and their
listeners), loggers (csv, tensorboard, wandb), core (TrainState, one step), dataset + augment + cache (split
CSVs -> tensors), optim (AdamW groups, LR schedules), ema, speed (threads re-decided per epoch, precision,
compile), distributed (DDP context and collectives), rng, samplers, history (history.csv, curves),
progress, profile (time per loop section), false_positives (metrics on held-out background images).
"""

from src.dl.train.core import TrainingAborted, TrainingDiverged, clip_and_step, compute_loss
from src.dl.train.run import follow_pretrained_arch, run
from src.dl.train.setup import build_trainer
from src.dl.train.trainer import Trainer

__all__ = [
    "Trainer",
    "TrainingAborted",
    "TrainingDiverged",
    "build_trainer",
    "clip_and_step",
    "compute_loss",
    "follow_pretrained_arch",
    "run",
]
