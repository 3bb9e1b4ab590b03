"""AdamW parameter groups and the two LR schedules of the trainer: OneCycle and DEIM's flat-cosine.

Groups follow the official D-FINE optimizer configs (dfine_hgnetv2_*_coco.yml): the backbone gets its own,
lower learning rate, and normalisation weights and biases get no weight decay. Unlike the official regexes
(where `(?!.*norm|bn)` lets backbone BatchNorm weights slip into the decayed group), norms are found by
module type, so every norm layer is covered whatever it is called.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from src.dl.train.settings import ScheduleSettings

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
GROUP_NAMES = ("backbone", "backbone_no_decay", "rest", "rest_no_decay")


def is_backbone_param(name: str) -> bool:
    """True for parameters of the model's `backbone` sub-module (also inside a DDP `module.` prefix)."""
    return "backbone" in name.split(".")


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, NORM_TYPES) or param_name == "bias":
                names.add(full_name)
    return names


def build_param_groups(
    model: nn.Module, base_lr: float, backbone_lr: float, weight_decay: float
) -> list[dict]:
    """Split parameters into up to 4 named groups: backbone / rest, each with and without weight decay.

    Frozen parameters are included on purpose: freezing the backbone for the first epochs only switches off
    their gradients, and the optimizer must already know them when they are unfrozen (AdamW skips
    parameters whose grad is None, weight decay included).
    """
    no_decay = _no_decay_names(model)
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for name, param in model.named_parameters():
        part = "backbone" if is_backbone_param(name) else "rest"
        buckets[f"{part}_no_decay" if name in no_decay else part].append(param)
    groups = []
    for group_name, params in buckets.items():
        if not params:
            continue
        groups.append(
            {
                "name": group_name,
                "params": params,
                "lr": backbone_lr if group_name.startswith("backbone") else base_lr,
                "weight_decay": 0.0 if group_name.endswith("no_decay") else weight_decay,
            }
        )
    return groups


def build_optimizer(
    model: nn.Module,
    base_lr: float,
    backbone_lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    groups = build_param_groups(model, base_lr, backbone_lr, weight_decay)
    return torch.optim.AdamW(groups, lr=base_lr, betas=tuple(betas), weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_pct: float
) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycle with each group's own peak LR (a single max_lr would silently give the backbone the head's LR).

    The group LRs set in build_param_groups are the peaks: the schedule starts at peak / 25, rises over
    `warmup_pct` of the steps and anneals (cosine) to nearly zero. `total_steps` counts optimizer steps.
    """
    total_steps = max(int(total_steps), 2)  # OneCycle needs at least 2 steps
    pct_start = min(max(float(warmup_pct), 0.0), 1.0)
    if math.isclose(pct_start * total_steps, 1.0):
        pct_start *= 0.999  # a warm-up of exactly one step makes torch's OneCycle divide by zero
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=pct_start,
        cycle_momentum=False,  # AdamW's betas stay fixed
    )


class FlatCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """DEIM's FlatCosine schedule (DEIM engine/optim/lr_scheduler.py), per optimizer step `s` (0-based):

        s < warmup_steps             quadratic warm-up: max_lr * ((s + 1) / warmup_steps) ** 2
        s < flat_end                 max_lr (flat)
        s >= decay_end               min_lr = min_lr_ratio * max_lr (the no-augmentation tail)
        otherwise                    cosine from max_lr at flat_end down to min_lr at decay_end

    Each group's max_lr is its LR when the scheduler is built (build_param_groups: backbone vs rest), so
    every group keeps its own ratio. The phases are checked in DEIM's order: a flat phase reaching past
    decay_end keeps the max LR to the end (DEIM-N's config). DEIM counts its warm-up from iteration 0 (LR 0);
    here the first step already trains at ((1 / warmup_steps) ** 2) * max_lr, so no step is wasted.

    All state is plain numbers, so state_dict() round-trips through a weights_only checkpoint.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        flat_end: int,
        decay_end: int,
        min_lr_ratio: float,
        last_epoch: int = -1,
    ) -> None:
        if not 0.0 <= float(min_lr_ratio) <= 1.0:
            raise ValueError(f"train.flat_cosine.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = max(int(warmup_steps), 0)
        self.flat_end = max(int(flat_end), 0)
        self.decay_end = max(int(decay_end), self.flat_end)
        self.min_lr_ratio = float(min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int) -> float:
        """The LR of optimizer step `step` as a fraction of the group's max LR."""
        if step < self.warmup_steps:
            return ((step + 1) / self.warmup_steps) ** 2
        if step < self.flat_end:
            return 1.0
        if step >= self.decay_end:
            return self.min_lr_ratio
        progress = (step - self.flat_end) / (self.decay_end - self.flat_end)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self) -> str:
        return (
            f"flat_cosine: warm-up {self.warmup_steps} steps, max LR until step {self.flat_end}, cosine down to "
            f"{self.min_lr_ratio:g} x max LR at step {self.decay_end}, then flat"
        )

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


def build_flat_cosine(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: Sequence[int],
    warmup_steps: int,
    flat_epochs: int | None,
    no_aug_epochs: int,
    min_lr_ratio: float,
) -> FlatCosineLR:
    """FlatCosineLR with its epoch boundaries turned into optimizer steps.

    steps_per_epoch: optimizer steps of every epoch (epochs may differ in length). The flat phase covers the
    first `flat_epochs` epochs (None: half of them, as in DEIM's COCO configs); the cosine ends where the
    last `no_aug_epochs` begin. The warm-up is capped at the flat phase: DEIM's 2000 steps are half a COCO
    epoch, but could be a whole small-data run.
    """
    epochs = len(steps_per_epoch)
    flat_epochs = epochs // 2 if flat_epochs is None else min(max(int(flat_epochs), 0), epochs)
    decay_epochs = min(max(epochs - int(no_aug_epochs), 0), epochs)
    flat_end = sum(steps_per_epoch[:flat_epochs])
    decay_end = sum(steps_per_epoch[:decay_epochs])
    warmup = min(int(warmup_steps), flat_end or decay_end or sum(steps_per_epoch))
    return FlatCosineLR(optimizer, warmup, flat_end, decay_end, min_lr_ratio)


SCHEDULERS = ("onecycle", "flat_cosine")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleSettings, steps_per_epoch: Sequence[int]
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule `train.scheduler` names, stepped once per optimizer step."""
    if schedule.name == "onecycle":
        return build_scheduler(optimizer, sum(steps_per_epoch), schedule.warmup_pct)
    if schedule.name == "flat_cosine":
        return build_flat_cosine(
            optimizer,
            steps_per_epoch,
            warmup_steps=schedule.warmup_steps,
            flat_epochs=schedule.flat_epochs,
            no_aug_epochs=schedule.no_aug_epochs,
            min_lr_ratio=schedule.min_lr_ratio,
        )
    raise ValueError(f"train.scheduler must be one of {list(SCHEDULERS)}, got {schedule.name!r}")


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current LR of each named group: {'lr_backbone': ..., 'lr_rest': ...} (no-decay twins share the LR)."""
    lrs = {}
    for index, group in enumerate(optimizer.param_groups):
        name = str(group.get("name", f"group{index}")).removesuffix("_no_decay")
        lrs.setdefault(f"lr_{name}", float(group["lr"]))
    return lrs


def backbone_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    return (param for name, param in model.named_parameters() if is_backbone_param(name))
