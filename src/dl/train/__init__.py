"""The training stage as a package: `python -m src.dl.train` runs `trainer.main`.

Modules: trainer (the loop, checkpoints, resume), dataset + augment (split CSVs -> tensors), optim (AdamW
groups, LR schedules), ema, trainer_utils (DDP, samplers, RNG, AMP, curves), negatives (false-positive
metrics on held-out background images).
"""

from src.dl.train.trainer import (
    Trainer,
    TrainingAborted,
    TrainingDiverged,
    clip_and_step,
    compute_loss,
    run,
)

__all__ = ["Trainer", "TrainingAborted", "TrainingDiverged", "clip_and_step", "compute_loss", "run"]
