"""DETR (R50, R101 and their DC5 variants) as a family of the pipeline (src/models/family.py)."""

from __future__ import annotations

import torch

from src.common.errors import ConfigError
from src.models.detr.criterion import DetrCriterion, build_criterion
from src.models.detr.model import DETR, build_model
from src.models.detr.postprocess import DetrPostProcessor
from src.models.family import Family, LossSettings
from src.models.spec import ModelSpec

# The grid the check counts cells of: DETR's plain backbone stride (DC5 has 4x the cells).
GRID_STRIDE = 32


def check_queries_fit(spec: ModelSpec) -> None:
    """ConfigError when the stride-32 grid of model.img_size has fewer cells than model.num_queries."""
    height, width = spec.img_size
    cells = (height // GRID_STRIDE) * (width // GRID_STRIDE)
    if cells < spec.num_queries:
        raise ConfigError(
            f"model.img_size={[height, width]} gives {spec.display_name} a {height // GRID_STRIDE}x"
            f"{width // GRID_STRIDE} grid of {cells} cells at stride {GRID_STRIDE}, fewer than "
            f"model.num_queries={spec.num_queries}: use a larger model.img_size or at most {cells} queries"
        )


def build_detr(spec: ModelSpec) -> DETR:
    check_queries_fit(spec)
    return build_model(spec.size, spec.num_classes, num_queries=spec.num_queries)


def build_detr_criterion(spec: ModelSpec, losses: LossSettings) -> DetrCriterion:
    """DETR's cross-entropy loss; train.bg_loss_weight scales the "no object" weight (eos_coef 0.1 x it)."""
    if str(losses.cls_loss).lower() not in ("auto", "ce"):
        raise ConfigError(
            f"train.cls_loss must be auto or ce for {spec.display_name}, got {losses.cls_loss!r}"
        )
    return build_criterion(spec.num_classes, bg_loss_weight=losses.bg_loss_weight)


def build_detr_postprocessor(spec: ModelSpec) -> DetrPostProcessor:
    return DetrPostProcessor(spec.num_classes, num_top_queries=spec.num_queries)


def detr_main_file(state: dict[str, torch.Tensor], last_epoch: int) -> dict:
    """A checkpoint as DETR's main.py saves it: {"model": state dict, "epoch": the 0-based last epoch} (its
    optimizer, scheduler and argparse args left out: the model loads without them). class_embed keeps its
    layout, one row per class then "no object": the official head for num_classes = our class count."""
    return {"model": state, "epoch": int(last_epoch)}


DETR_FAMILY = Family(
    name="detr",
    archs=("detr",),
    tasks=("detect",),
    check_spec=check_queries_fit,
    build_model=build_detr,
    build_criterion=build_detr_criterion,
    build_postprocessor=build_detr_postprocessor,
    key_prefix="backbone.0.body.",  # the official Joiner[0].body: the ResNet
    official_file=detr_main_file,
)
