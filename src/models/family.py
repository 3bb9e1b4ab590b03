"""What a detector family provides to the rest of the pipeline (src/models/build.py lists the families).

Every family builds, from one ModelSpec, a model whose forward takes images (B, 3, H, W) in [0, 1] and
returns the output dict of src/models/outputs.py, a criterion (the training loss over those outputs and
the targets), and a postprocessor (outputs -> labels, pixel boxes, scores). Stages never branch on the
family: they go through build(spec).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import torch
from torch import nn

from src.models.archs import ARCH_TITLES
from src.models.spec import ModelSpec


@dataclass(frozen=True)
class LossSettings:
    """The training-loss choices of train.* that a family's criterion honours."""

    cls_loss: str = "auto"  # the family's classification loss ("auto" = the arch's official one)
    bg_loss_weight: float = 1.0  # extra weight on unmatched queries' classification loss (1 = official)
    mask_loss: dict | None = None  # train.mask_loss, for segmentation models

    def classification_loss(self, spec: ModelSpec, official: Mapping[str, str]) -> str:
        """The classification loss, vfl or mal: cls_loss, or for "auto" the arch's official one (official: arch -> loss)."""
        cls_loss = str(self.cls_loss).lower()
        if cls_loss == "auto":
            cls_loss = official[spec.arch]
        if cls_loss not in ("vfl", "mal"):
            raise ValueError(
                f"train.cls_loss must be auto, vfl or mal for {spec.display_name}, got {cls_loss!r}"
            )
        return cls_loss


def deim_solver_file(state: dict[str, torch.Tensor], last_epoch: int) -> dict:
    """A checkpoint as the DEIM / D-FINE / RT-DETRv2 solver saves it (`BaseSolver.state_dict`): the model and
    its EMA ({"module": state dict}); fine-tuning there (`-t`) reads ema.module, resuming (`-r`) both. The
    same tensors under both keys: torch.save stores them once. No last_epoch: a resumed official run would
    skip that many epochs of its own schedule."""
    return {"date": datetime.now().isoformat(), "model": state, "ema": {"module": state}}


@dataclass(frozen=True)
class Family:
    name: str  # "dfine" | "rtdetr" | "detr"
    archs: tuple[str, ...]  # the model.arch values it builds (src/models/archs.py lists their sizes)
    tasks: tuple[str, ...]  # model.task values it supports
    build_model: Callable[[ModelSpec], nn.Module]
    build_criterion: Callable[[ModelSpec, LossSettings], nn.Module]
    build_postprocessor: Callable[[ModelSpec], nn.Module]
    # A state-dict key prefix only this family's checkpoints have (tells a file's family apart).
    key_prefix: str
    # ConfigError when a spec the size table accepts cannot work for this family (build.check_buildable).
    check_spec: Callable[[ModelSpec], None] = field(default=lambda spec: None)
    # Architecture details read off a checkpoint's weights (ModelSpec.arch_overrides); {} when none.
    arch_overrides: Callable[[Mapping[str, torch.Tensor]], dict] = field(default=lambda state: {})
    # (state dict, lower-case file name) -> (arch | None, reason), for families whose archs share tensors.
    tell_arch: Callable[[Mapping[str, torch.Tensor], str], tuple[str | None, str]] | None = None
    # (state dict with the official names, 0-based last epoch) -> the dict its official training code saves.
    official_file: Callable[[dict[str, torch.Tensor], int], dict] = deim_solver_file

    def holds(self, state: Mapping[str, torch.Tensor]) -> bool:
        """True when `state` (a state dict) is a checkpoint of this family."""
        return any(key.startswith(self.key_prefix) for key in state)

    def arch_of(self, state: Mapping[str, torch.Tensor], file_name: str) -> tuple[str | None, str]:
        """(model.arch, reason) of a checkpoint of this family, or (None, why it cannot be told)."""
        if self.tell_arch is not None:
            return self.tell_arch(state, file_name)
        titles = [ARCH_TITLES[arch] for arch in self.archs]
        if len(self.archs) == 1:
            return self.archs[0], f"its tensor names are {titles[0]}'s"
        if "deim" in file_name and any(arch.startswith("deim_") for arch in self.archs):
            deim = next(arch for arch in self.archs if arch.startswith("deim_"))
            return deim, f"the file name {file_name!r} contains 'deim'"
        return None, f"{' and '.join(titles)} weights have the same tensors: the file cannot tell which"
