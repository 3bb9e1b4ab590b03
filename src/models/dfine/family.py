"""D-FINE and DEIM-D-FINE as a family of the pipeline (src/models/family.py)."""

from __future__ import annotations

from torch import nn

from src.models.criterion import build_criterion
from src.models.dfine.model import DFINE, build_model
from src.models.dfine.sizes import arch_overrides_from_state_dict
from src.models.dfine.weights import dfine_arch_of
from src.models.family import Family, LossSettings
from src.models.postprocess import PostProcessor
from src.models.spec import ModelSpec

# Each arch's own classification loss: DEIM trains with MAL, D-FINE with VFL.
OFFICIAL_CLS_LOSS = {"dfine": "vfl", "deim_dfine": "mal"}


def size_variant(arch: str) -> str:
    """The size table's variant (src/models/dfine/sizes.py) of a D-FINE arch."""
    return "deim" if arch == "deim_dfine" else "dfine"


def build_dfine(spec: ModelSpec) -> DFINE:
    return build_model(
        spec.size,
        spec.num_classes,
        img_size=spec.img_size,
        variant=size_variant(spec.arch),
        num_queries=spec.num_queries,
        arch_overrides=spec.arch_overrides or None,
        task=spec.task,
    )


def build_dfine_criterion(spec: ModelSpec, losses: LossSettings) -> nn.Module:
    return build_criterion(
        spec.size,
        spec.num_classes,
        cls_loss=losses.classification_loss(spec, OFFICIAL_CLS_LOSS),
        bg_loss_weight=losses.bg_loss_weight,
        mask_loss=losses.mask_loss if spec.task == "segment" else None,
    )


def build_dfine_postprocessor(spec: ModelSpec) -> PostProcessor:
    return PostProcessor(spec.num_classes, num_top_queries=spec.num_queries)


DFINE_FAMILY = Family(
    name="dfine",
    archs=("dfine", "deim_dfine"),
    tasks=("detect", "segment"),
    build_model=build_dfine,
    build_criterion=build_dfine_criterion,
    build_postprocessor=build_dfine_postprocessor,
    key_prefix="backbone.stem.",  # HGNetv2's stem
    arch_overrides=arch_overrides_from_state_dict,
    tell_arch=dfine_arch_of,
)
