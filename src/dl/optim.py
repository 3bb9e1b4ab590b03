"""AdamW parameter groups and the OneCycle schedule used by the trainer.

Groups follow the official D-FINE optimizer configs (dfine_hgnetv2_*_coco.yml): the backbone gets its own,
lower learning rate, and normalisation weights and biases get no weight decay. Unlike the official regexes
(where `(?!.*norm|bn)` lets backbone BatchNorm weights slip into the decayed group), norms are found by
module type, so every norm layer is covered whatever it is called.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

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
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=max(int(total_steps), 2),  # OneCycle needs at least 2 steps
        pct_start=min(max(float(warmup_pct), 0.0), 1.0),
        cycle_momentum=False,  # AdamW's betas stay fixed
    )


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current LR of each named group: {'lr_backbone': ..., 'lr_rest': ...} (no-decay twins share the LR)."""
    lrs = {}
    for index, group in enumerate(optimizer.param_groups):
        name = str(group.get("name", f"group{index}")).removesuffix("_no_decay")
        lrs.setdefault(f"lr_{name}", float(group["lr"]))
    return lrs


def backbone_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    return (param for name, param in model.named_parameters() if is_backbone_param(name))
