"""The RT-DETRv2 / DEIM-RT-DETRv2 detector (ResNet-vd backbone -> hybrid encoder -> RT-DETRv2 decoder)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from src.models.backbones.presnet import PResNet
from src.models.hybrid_encoder import HybridEncoder
from src.models.layers import fold_for_deploy
from src.models.query_selection import decoder_size_kwargs
from src.models.rtdetr.decoder import RTDETRv2Decoder
from src.models.rtdetr.sizes import RTDETRSize, get_size


class RTDETR(nn.Module):
    """images (B, 3, H, W) float in [0, 1] -> eval: {"pred_logits" (B, Q, classes), "pred_boxes" (B, Q, 4)
    normalised cxcywh}; train (`model(images, targets)`): the full output dict the criterion consumes."""

    task = "detect"

    def __init__(self, backbone: PResNet, encoder: HybridEncoder, decoder: RTDETRv2Decoder, arch: RTDETRSize):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder
        self.arch = arch  # the size-table entry it was built from

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> dict:
        return self.decoder(self.encoder(self.backbone(images)), targets)

    def deploy(self) -> RTDETR:
        """Eval mode, BN folding (backbone and encoder), RepVGG folding, only the decoder layers eval runs;
        outputs do not change."""
        return fold_for_deploy(self)


def build_model(
    arch: str,
    size_name: str,
    num_classes: int,
    img_size: tuple[int, int] | None = (640, 640),
    num_queries: int = 300,
    num_denoising: int = 100,
    pretrained_backbone: bool | str | Path = False,
    arch_overrides: dict | None = None,
) -> RTDETR:
    """An RT-DETRv2 (arch "rtdetrv2") or DEIM-RT-DETRv2 ("deim_rtdetrv2") detector of size `size_name`
    (r18 | r34 | r50m | r50 | r101).

    img_size (h, w): the export/eval input size; anchors and position embeddings for it are precomputed
    (other sizes still work, computed on the fly). pretrained_backbone: False, True (the ImageNet ResNet-vd
    file from weights/presnet/, downloaded if missing) or its path.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if img_size is not None:
        img_size = (int(img_size[0]), int(img_size[1]))
    size = get_size(arch, size_name, arch_overrides)
    backbone = PResNet(
        size.depth, return_idx=size.return_idx, freeze_at=size.freeze_at, freeze_norm=size.freeze_norm
    )
    if pretrained_backbone:
        backbone.load_pretrained(pretrained_backbone)
    encoder = HybridEncoder.from_size(size, img_size)
    decoder = RTDETRv2Decoder(
        **decoder_size_kwargs(size, num_classes, num_queries, num_denoising, img_size),
        query_pos_method=size.query_pos_method,
        cross_attn_method=size.cross_attn_method,
    )
    return RTDETR(backbone, encoder, decoder, size)
