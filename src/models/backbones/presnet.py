"""ResNet-vd ("PResNet"), the backbone of RT-DETR / RT-DETRv2, in plain torch.

Variant d of "Bag of Tricks" ResNets: the 7x7 stem is three 3x3 convs (conv1_1 stride 2, conv1_2,
conv1_3), and a downsampling shortcut average-pools before its 1x1 conv instead of striding it (so it
reads every input pixel). Depths 18 / 34 use two-conv basic blocks, 50 / 101 bottlenecks (x4 channels).
The maps of the stages in `return_idx` come out (strides 4, 8, 16, 32 for stages 0..3).

Key names are the reference implementation's, so its ImageNet files (converted from PaddlePaddle) and
detector checkpoints load as they are. freeze_at >= 0 stops training of the stem and stages
< freeze_at; freeze_norm turns every BatchNorm into FrozenBatchNorm2d.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from src.models.backbones.base import StagedBackbone
from src.models.layers import ConvNormLayer

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (4, 8, 16, 32)
# The ImageNet files the reference downloads (PaddleClas weights converted to torch).
PRETRAINED_FILES = {
    18: "ResNet18_vd_pretrained_from_paddle.pth",
    34: "ResNet34_vd_pretrained_from_paddle.pth",
    50: "ResNet50_vd_ssld_v2_pretrained_from_paddle.pth",
    101: "ResNet101_vd_ssld_pretrained_from_paddle.pth",
}
PRETRAINED_URL = "https://github.com/lyuwenyu/storage/releases/download/v0.1/{file}"


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Variant d: a strided shortcut average-pools first, then projects with a stride-1 1x1 conv."""
    if stride == 2:
        pool = nn.AvgPool2d(2, 2, 0, ceil_mode=True)
        return nn.Sequential(
            OrderedDict([("pool", pool), ("conv", ConvNormLayer(in_channels, out_channels, 1))])
        )
    return ConvNormLayer(in_channels, out_channels, 1, stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: bool):
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(in_channels, width, stride)
        self.branch2a = ConvNormLayer(in_channels, width, 3, stride, act="relu")
        self.branch2b = ConvNormLayer(width, width, 3, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut else self.short(x)
        return self.act(self.branch2b(self.branch2a(x)) + identity)


class BottleNeck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: bool):
        super().__init__()
        out_channels = width * self.expansion
        self.branch2a = ConvNormLayer(in_channels, width, 1, 1, act="relu")
        self.branch2b = ConvNormLayer(width, width, 3, stride, act="relu")  # variant d strides the 3x3
        self.branch2c = ConvNormLayer(width, out_channels, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(in_channels, out_channels, stride)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut else self.short(x)
        return self.act(self.branch2c(self.branch2b(self.branch2a(x))) + identity)


class Blocks(nn.Module):
    """One stage: the first block changes width (and halves the map except in stage 0)."""

    def __init__(self, block: type[nn.Module], in_channels: int, width: int, count: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            first = i == 0
            stride = 2 if first and downsample else 1
            self.blocks.append(block(in_channels, width, stride=stride, shortcut=not first))
            in_channels = width * block.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(StagedBackbone):
    """images (B, 3, H, W) -> the maps of the stages in `return_idx`, each (B, out_channels[i], H/s, W/s)."""

    def __init__(
        self,
        depth: int,
        return_idx: tuple[int, ...] = (1, 2, 3),
        freeze_at: int = -1,
        freeze_norm: bool = True,
    ):
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"Unknown ResNet-vd depth {depth}; choose one of {sorted(BLOCKS_PER_STAGE)}")
        self.depth = depth
        block = BottleNeck if depth >= 50 else BasicBlock
        stem = [(3, 32, 2, "conv1_1"), (32, 32, 1, "conv1_2"), (32, 64, 1, "conv1_3")]
        self.conv1 = nn.Sequential(
            OrderedDict(
                (name, ConvNormLayer(cin, cout, 3, stride, act="relu")) for cin, cout, stride, name in stem
            )
        )
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage_channels = [width * block.expansion for width in STAGE_WIDTHS]
        self.res_layers = nn.ModuleList()
        in_channels = 64
        for stage, (width, count) in enumerate(zip(STAGE_WIDTHS, BLOCKS_PER_STAGE[depth])):
            self.res_layers.append(Blocks(block, in_channels, width, count, downsample=stage > 0))
            in_channels = width * block.expansion
        self.return_idx = tuple(return_idx)
        self.out_channels = [self.stage_channels[i] for i in self.return_idx]
        self.out_strides = [STAGE_STRIDES[i] for i in self.return_idx]

        frozen = [self.conv1, *self.res_layers[: min(freeze_at, len(self.res_layers))]]
        self._freeze(frozen if freeze_at >= 0 else [], freeze_norm)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's map (strides 4, 8, 16, 32; channels `stage_channels`)."""
        x = self.pool(self.conv1(x))
        features = []
        for stage in self.res_layers:
            x = stage(x)
            features.append(x)
        return features

    def load_pretrained(
        self, source: str | Path | bool = True, cache_dir: str | Path = "weights/presnet"
    ) -> None:
        """Load the ImageNet weights: a local .pth path, or True to use/download `cache_dir`/<file>."""
        path = _pretrained_path(self.depth, source, Path(cache_dir))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # not a torch file, truncated download, ...
            raise RuntimeError(f"{path} is not a readable ResNet-vd state dict ({error})") from error
        state = state.get("model", state) if isinstance(state, dict) else state
        result = self.load_state_dict(state, strict=False)
        # BatchNorm fills a missing counter itself; a trainable-norm model may lack it in the file.
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"{path} does not fit ResNet{self.depth}-vd: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        logger.info(f"Loaded pretrained ResNet{self.depth}-vd backbone from {path}")


def _pretrained_path(depth: int, source: str | Path | bool, cache_dir: Path) -> Path:
    if source is not True:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Pretrained ResNet{depth}-vd file not found: {path}")
        return path
    path = cache_dir / PRETRAINED_FILES[depth]
    if path.exists():
        return path
    url = PRETRAINED_URL.format(file=PRETRAINED_FILES[depth])
    logger.info(f"Downloading ResNet{depth}-vd ImageNet weights from {url}")
    part = path.with_suffix(".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(part), progress=False)
        part.rename(path)
    except Exception as error:  # no network, proxy, ...
        raise RuntimeError(
            f"Could not download the pretrained ResNet{depth}-vd backbone ({error}). "
            f"Download {url} by hand to {path}, or build the model without a pretrained backbone."
        ) from error
    return path
