"""ResNet-50/101 in torchvision's layout and key names, with frozen BatchNorm: DETR's backbone.

torchvision's ImageNet files (`resnet50-*.pth`, `resnet101-*.pth`) load as they are (`load_imagenet`):
same keys, `num_batches_tracked` dropped by the frozen norms, the classifier (`fc.*`) ignored.
DC5 (`dilate_last_stage`) keeps stride 16 in the last stage and dilates its 3x3 convs instead, exactly as
torchvision's `replace_stride_with_dilation=[False, False, True]`: the stage's first block keeps the
previous dilation (1), the following blocks use 2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from loguru import logger
from torch import nn

from src.models.backbones.base import FrozenBatchNorm2d

BLOCKS_PER_STAGE = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck width; each block outputs 4x this
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride, dilation) -> 1x1 expand, plus the (projected) input."""

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), FrozenBatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """images (B, 3, H, W), ImageNet-normalised -> last stage (B, 2048, H/32, W/32), or H/16 with DC5.

    As DETR trains it: the stem and layer1 are frozen (requires_grad False), layer2-4 train; every norm
    is a FrozenBatchNorm2d (no statistics update in train mode)."""

    def __init__(self, name: str = "resnet50", dilate_last_stage: bool = False):
        super().__init__()
        if name not in BLOCKS_PER_STAGE:
            raise ValueError(f"Unknown ResNet {name!r}; choose one of {sorted(BLOCKS_PER_STAGE)}")
        self.name = name
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        in_channels, dilation = 64, 1
        for index, (blocks, width) in enumerate(zip(BLOCKS_PER_STAGE[name], STAGE_WIDTHS)):
            stride = 1 if index == 0 else 2
            first_dilation = dilation
            if index == 3 and dilate_last_stage:
                dilation, stride = dilation * stride, 1
            stage = [Bottleneck(in_channels, width, stride, first_dilation)]
            in_channels = width * EXPANSION
            stage += [Bottleneck(in_channels, width, dilation=dilation) for _ in range(blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.out_channels = in_channels
        self.stride = 16 if dilate_last_stage else 32
        for module in (self.conv1, self.layer1):
            module.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def load_imagenet(self, path: str | Path) -> None:
        """Load torchvision's ImageNet state dict for this depth (the classifier `fc.*` is not part of the
        backbone). A missing file, or one of another depth, is refused in one line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageNet {self.name} weights not found at {path} (nothing is downloaded here: put "
                f"torchvision's {self.name} ImageNet .pth file there, or train without a pretrained backbone)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        missing = [k for k in own if k not in state]
        extra = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
        if missing or wrong or extra:
            raise ValueError(
                f"{path} is not torchvision's {self.name} ImageNet file ({len(missing)} tensors missing, "
                f"{len(extra)} unknown, {len(wrong)} of another shape; e.g. {(missing + extra + wrong)[:3]})"
            )
        self.load_state_dict(state, strict=False)
        logger.info(f"Loaded ImageNet {self.name} backbone from {path}")
