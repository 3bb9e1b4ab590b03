"""RT-DETRv2 and DEIM-RT-DETRv2 as a family of the pipeline (src/models/family.py)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from src.models.criterion import build_criterion
from src.models.family import Family, LossSettings
from src.models.postprocess import PostProcessor
from src.models.rtdetr.model import RTDETR, build_model
from src.models.spec import ModelSpec

# Each arch's own classification loss: DEIM trains with MAL (gamma 1.5), RT-DETRv2 with VFL.
OFFICIAL_CLS_LOSS = {"rtdetrv2": "vfl", "deim_rtdetrv2": "mal"}
# Both official criteria: VFL/MAL 1, L1 5, GIoU 2; matcher costs class 2, bbox 5, giou 2 (the shared defaults).
LOSS_WEIGHTS = {"vfl": 1.0, "mal": 1.0, "bbox": 5.0, "giou": 2.0}


def build_rtdetr(spec: ModelSpec) -> RTDETR:
    if spec.task != "detect":
        raise ValueError(f"{spec.display_name} is a detector only (model.task=detect), got {spec.task!r}")
    return build_model(
        spec.arch,
        spec.size,
        spec.num_classes,
        img_size=spec.img_size,
        num_queries=spec.num_queries,
        arch_overrides=spec.arch_overrides or None,
    )


def build_rtdetr_criterion(spec: ModelSpec, losses: LossSettings) -> nn.Module:
    """The official criterion: each head's own Hungarian matching for every term (no GO-LSD union set)."""
    return build_criterion(
        spec.size,
        spec.num_classes,
        cls_loss=losses.classification_loss(spec, OFFICIAL_CLS_LOSS),
        loss_weights=LOSS_WEIGHTS,
        bg_loss_weight=losses.bg_loss_weight,
        use_union_set=False,
    )


def build_rtdetr_postprocessor(spec: ModelSpec) -> PostProcessor:
    """The official RT-DETRv2 postprocessor is D-FINE's: sigmoid, top-K over (query, class) pairs."""
    return PostProcessor(spec.num_classes, num_top_queries=spec.num_queries)


def rtdetr_arch_of(state: Mapping[str, torch.Tensor], file_name: str) -> tuple[str | None, str]:
    """(arch, reason): DEIM-RT-DETRv2's query-position MLP has 3 layers ("as_reg"), RT-DETRv2's 2."""
    if "decoder.query_pos_head.layers.2.weight" in state:
        return "deim_rtdetrv2", "its query-position head has 3 layers (DEIM's as_reg; RT-DETRv2's has 2)"
    if "decoder.query_pos_head.layers.1.weight" in state:
        return "rtdetrv2", "its query-position head has 2 layers (RT-DETRv2's; DEIM's has 3)"
    return None, "it has no decoder query-position head to tell RT-DETRv2 from DEIM-RT-DETRv2"


RTDETR_FAMILY = Family(
    name="rtdetr",
    archs=("rtdetrv2", "deim_rtdetrv2"),
    tasks=("detect",),
    build_model=build_rtdetr,
    build_criterion=build_rtdetr_criterion,
    build_postprocessor=build_rtdetr_postprocessor,
    key_prefix="backbone.res_layers.",  # ResNet-vd's stages (DETR's torchvision ResNet is backbone.0.body.)
    tell_arch=rtdetr_arch_of,
)
