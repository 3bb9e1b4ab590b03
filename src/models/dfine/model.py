"""The D-FINE detector (backbone -> hybrid encoder -> decoder [-> mask head]) and `build_model`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from src.models.backbones.hgnetv2 import HGNetv2
from src.models.dfine.decoder import DFineDecoder
from src.models.dfine.encoder import DFineEncoder
from src.models.dfine.sizes import ModelSize, get_size
from src.models.layers import fold_for_deploy
from src.models.mask_head import MaskHead, build_mask_head
from src.models.outputs import DetectorOutputs
from src.models.query_selection import decoder_size_kwargs
from src.models.spec import TASKS


class DFINE(nn.Module):
    """images (B, 3, H, W) float in [0, 1] -> DetectorOutputs (src/models/outputs.py). Eval: "pred_logits"
    (B, Q, classes), "pred_boxes" (B, Q, 4) normalised cxcywh; train (`model(images, targets)`): also the
    deep-supervision and denoising fields the criterion consumes. With a mask head (task "segment") both
    also hold "pred_masks" (B, Q, H/4, W/4) mask logits."""

    def __init__(
        self,
        backbone: HGNetv2,
        encoder: DFineEncoder,
        decoder: DFineDecoder,
        arch: ModelSize | None = None,
        mask_head: MaskHead | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder
        self.arch = arch  # the size-table entry it was built from
        self.mask_head = mask_head
        decoder.return_query_features = mask_head is not None

    @property
    def task(self) -> str:
        return "detect" if self.mask_head is None else "segment"

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> DetectorOutputs:
        if self.mask_head is None:
            return self.decoder(self.encoder(self.backbone(images)), targets)
        stages = self.backbone.stage_outputs(images)  # strides 4, 8, 16, 32
        feats = self.encoder([stages[i] for i in self.backbone.return_idx])
        # The mask branch also reads the stride-4 stage (edges finer than the encoder's 1/8 or 1/16).
        return self.mask_head(feats, self.decoder(feats, targets), detail=stages[0])

    def deploy(self) -> DFINE:
        """Eval mode, RepVGG/BN folding, and only the layers eval runs; outputs do not change. One way."""
        return fold_for_deploy(self)


def build_model(
    model_name: str,
    num_classes: int,
    img_size: tuple[int, int] | None = (640, 640),
    variant: str = "dfine",
    num_queries: int = 300,
    num_denoising: int = 100,
    pretrained_backbone: bool | str | Path = False,
    arch_overrides: dict | None = None,
    task: str = "detect",
) -> DFINE:
    """A D-FINE / DEIM-D-FINE detector of size `model_name` ('n' | 's' | 'm' | 'l' | 'x').

    img_size (h, w): the export/eval input size; anchors and position embeddings for it are precomputed
    (other sizes still work, computed on the fly). pretrained_backbone: False, True (ImageNet HGNetv2
    weights from weights/hgnetv2/, downloaded if missing) or a path to them. arch_overrides: fields of
    `sizes.ModelSize` to change, e.g. from `sizes.arch_overrides_from_state_dict(checkpoint)`.
    task: "detect" or "segment" (adds the mask branch, src/models/mask_head.py; boxes are unchanged).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {' | '.join(TASKS)}, got {task!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if img_size is not None:
        img_size = (int(img_size[0]), int(img_size[1]))
        if img_size[0] % 32 or img_size[1] % 32:
            raise ValueError(f"img_size (h, w) must be multiples of 32, got {img_size}")
    size = get_size(model_name, variant, arch_overrides)

    backbone = HGNetv2(
        size.backbone,
        use_lab=size.use_lab,
        return_idx=size.return_idx,
        freeze_stem_only=size.freeze_stem_only,
        freeze_at=size.freeze_at,
        freeze_norm=size.freeze_norm,
    )
    if pretrained_backbone:
        backbone.load_pretrained(pretrained_backbone)
    encoder = DFineEncoder.from_size(size, img_size)
    decoder = DFineDecoder(
        **decoder_size_kwargs(size, num_classes, num_queries, num_denoising, img_size),
        reg_max=size.reg_max,
        reg_scale=size.reg_scale,
        layer_scale=size.layer_scale,
    )
    mask_head = None
    if task == "segment":
        if size.layer_scale != 1:  # the mask MLP reads the eval layer's queries in training and eval alike
            raise ValueError("task=segment needs decoder layers of one width (layer_scale 1)")
        channels = [size.hidden_dim] * len(size.feat_strides)  # every encoder output map has hidden_dim
        mask_head = build_mask_head(channels, backbone.stage_channels[0], size.decoder_hidden_dim)
    return DFINE(backbone, encoder, decoder, size, mask_head)
