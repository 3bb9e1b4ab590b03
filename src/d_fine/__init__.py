"""D-FINE / DEIM-D-FINE detectors in plain torch: HGNetv2 backbone, hybrid encoder, FDR decoder.

Public API:
    ModelSpec.from_config(cfg) / ModelSpec.from_meta(meta) -> the typed model description (src/d_fine/spec.py)
    build(spec, cls_loss="auto", bg_loss_weight=1.0) -> Detector(model, criterion, postprocessor)
    save_run_checkpoint / load_run_checkpoint -> our checkpoint format (src/d_fine/checkpoint.py)
    build_model(model_name, num_classes, img_size=(h, w), variant="dfine", num_queries=300,
                num_denoising=100, pretrained_backbone=False, arch_overrides=None, task="detect") -> DFINE
                (task="segment": + mask branch, "pred_masks" logits; src/d_fine/mask_head.py)
    build_postprocessor(num_classes, num_top_queries=300) -> PostProcessor
    build_criterion(model_name, num_classes, ..., mask_loss=None) -> the training loss (src/d_fine/criterion.py;
                mask_loss = train.mask_loss for a segmentation model, src/d_fine/mask_loss.py)
    load_pretrained(model, path_or_state, class_names=None) -> LoadReport (src/d_fine/checkpoint.py)
    checkpoint_variant(path_or_state) -> ("dfine" | "deim" | None, reason)
"""

from src.d_fine.checkpoint import (
    RunCheckpoint,
    checkpoint_arch_overrides,
    checkpoint_variant,
    load_pretrained,
    load_run_checkpoint,
    save_run_checkpoint,
)
from src.d_fine.criterion import build_criterion
from src.d_fine.model import DFINE, Detector, build, build_model
from src.d_fine.postprocess import PostProcessor, build_postprocessor
from src.d_fine.sizes import SIZES, VARIANTS, arch_overrides_from_state_dict, get_size
from src.d_fine.spec import ModelSpec

__all__ = [
    "DFINE",
    "Detector",
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
    "checkpoint_arch_overrides",
    "checkpoint_variant",
    "get_size",
    "load_pretrained",
    "load_run_checkpoint",
    "save_run_checkpoint",
]
