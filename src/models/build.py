"""build(spec): the one way training and deployment make a detector, whatever its family.

spec = ModelSpec.from_config(cfg)                         # or spec_from_checkpoint(meta, state)
model, criterion, postprocessor = build(spec, LossSettings(...))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from src.common.errors import ConfigError
from src.models.archs import ARCH_TITLES
from src.models.detr.family import DETR_FAMILY
from src.models.dfine.family import DFINE_FAMILY
from src.models.family import Family, LossSettings
from src.models.rtdetr.family import RTDETR_FAMILY
from src.models.spec import ModelSpec

FAMILIES: tuple[Family, ...] = (DFINE_FAMILY, RTDETR_FAMILY, DETR_FAMILY)
_FAMILY_OF_ARCH = {arch: family for family in FAMILIES for arch in family.archs}


class Detector(NamedTuple):
    model: nn.Module  # images (B, 3, H, W) in [0, 1] -> the output dict of src/models/outputs.py
    criterion: nn.Module  # the training loss
    postprocessor: nn.Module  # raw outputs -> labels, boxes (pixels), scores


def family_of(arch: str) -> Family:
    if arch not in _FAMILY_OF_ARCH:
        raise ConfigError(
            f"model.arch={arch!r} has no model here; choose one of {' | '.join(_FAMILY_OF_ARCH)}"
        )
    return _FAMILY_OF_ARCH[arch]


def check_buildable(spec: ModelSpec) -> None:
    """ConfigError (one line) unless spec's family builds it: a task the family supports (the message names
    the archs that do), and the family's own checks (DETR: its queries fit the input's grid). Stages call it
    before any work, build() again."""
    family = family_of(spec.arch)
    if spec.task not in family.tasks:
        supporting = [arch for other in FAMILIES if spec.task in other.tasks for arch in other.archs]
        raise ConfigError(
            f"model.task={spec.task} is not available for {ARCH_TITLES[spec.arch]} (it supports "
            f"{' | '.join(family.tasks)}); model.task={spec.task} needs model.arch={' | '.join(supporting)}"
        )
    family.check_spec(spec)


def build(spec: ModelSpec, losses: LossSettings | None = None) -> Detector:
    """(model, criterion, postprocessor) for `spec`; losses: the train.* loss choices (defaults: official)."""
    check_buildable(spec)
    family = family_of(spec.arch)
    return Detector(
        family.build_model(spec),
        family.build_criterion(spec, losses or LossSettings()),
        family.build_postprocessor(spec),
    )


def spec_from_checkpoint(meta: Mapping, state: Mapping[str, torch.Tensor]) -> ModelSpec:
    """The spec a checkpoint of ours was built from, its architecture overrides read off the weights (a
    meta written before it recorded them still rebuilds a model fine-tuned from released weights)."""
    spec = ModelSpec.from_meta(meta)
    return spec.with_arch_overrides(family_of(spec.arch).arch_overrides(state))


def family_holding(state: Mapping[str, torch.Tensor]) -> Family | None:
    """The family whose checkpoints look like `state`, or None."""
    return next((family for family in FAMILIES if family.holds(state)), None)
