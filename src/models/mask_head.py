"""The instance-mask branch of a segmentation model (model.task=segment).

The design of Mask DINO / RT-DETR-seg / D-FINE-seg, in our own code:
1. Pixel embedding: the hybrid encoder's maps (finest first, each (B, hidden, h_i, w_i)) are projected to
   `mask_dim` channels, the coarser ones upsampled onto the finest and summed, mixed by a 3x3 conv, then
   upsampled (bilinear) to stride 4 and added to a 1x1 projection of the backbone's stride-4 stage (as
   Mask DINO feeds its pixel decoder the backbone's 1/4 map), then a depthwise 3x3 + pointwise 1x1 conv.
   The result is (B, mask_dim, H/4, W/4) for every size. Why the backbone map: the encoder starts at 1/8
   (s, m, l, x) or 1/16 (n); upsampling it alone gave n logits at 1/8, where a 24 px object is 3 pixels.
2. Mask embedding: an MLP on the decoder's query features of the layer that gives "pred_boxes"
   (the decoder returns them as "query_features" when `return_query_features` is set).
3. Mask logits: their dot product, scaled by 1/sqrt(mask_dim) so the logits start small whatever the
   width: "pred_masks" (B, Q, H/4, W/4). logit > network_input.MASK_LOGIT_THRESHOLD is the mask.

Cost, the reason for the light layers: issue 14 allows a segmentation model 1.3x the detector's training
step and 1.25x its latency. D-FINE-seg's branch (256 channels, full 3x3 convs also at the doubled
resolution) costs 10.6 GFLOPs on D-FINE-n and 42.9 on -s at 640 px, more than the detectors themselves
(7.3 and 25.0); this one (MASK_DIM 64, the full 3x3 conv only at the finest encoder stride) 1.6 and 2.3,
most of it the dot product of 300 queries with the 1/4 map (a 128-wide branch at 1/4 made n's forward 1.53x).

The branch only adds a key to the decoder's outputs; boxes and scores are computed exactly as without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.models.layers import MLP

NORM_GROUPS = 32  # GroupNorm groups (batch-size independent: masks often train with small batches)
MASK_DIM = 64  # pixel / mask embedding width, every size (cost ~ width x pixels x queries); YOLACT uses 32
DETAIL_STRIDE = 4  # the backbone stage the pixel embedding also reads, and so the mask logits' stride


def _conv_norm(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.GroupNorm(NORM_GROUPS, out_channels)
    )


def _conv_norm_relu(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.GroupNorm(NORM_GROUPS, out_channels), nn.ReLU(inplace=True))


class PixelEmbedding(nn.Module):
    """(encoder maps [(B, C_i, h_i, w_i), finest first], backbone detail map (B, C_d, H/4, W/4))
    -> (B, mask_dim, H/4, W/4)."""

    def __init__(self, in_channels: list[int], detail_channels: int, mask_dim: int):
        super().__init__()
        if mask_dim % NORM_GROUPS:
            raise ValueError(f"mask_dim must be a multiple of {NORM_GROUPS}, got {mask_dim}")
        self.lateral = nn.ModuleList(_conv_norm(c, mask_dim) for c in in_channels)
        self.fuse = _conv_norm_relu(mask_dim, mask_dim, 3)  # at the finest encoder stride
        # The backbone's stride-4 stage: edges the encoder (stride 8 or 16) no longer resolves.
        self.detail = _conv_norm(detail_channels, mask_dim)
        # Zero scale: the branch starts as the plain upsampled encoder map and learns how much backbone
        # detail to add (raw stride-4 features at full weight swamp the young embedding with texture).
        nn.init.zeros_(self.detail[1].weight)
        # At stride 4 only a depthwise 3x3 (local smoothing) and a pointwise 1x1 (channel mixing): a full
        # 3x3 conv there would cost 9x the pointwise one on 4-16x the pixels.
        depthwise = nn.Conv2d(mask_dim, mask_dim, 3, padding=1, groups=mask_dim, bias=False)
        self.refine = nn.Sequential(depthwise, *_conv_norm_relu(mask_dim, mask_dim, 1))

    def forward(self, feats: list[torch.Tensor], detail: torch.Tensor) -> torch.Tensor:
        fused = self.lateral[0](feats[0])  # (B, D, h0, w0)
        for lateral, feat in zip(self.lateral[1:], feats[1:]):
            fused = fused + F.interpolate(lateral(feat), size=fused.shape[-2:], mode="bilinear")
        fused = self.fuse(fused)
        # Bilinear + convs rather than a transposed conv: no checkerboard pattern in the masks.
        fine = F.interpolate(fused, size=detail.shape[-2:], mode="bilinear")  # (B, D, H/4, W/4)
        return self.refine(fine + self.detail(detail))


class MaskHead(nn.Module):
    """(encoder maps, decoder outputs with "query_features", backbone stride-4 map) -> outputs with
    "pred_masks" (B, Q, H/4, W/4) mask logits instead of "query_features"."""

    mask_stride = DETAIL_STRIDE  # output stride of the mask logits, every size

    def __init__(self, encoder_channels: list[int], detail_channels: int, query_dim: int, mask_dim: int):
        super().__init__()
        self.pixel_embedding = PixelEmbedding(encoder_channels, detail_channels, mask_dim)
        self.mask_embedding = MLP(query_dim, query_dim, mask_dim, 3)
        self.scale = mask_dim**-0.5

    def extra_repr(self) -> str:
        return f"mask_stride={self.mask_stride}"

    def forward(self, feats: list[torch.Tensor], outputs: dict, detail: torch.Tensor) -> dict:
        if "query_features" not in outputs:
            raise ValueError("MaskHead needs the decoder's query features: set decoder.return_query_features")
        outputs = dict(outputs)
        queries = outputs.pop("query_features")  # (B, Q, C)
        pixels = self.pixel_embedding(feats, detail)  # (B, D, H/4, W/4)
        embedding = self.mask_embedding(queries) * self.scale  # (B, Q, D)
        outputs["pred_masks"] = torch.einsum("bqd,bdhw->bqhw", embedding, pixels)  # (B, Q, H/4, W/4)
        return outputs


def build_mask_head(encoder_channels: list[int], detail_channels: int, query_dim: int) -> MaskHead:
    """The mask branch for a model whose encoder gives maps of `encoder_channels` (finest first), whose
    backbone's stride-4 stage has `detail_channels` and whose decoder queries have `query_dim` channels."""
    return MaskHead(list(encoder_channels), detail_channels, query_dim, mask_dim=MASK_DIM)
