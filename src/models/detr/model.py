"""The DETR detector: ResNet -> 1x1 projection -> transformer -> class head (classes + "no object") and
box MLP, one prediction per learned object query.

State-dict keys are the official ones (backbone.0.body.*, transformer.*, class_embed, bbox_embed,
query_embed, input_proj), so official `{"model": ...}` files load as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from src.models.backbones.resnet import ResNet
from src.models.detr.position import sine_position_embedding
from src.models.detr.sizes import DEFAULT_NUM_QUERIES, DetrSize, get_size
from src.models.detr.transformer import Transformer
from src.models.layers import MLP

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneSlot(nn.Module):
    """Holds the ResNet as `.body`: with the model's `backbone` list this gives the official key path
    backbone.0.body.* (the official Joiner[0] is a Backbone whose `body` is the ResNet)."""

    def __init__(self, body: ResNet):
        super().__init__()
        self.body = body


class DETR(nn.Module):
    """images (B, 3, H, W) float in [0, 1] -> {"pred_logits" (B, Q, classes + 1), "pred_boxes" (B, Q, 4)
    normalised cxcywh}; the last logit column is "no object". In train mode also "aux_outputs": the same
    pair for each earlier decoder layer (auxiliary losses)."""

    def __init__(self, backbone: ResNet, transformer: Transformer, num_classes: int, num_queries: int):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_classes, self.num_queries = num_classes, num_queries
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.out_channels, hidden_dim, kernel_size=1)
        self.backbone = nn.ModuleList([BackboneSlot(backbone)])

    @property
    def task(self) -> str:
        return "detect"

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> dict:
        """targets: accepted for the shared training call `model(images, targets)`; DETR does not use them."""
        mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        features = self.input_proj(self.backbone[0].body((images - mean) / std))  # (B, C, h, w)
        height, width = features.shape[-2:]
        pos = sine_position_embedding(height, width, self.transformer.d_model // 2, device=images.device)
        src = features.flatten(2).transpose(1, 2)  # (B, h * w, C)
        hs = self.transformer(src, pos.to(src.dtype)[None], self.query_embed.weight, all_layers=self.training)
        logits = self.class_embed(hs)  # (layers, B, Q, classes + 1)
        boxes = self.bbox_embed(hs).sigmoid()  # (layers, B, Q, 4)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.training:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
            ]
        return out

    def deploy(self) -> DETR:
        """Eval mode (only the last decoder layer feeds the heads); outputs do not change."""
        self.eval()
        return self


def build_model(
    size_name: str,
    num_classes: int,
    num_queries: int = DEFAULT_NUM_QUERIES,
    pretrained_backbone: str | Path | None = None,
    dropout: float | None = None,
) -> DETR:
    """A DETR of size `size_name` (r50 | r101 | r50_dc5 | r101_dc5) predicting `num_classes` classes.
    pretrained_backbone: path of torchvision's ImageNet ResNet file for that depth. dropout: the
    transformer's (None: the size's, 0.1); 0 makes train mode deterministic."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    size: DetrSize = get_size(size_name)
    backbone = ResNet(size.backbone, dilate_last_stage=size.dilation)
    if pretrained_backbone:
        backbone.load_imagenet(pretrained_backbone)
    transformer = Transformer(
        d_model=size.hidden_dim,
        nhead=size.nhead,
        num_encoder_layers=size.enc_layers,
        num_decoder_layers=size.dec_layers,
        dim_feedforward=size.dim_feedforward,
        dropout=size.dropout if dropout is None else dropout,
    )
    return DETR(backbone, transformer, num_classes, num_queries)
