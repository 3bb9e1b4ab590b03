"""HGNetv2 backbone (PP-HGNetV2 from PaddleDetection, as D-FINE uses it).

A stem (strided convs plus a max-pool branch) followed by four stages of HG blocks. An HG block runs a
chain of convs, concatenates the input with every intermediate output, and squeezes the result back with
two 1x1 convs ("aggregation"). Later stages use "light" blocks (1x1 conv + depthwise conv). Sizes B0..B5
differ only in widths and depths. Learnable affine blocks (LAB, a scalar scale and bias after each
activation) are optional.

Module and parameter names follow the reference implementation so its checkpoints load directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn

from src.models.backbones.base import StagedBackbone


@dataclass(frozen=True)
class StageSpec:
    in_channels: int
    mid_channels: int
    out_channels: int
    num_blocks: int
    downsample: bool
    light_block: bool
    kernel_size: int
    layers_per_block: int


def _stages(*rows: tuple) -> tuple[StageSpec, ...]:
    return tuple(StageSpec(*row) for row in rows)


# name -> (stem channels (in, mid, out), four stages). Numbers from the PP-HGNetV2 model zoo.
ARCHS: dict[str, tuple[tuple[int, int, int], tuple[StageSpec, ...]]] = {
    "B0": (
        (3, 16, 16),
        _stages(
            (16, 16, 64, 1, False, False, 3, 3),
            (64, 32, 256, 1, True, False, 3, 3),
            (256, 64, 512, 2, True, True, 5, 3),
            (512, 128, 1024, 1, True, True, 5, 3),
        ),
    ),
    "B1": (
        (3, 24, 32),
        _stages(
            (32, 32, 64, 1, False, False, 3, 3),
            (64, 48, 256, 1, True, False, 3, 3),
            (256, 96, 512, 2, True, True, 5, 3),
            (512, 192, 1024, 1, True, True, 5, 3),
        ),
    ),
    "B2": (
        (3, 24, 32),
        _stages(
            (32, 32, 96, 1, False, False, 3, 4),
            (96, 64, 384, 1, True, False, 3, 4),
            (384, 128, 768, 3, True, True, 5, 4),
            (768, 256, 1536, 1, True, True, 5, 4),
        ),
    ),
    "B3": (
        (3, 24, 32),
        _stages(
            (32, 32, 128, 1, False, False, 3, 5),
            (128, 64, 512, 1, True, False, 3, 5),
            (512, 128, 1024, 3, True, True, 5, 5),
            (1024, 256, 2048, 1, True, True, 5, 5),
        ),
    ),
    "B4": (
        (3, 32, 48),
        _stages(
            (48, 48, 128, 1, False, False, 3, 6),
            (128, 96, 512, 1, True, False, 3, 6),
            (512, 192, 1024, 3, True, True, 5, 6),
            (1024, 384, 2048, 1, True, True, 5, 6),
        ),
    ),
    "B5": (
        (3, 32, 64),
        _stages(
            (64, 64, 128, 1, False, False, 3, 6),
            (128, 128, 512, 2, True, False, 3, 6),
            (512, 256, 1024, 5, True, True, 5, 6),
            (1024, 512, 2048, 2, True, True, 5, 6),
        ),
    ),
}

# ImageNet-pretrained ("stage 1") weights published with D-FINE.
PRETRAINED_URL = (
    "https://github.com/Peterande/storage/releases/download/dfinev1.0/PPHGNetV2_{name}_stage1.pth"
)


class LearnableAffineBlock(nn.Module):
    """y = scale * x + bias with two learnable scalars."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale]))
        self.bias = nn.Parameter(torch.tensor([bias]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """Conv (no bias, 'same' padding for odd kernels) -> BN -> optional ReLU -> optional LAB."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_act: bool = True,
        use_lab: bool = False,
    ):
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU() if use_act else nn.Identity()
        self.lab = LearnableAffineBlock() if use_act and use_lab else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lab(self.act(self.bn(self.conv(x))))


class LightConvBNAct(nn.Module):
    """1x1 conv (no activation) then a depthwise k x k conv with activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, use_lab: bool = False):
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 1, use_act=False, use_lab=use_lab)
        self.conv2 = ConvBNAct(out_channels, out_channels, kernel_size, groups=out_channels, use_lab=use_lab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class StemBlock(nn.Module):
    """Stride-4 stem: conv s2, then a 2x2-conv branch and a max-pool branch concatenated, conv s2, 1x1."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, use_lab: bool = False):
        super().__init__()
        self.stem1 = ConvBNAct(in_channels, mid_channels, 3, stride=2, use_lab=use_lab)
        self.stem2a = ConvBNAct(mid_channels, mid_channels // 2, 2, use_lab=use_lab)
        self.stem2b = ConvBNAct(mid_channels // 2, mid_channels, 2, use_lab=use_lab)
        self.stem3 = ConvBNAct(mid_channels * 2, mid_channels, 3, stride=2, use_lab=use_lab)
        self.stem4 = ConvBNAct(mid_channels, out_channels, 1, use_lab=use_lab)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem1(x)  # (B, mid, H/2, W/2)
        x = F.pad(x, (0, 1, 0, 1))  # 2x2 kernels with stride 1 keep the size after a right/bottom pad
        conv_branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        pool_branch = self.pool(x)
        x = torch.cat([pool_branch, conv_branch], dim=1)  # (B, 2 * mid, H/2, W/2)
        return self.stem4(self.stem3(x))  # (B, out, H/4, W/4)


class HGBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        num_layers: int,
        kernel_size: int,
        residual: bool,
        light_block: bool,
        use_lab: bool,
    ):
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            layer_in = in_channels if i == 0 else mid_channels
            if light_block:
                self.layers.append(LightConvBNAct(layer_in, mid_channels, kernel_size, use_lab=use_lab))
            else:
                self.layers.append(ConvBNAct(layer_in, mid_channels, kernel_size, use_lab=use_lab))
        total_channels = in_channels + num_layers * mid_channels
        self.aggregation = nn.Sequential(
            ConvBNAct(total_channels, out_channels // 2, 1, use_lab=use_lab),
            ConvBNAct(out_channels // 2, out_channels, 1, use_lab=use_lab),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        y = self.aggregation(torch.cat(outputs, dim=1))
        return y + x if self.residual else y


class HGStage(nn.Module):
    def __init__(self, spec: StageSpec, use_lab: bool):
        super().__init__()
        if spec.downsample:  # depthwise stride-2 conv, no activation
            self.downsample = ConvBNAct(
                spec.in_channels,
                spec.in_channels,
                3,
                2,
                groups=spec.in_channels,
                use_act=False,
                use_lab=use_lab,
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[
                HGBlock(
                    spec.in_channels if i == 0 else spec.out_channels,
                    spec.mid_channels,
                    spec.out_channels,
                    spec.layers_per_block,
                    spec.kernel_size,
                    residual=i > 0,
                    light_block=spec.light_block,
                    use_lab=use_lab,
                )
                for i in range(spec.num_blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class HGNetv2(StagedBackbone):
    """Backbone returning the feature maps of the stages in `return_idx` (strides 4, 8, 16, 32).

    freeze_at >= 0 freezes the stem parameters (and stages 0..freeze_at unless freeze_stem_only);
    freeze_norm turns every BatchNorm into FrozenBatchNorm2d (no running-stat updates, no
    `num_batches_tracked` in the state dict).
    """

    def __init__(
        self,
        name: str,
        use_lab: bool = False,
        return_idx: tuple[int, ...] = (1, 2, 3),
        freeze_stem_only: bool = True,
        freeze_at: int = 0,
        freeze_norm: bool = True,
    ):
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"Unknown HGNetv2 size {name!r}; choose one of {sorted(ARCHS)}")
        stem_channels, stages = ARCHS[name]
        self.name = name
        self.return_idx = tuple(return_idx)
        self.out_channels = [stages[i].out_channels for i in self.return_idx]
        self.out_strides = [(4, 8, 16, 32)[i] for i in self.return_idx]
        self.stage_channels = [stage.out_channels for stage in stages]

        self.stem = StemBlock(*stem_channels, use_lab=use_lab)
        self.stages = nn.ModuleList([HGStage(spec, use_lab) for spec in stages])

        frozen = [] if freeze_stem_only else list(self.stages[: freeze_at + 1])
        self._freeze([self.stem, *frozen] if freeze_at >= 0 else [], freeze_norm)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's map (strides 4, 8, 16, 32; channels `stage_channels`): a segmentation model's mask
        branch also reads the stride-4 one. Costs what forward costs (every size returns the last stage)."""
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def load_pretrained(
        self, source: str | Path | bool = True, cache_dir: str | Path = "weights/hgnetv2"
    ) -> None:
        """Load ImageNet weights: a local .pth path, or True to use/download `cache_dir`/PPHGNetV2_<name>_stage1.pth."""
        if source is True:
            path = Path(cache_dir) / f"PPHGNetV2_{self.name}_stage1.pth"
            if not path.exists():
                url = PRETRAINED_URL.format(name=self.name)
                logger.info(f"Downloading HGNetv2-{self.name} ImageNet weights from {url}")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.hub.download_url_to_file(url, str(path.with_suffix(".part")), progress=False)
                    path.with_suffix(".part").rename(path)
                except Exception as error:  # no network, proxy, ...
                    raise RuntimeError(
                        f"Could not download the pretrained HGNetv2-{self.name} backbone ({error}). "
                        f"Download {url} by hand to {path}, or build the model without a pretrained backbone."
                    ) from error
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"Pretrained backbone file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        result = self.load_state_dict(state, strict=False)
        # LAB blocks start as identity (scale 1, bias 0), so a file trained without them still fits.
        missing = [k for k in result.missing_keys if ".lab." not in k]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"{path} does not fit HGNetv2-{self.name}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        logger.info(f"Loaded pretrained HGNetv2-{self.name} backbone from {path}")
