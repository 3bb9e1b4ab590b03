"""Saving a trained model in its family's official file format, so the official code can load it.

    save_official_checkpoint(path, spec, state, epoch)   # -> path
    official_file_name(spec, dataset)                     # "deim_dfine_n_<dataset>.pth", ...

Our state dicts already use the official tensor names and shapes (the parity tests check them against the
official models' manifests); what differs per family is the file around them (Family.official_file): the
DEIM / D-FINE / RT-DETRv2 solver's {"model", "ema": {"module"}} or DETR's {"model", "epoch"}. The file
holds no metadata of ours: loading it back (train.pretrained_model_path) goes the way of any official file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from src.common.io import atomic_torch_save
from src.models.build import family_of
from src.models.spec import ModelSpec

# Tensors only our segmentation models have: no official model has a mask branch.
MASK_BRANCH_PREFIX = "mask_head."


def official_file_name(spec: ModelSpec, dataset: str) -> str:
    """A file name in the style of the releases (arch, size, data set): a DEIM file's name says "deim",
    which is how the D-FINE family tells DEIM-D-FINE n/s/m weights from D-FINE's."""
    return f"{spec.arch}_{spec.size}_{dataset}.pth"


def official_state(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` as the official model's state dict: fp32 (floating tensors), contiguous, on the CPU. A
    segmentation model is refused: the official architectures have no mask branch to load it into."""
    if spec.task != "detect" or any(key.startswith(MASK_BRANCH_PREFIX) for key in state):
        raise ValueError(
            f"{spec.display_name} with model.task={spec.task}: the official {spec.display_name} code has no "
            "mask branch, so only detection models can be saved in its format"
        )
    return {
        key: (value.float() if value.is_floating_point() else value).detach().cpu().contiguous()
        for key, value in state.items()
    }


def save_official_checkpoint(
    path: str | Path, spec: ModelSpec, state: Mapping[str, torch.Tensor], epoch: int
) -> Path:
    """Write `state` (a model of `spec`, trained `epoch` epochs, 1-based) as the family's official training
    code saves a checkpoint; atomic."""
    official = family_of(spec.arch).official_file(official_state(spec, state), max(int(epoch) - 1, 0))
    return atomic_torch_save(path, official)
