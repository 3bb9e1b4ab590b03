"""The training stage as a package: `python -m src.dl.train` runs `run.main`.

Modules: run (the stage: experiment folder, resume, run(cfg)), trainer (setup and the epochs), epoch (the
inner loop of one epoch), evaluation (val/test/negatives, best-model choice, final files), loggers
(history/curves, W&B as callbacks), core (TrainState, one optimizer step), dataset + augment (split CSVs ->
tensors), optim (AdamW groups, LR schedules), ema, trainer_utils (DDP, samplers, RNG, AMP, curves),
negatives (false-positive metrics on held-out background images).
"""

from src.dl.train.core import TrainingAborted, TrainingDiverged, clip_and_step, compute_loss
from src.dl.train.run import follow_pretrained_arch, run
from src.dl.train.trainer import Trainer

__all__ = [
    "Trainer",
    "TrainingAborted",
    "TrainingDiverged",
    "clip_and_step",
    "compute_loss",
    "follow_pretrained_arch",
    "run",
]
