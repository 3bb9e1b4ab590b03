"""D-FINE's hybrid encoder: the shared AIFI + CCFM encoder (src/models/hybrid_encoder.py) with D-FINE's
CCFM blocks: a lateral 1x1 conv without activation, RepNCSPELAN4 (GELAN) fusion blocks and SCDown
(1x1 conv + depthwise stride-2 conv) downsampling.
"""

from __future__ import annotations

import torch
from torch import nn

from src.models.hybrid_encoder import CSPLayer, HybridEncoder
from src.models.layers import ConvNormLayer


class RepNCSPELAN4(nn.Module):
    """GELAN block (YOLOv9): split a 1x1 projection in two, grow one half through two CSP stages,
    concatenate all four pieces and project back."""

    def __init__(
        self, in_channels: int, out_channels: int, split_channels: int, branch_channels: int, depth: int
    ):
        super().__init__()
        act = "silu"
        self.half = split_channels // 2
        self.cv1 = ConvNormLayer(in_channels, split_channels, 1, 1, act=act)
        self.cv2 = nn.Sequential(
            CSPLayer(self.half, branch_channels, depth, act=act),
            ConvNormLayer(branch_channels, branch_channels, 3, 1, act=act),
        )
        self.cv3 = nn.Sequential(
            CSPLayer(branch_channels, branch_channels, depth, act=act),
            ConvNormLayer(branch_channels, branch_channels, 3, 1, act=act),
        )
        self.cv4 = ConvNormLayer(split_channels + 2 * branch_channels, out_channels, 1, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = list(self.cv1(x).split((self.half, self.half), dim=1))
        pieces.append(self.cv2(pieces[-1]))
        pieces.append(self.cv3(pieces[-1]))
        return self.cv4(torch.cat(pieces, dim=1))


class SCDown(nn.Module):
    """Spatial-channel downsampling (YOLOv10): 1x1 conv then a depthwise stride-s conv, no activations."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.cv1 = ConvNormLayer(in_channels, out_channels, 1, 1)
        self.cv2 = ConvNormLayer(out_channels, out_channels, kernel_size, stride, groups=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(self.cv1(x))


class DFineEncoder(HybridEncoder):
    def _lateral_block(self) -> nn.Module:
        return ConvNormLayer(self.hidden_dim, self.hidden_dim, 1, 1)

    def _fusion_block(self) -> nn.Module:
        # Widths as in the reference (note the float floor-division).
        hidden = self.hidden_dim
        branch_channels = round(self.expansion * hidden // 2)
        return RepNCSPELAN4(hidden * 2, hidden, hidden * 2, branch_channels, round(3 * self.depth_mult))

    def _downsample_block(self) -> nn.Module:
        return nn.Sequential(SCDown(self.hidden_dim, self.hidden_dim, 3, 2))
