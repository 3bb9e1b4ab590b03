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
   width: "pred_masks" (B, Q, H/4, W/4). sigmoid > 0.5 (logit > 0) is the mask.

Cost, the reason for the light layers: a segmentation model may cost at most about 1.25x the detector. The
widths are kept small (MASK_DIM 64, the full 3x3 conv only at the finest encoder stride); the largest
remaining item is the dot product of every query with the stride-4 map.

After `convert_to_deploy()` (export and the torch runtime) the head skips that dot product: it returns the
two embeddings ("mask_embedding" (B, Q, D), "pixel_embedding" (B, D, H/4, W/4)) and the postprocessor
takes the dot product for the K queries it keeps (`mask_logits`), the same numbers as gathering them from
"pred_masks" without computing, or copying, the maps of the queries it drops.

The branch only adds keys to the decoder's outputs; boxes and scores are computed exactly as without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.models.layers import MLP

NORM_GROUPS = 32  # GroupNorm groups (batch-size independent: masks often train with small batches)
MASK_DIM = 64  # pixel / mask embedding width, every size (cost ~ width x pixels x queries); YOLACT uses 32
DETAIL_STRIDE = 4  # the backbone stage the pixel embedding also reads, and so the mask logits' stride
# Deploy-mode outputs of the head, read by the postprocessor (src/models/postprocess.py)
MASK_EMBEDDING = "mask_embedding"  # (B, Q, D): each query's mask embedding, already scaled
PIXEL_EMBEDDING = "pixel_embedding"  # (B, D, H/4, W/4)


def mask_logits(mask_embedding: torch.Tensor, pixel_embedding: torch.Tensor) -> torch.Tensor:
    """(B, K, D) query mask embeddings . (B, D, h, w) pixel embedding -> (B, K, h, w) mask logits."""
    return torch.einsum("bkd,bdhw->bkhw", mask_embedding, pixel_embedding)


class DeployGroupNorm(nn.Module):
    """nn.GroupNorm's result from per-channel spatial moments (same weights, same numbers up to float
    rounding): (B, C, H, W) -> (B, C, H, W). Every group holds H*W values of each of its channels, so its
    mean and (biased) variance are the means of its channels' moments. Unlike GroupNorm's reshape of the map
    into (B, groups, -1), nothing here depends on the map's memory layout: a runtime that keeps maps in a
    blocked channel layout (OpenVINO) normalises in place instead of reordering the stride-4 map twice."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias  # the same Parameters (and state_dict keys)

    def group_mean(self, per_channel: torch.Tensor) -> torch.Tensor:
        """(B, C) per-channel values -> (B, C): the mean over each channel's group."""
        b, c = per_channel.shape
        grouped = per_channel.view(b, self.groups, c // self.groups)
        return grouped.mean(2, keepdim=True).expand_as(grouped).reshape(b, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.group_mean(x.mean((2, 3)))  # (B, C)
        variance = self.group_mean((x - mean[..., None, None]).square().mean((2, 3)))  # (B, C)
        # The affine folded into one scale and shift per (image, channel): one pass over the map. weight /
        # sqrt, not rsqrt * weight: the ONNX exporter merges equal weights (a zero-initialised GroupNorm
        # weight equals the zero biases) into one initializer behind Identity nodes, and onnxruntime's
        # fusion of 1/x * w then refers to an Identity output it removed (the graph fails to load).
        scale = self.weight / torch.sqrt(variance + self.eps)  # (B, C)
        shift = self.bias - mean * scale  # (B, C)
        return x * scale[..., None, None] + shift[..., None, None]


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
    "pred_masks" (B, Q, H/4, W/4) mask logits instead of "query_features" (deploy mode: the two embeddings
    the logits are made of, MASK_EMBEDDING and PIXEL_EMBEDDING)."""

    mask_stride = DETAIL_STRIDE  # output stride of the mask logits, every size

    def __init__(self, encoder_channels: list[int], detail_channels: int, query_dim: int, mask_dim: int):
        super().__init__()
        self.pixel_embedding = PixelEmbedding(encoder_channels, detail_channels, mask_dim)
        self.mask_embedding = MLP(query_dim, query_dim, mask_dim, 3)
        self.scale = mask_dim**-0.5
        self.deploy_mode = False

    def extra_repr(self) -> str:
        return f"mask_stride={self.mask_stride}"

    def convert_to_deploy(self) -> None:
        """Return the embeddings instead of every query's logits (see the module doc), GroupNorms computed
        as DeployGroupNorm. One way."""
        self.deploy_mode = True
        norms = [
            (parent, name, child)
            for parent in self.modules()
            for name, child in parent.named_children()
            if isinstance(child, nn.GroupNorm)
        ]
        for parent, name, norm in norms:
            setattr(parent, name, DeployGroupNorm(norm))

    def forward(self, feats: list[torch.Tensor], outputs: dict, detail: torch.Tensor) -> dict:
        if "query_features" not in outputs:
            raise ValueError("MaskHead needs the decoder's query features: set decoder.return_query_features")
        outputs = dict(outputs)
        queries = outputs.pop("query_features")  # (B, Q, C)
        pixels = self.pixel_embedding(feats, detail)  # (B, D, H/4, W/4)
        embedding = self.mask_embedding(queries) * self.scale  # (B, Q, D)
        if self.deploy_mode:
            return outputs | {MASK_EMBEDDING: embedding, PIXEL_EMBEDDING: pixels}
        outputs["pred_masks"] = mask_logits(embedding, pixels)  # (B, Q, H/4, W/4)
        return outputs


def build_mask_head(encoder_channels: list[int], detail_channels: int, query_dim: int) -> MaskHead:
    """The mask branch for a model whose encoder gives maps of `encoder_channels` (finest first), whose
    backbone's stride-4 stage has `detail_channels` and whose decoder queries have `query_dim` channels."""
    return MaskHead(list(encoder_channels), detail_channels, query_dim, mask_dim=MASK_DIM)
