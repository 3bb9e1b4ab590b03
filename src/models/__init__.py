"""The detectors in plain torch, one package per family (src/models/archs.py lists archs and sizes):
dfine/ (D-FINE, DEIM-D-FINE), with shared parts beside them and backbones in backbones/.

Public API:
    ModelSpec.from_config(cfg) / ModelSpec.from_meta(meta) -> the typed model description (src/models/spec.py)
    build(spec, LossSettings(cls_loss="auto", bg_loss_weight=1.0, mask_loss=None))
                -> Detector(model, criterion, postprocessor)   (src/models/build.py; any family)
    spec_from_checkpoint(meta, state) -> the spec one of our checkpoints was built as
    save_run_checkpoint / load_run_checkpoint -> our checkpoint format (src/models/checkpoint.py)
    build_model(model_name, num_classes, img_size=(h, w), variant="dfine", num_queries=300,
                num_denoising=100, pretrained_backbone=False, arch_overrides=None, task="detect") -> DFINE
                (task="segment": + mask branch, "pred_masks" logits; src/models/mask_head.py)
    build_postprocessor(num_classes, num_top_queries=300) -> PostProcessor
    build_criterion(model_name, num_classes, ..., mask_loss=None) -> the training loss (src/models/criterion.py;
                mask_loss = train.mask_loss for a segmentation model, src/models/mask_loss.py)
    load_pretrained(model, path_or_state, class_names=None) -> LoadReport (src/models/checkpoint.py)
    checkpoint_arch(path_or_state) -> (model.arch | None, reason)
"""

from src.models.build import FAMILIES, Detector, build, family_of, spec_from_checkpoint
from src.models.checkpoint import RunCheckpoint, load_run_checkpoint, save_run_checkpoint
from src.models.criterion import build_criterion
from src.models.dfine.model import DFINE, build_model
from src.models.dfine.sizes import SIZES, VARIANTS, arch_overrides_from_state_dict, get_size
from src.models.family import Family, LossSettings
from src.models.postprocess import PostProcessor, build_postprocessor
from src.models.pretrained import (
    checkpoint_arch,
    checkpoint_arch_overrides,
    load_pretrained,
    pretrained_mismatch,
)
from src.models.spec import ModelSpec

__all__ = [
    "DFINE",
    "Detector",
    "FAMILIES",
    "Family",
    "LossSettings",
    "ModelSpec",
    "RunCheckpoint",
    "SIZES",
    "VARIANTS",
    "PostProcessor",
    "arch_overrides_from_state_dict",
    "build",
    "build_criterion",
    "build_model",
    "build_postprocessor",
    "family_of",
    "spec_from_checkpoint",
    "checkpoint_arch_overrides",
    "checkpoint_arch",
    "get_size",
    "load_pretrained",
    "pretrained_mismatch",
    "load_run_checkpoint",
    "save_run_checkpoint",
]
