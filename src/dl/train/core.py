"""What every part of the training package shares: where training is (TrainState), how it stops early
(TrainingAborted, TrainingDiverged), and one optimizer step (compute_loss, clip_and_step)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from src.dl.train.profile import NO_TIMER


class TrainingAborted(RuntimeError):
    """Raised by the train.abort_after_steps test hook: the run stops as if killed (no final evaluation)."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class TrainState:
    """Where training is; saved in last.pt so a resumed run continues at exactly this point."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches of `epoch` already trained
    global_step: int = 0  # optimizer steps taken
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    history: list[dict] = field(default_factory=list)
    best_metrics: dict = field(default_factory=dict)
    best_thresholds: dict = field(default_factory=dict)
    # Highest decision score seen (train.fppi_tolerance: the band is measured from it, see prefer_lower_fppi).
    peak_score: float = -math.inf
    # Every epoch trained and best.pt evaluated: a resume has nothing left to do.
    finished: bool = False
    stopped_early: bool = False


def compute_loss(
    model: nn.Module,
    criterion: nn.Module,
    images: torch.Tensor,
    targets: list[dict],
    amp_dtype: torch.dtype | None,
    timer=NO_TIMER,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train-mode forward (under autocast when amp_dtype is set) and the loss terms, computed in float32.

    images (B, 3, H, W). The matching costs and log-probabilities of the criterion are precision-sensitive,
    so the outputs are cast back to float32 before it, as the official engine does. timer: a
    src.dl.train.profile.SectionTimer to split the time into "forward" and "loss".
    """
    with (
        timer.section("forward"),
        torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
    ):
        outputs = model(images, targets)
    with timer.section("loss"):
        loss_dict = criterion(to_float32(outputs), targets)
        return sum(loss_dict.values()), loss_dict


def to_float32(obj):
    """Cast every floating tensor in nested dicts/lists to float32 (the loss is computed outside autocast)."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {key: to_float32(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float32(value) for value in obj)
    return obj


def clip_and_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip_max_norm: float
) -> float:
    """Unscale, clip (when clip_max_norm > 0) and step unless the gradients are not finite; returns the norm.

    With fp16 the GradScaler skips inf steps itself (normal while it calibrates); otherwise a non-finite norm
    means the weights would be poisoned, so the step is skipped here.
    """
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = clip_max_norm if clip_max_norm > 0 else math.inf
    norm = float(nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    if math.isfinite(norm) or scaler.is_enabled():
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm
