"""D-FINE hybrid encoder: AIFI (attention on the coarsest map) + CCFM (top-down FPN, bottom-up PAN).

1. 1x1 conv + BN projects every backbone map to `hidden_dim` channels.
2. AIFI: a post-norm transformer encoder layer with a 2-D sin-cos position embedding runs on the maps
   listed in `use_encoder_idx` (the stride-32 one).
3. CCFM: top-down, each map is refined by a lateral 1x1 conv, upsampled x2 and fused with the next finer
   map by a RepNCSPELAN4 block; bottom-up, a stride-2 SCDown conv brings it back and a second
   RepNCSPELAN4 fuses it with the top-down result.

On `deploy()` every ConvNormLayer folds its BN into its conv and every VGGBlock (RepVGG) folds both of
its branches into one 3x3 conv. Names follow the reference implementation so its checkpoints load.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from src.models.layers import activation_layer


def _fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of one conv equivalent to conv -> BN (eval statistics)."""
    std = (norm.running_var + norm.eps).sqrt()
    kernel = conv.weight * (norm.weight / std).reshape(-1, 1, 1, 1)
    bias = norm.bias - norm.running_mean * norm.weight / std
    if conv.bias is not None:
        bias = bias + conv.bias * norm.weight / std
    return kernel, bias


class ConvNormLayer(nn.Module):
    """Conv -> BN -> activation; `convert_to_deploy()` folds the BN into the conv (`conv_bn_fused`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        padding: int | None = None,
        bias: bool = False,
        act: str | None = None,
    ):
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=padding, groups=groups, bias=bias
        )
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = activation_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv_bn_fused"):
            return self.act(self.conv_bn_fused(x))
        return self.act(self.norm(self.conv(x)))

    def convert_to_deploy(self) -> None:
        if hasattr(self, "conv_bn_fused"):
            return
        conv = self.conv
        fused = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            padding=conv.padding,
            groups=conv.groups,
            bias=True,
        ).to(conv.weight)
        kernel, bias = _fold_batch_norm(conv, self.norm)
        fused.weight.data, fused.bias.data = kernel.detach(), bias.detach()
        self.conv_bn_fused = fused
        del self.conv, self.norm


class VGGBlock(nn.Module):
    """RepVGG block: act(BN(conv3x3(x)) + BN(conv1x1(x))), one 3x3 conv (`conv`) after deploy."""

    def __init__(self, in_channels: int, out_channels: int, act: str = "relu"):
        super().__init__()
        self.conv1 = ConvNormLayer(in_channels, out_channels, 3, 1, padding=1)
        self.conv2 = ConvNormLayer(in_channels, out_channels, 1, 1, padding=0)
        self.act = activation_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    def convert_to_deploy(self) -> None:
        if hasattr(self, "conv"):
            return
        kernel3, bias3 = _fold_batch_norm(self.conv1.conv, self.conv1.norm)
        kernel1, bias1 = _fold_batch_norm(self.conv2.conv, self.conv2.norm)
        fused = nn.Conv2d(self.conv1.conv.in_channels, self.conv1.conv.out_channels, 3, 1, padding=1)
        fused = fused.to(kernel3)
        fused.weight.data = (kernel3 + F.pad(kernel1, [1, 1, 1, 1])).detach()
        fused.bias.data = (bias3 + bias1).detach()
        self.conv = fused
        del self.conv1, self.conv2


class CSPLayer(nn.Module):
    """Two 1x1 branches; one goes through `num_blocks` VGG blocks; their sum is the output."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, act: str = "silu"):
        super().__init__()
        self.conv1 = ConvNormLayer(in_channels, out_channels, 1, 1, act=act)
        self.conv2 = ConvNormLayer(in_channels, out_channels, 1, 1, act=act)
        self.bottlenecks = nn.Sequential(
            *[VGGBlock(out_channels, out_channels, act=act) for _ in range(num_blocks)]
        )
        self.conv3 = nn.Identity()  # the reference's optional projection; identity at expansion 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


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


class TransformerEncoderLayer(nn.Module):
    """Post-norm self-attention + FFN; the position embedding is added to queries and keys only."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.0, act: str = "gelu"
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation_layer(act)

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        q = k = src + pos_embed
        attended, _ = self.self_attn(q, k, value=src)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos_embed)
        return src


def sincos_position_embedding(
    width: int, height: int, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """(1, width * height, dim) float32 2-D sin-cos embedding: [sin(x w), cos(x w), sin(y w), cos(y w)].

    Rows run x-major (row = x * height + y) while feature maps flatten y-major, so on a map each position
    gets the embedding of its transpose. The reference does the same and trained weights expect it.
    Always float32, like the reference, whatever the model dtype.
    """
    if dim % 4:
        raise ValueError(f"Position-embedding dim must be divisible by 4, got {dim}")
    grid_x, grid_y = torch.meshgrid(
        torch.arange(int(width), dtype=torch.float32),
        torch.arange(int(height), dtype=torch.float32),
        indexing="ij",
    )
    quarter = dim // 4
    omega = 1.0 / (temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    out_x = grid_x.flatten()[:, None] @ omega[None]
    out_y = grid_y.flatten()[:, None] @ omega[None]
    return torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)[None]


class HybridEncoder(nn.Module):
    def __init__(
        self,
        in_channels: list[int],
        feat_strides: list[int],
        hidden_dim: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        enc_act: str = "gelu",
        use_encoder_idx: tuple[int, ...] = (2,),
        num_encoder_layers: int = 1,
        pe_temperature: float = 10000.0,
        expansion: float = 1.0,
        depth_mult: float = 1.0,
        eval_spatial_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.out_channels = [hidden_dim] * len(in_channels)
        self.out_strides = self.feat_strides

        self.input_proj = nn.ModuleList(
            nn.Sequential(
                OrderedDict(
                    [
                        ("conv", nn.Conv2d(channels, hidden_dim, kernel_size=1, bias=False)),
                        ("norm", nn.BatchNorm2d(hidden_dim)),
                    ]
                )
            )
            for channels in in_channels
        )
        layer = TransformerEncoderLayer(hidden_dim, nhead, dim_feedforward, dropout, enc_act)
        self.encoder = nn.ModuleList(
            TransformerEncoder(copy.deepcopy(layer), num_encoder_layers) for _ in self.use_encoder_idx
        )

        # Both CCFM paths use the same block; widths as in the reference (note the float floor-division).
        branch_channels = round(expansion * hidden_dim // 2)
        depth = round(3 * depth_mult)
        num_fusions = len(in_channels) - 1

        def fusion_block() -> RepNCSPELAN4:
            return RepNCSPELAN4(hidden_dim * 2, hidden_dim, hidden_dim * 2, branch_channels, depth)

        self.lateral_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 1, 1) for _ in range(num_fusions)
        )
        self.fpn_blocks = nn.ModuleList(fusion_block() for _ in range(num_fusions))
        self.downsample_convs = nn.ModuleList(
            nn.Sequential(SCDown(hidden_dim, hidden_dim, 3, 2)) for _ in range(num_fusions)
        )
        self.pan_blocks = nn.ModuleList(fusion_block() for _ in range(num_fusions))

        # Position embeddings for the export size, precomputed (not saved: they depend only on the size).
        self.eval_spatial_size = tuple(eval_spatial_size) if eval_spatial_size else None
        if self.eval_spatial_size:
            eval_h, eval_w = self.eval_spatial_size
            for idx in self.use_encoder_idx:
                stride = self.feat_strides[idx]
                embed = sincos_position_embedding(
                    eval_w // stride, eval_h // stride, hidden_dim, pe_temperature
                )
                self.register_buffer(f"pos_embed{idx}", embed, persistent=False)

    def _position_embedding(self, level: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        cached = getattr(self, f"pos_embed{level}", None)
        if not self.training and cached is not None and cached.shape[1] == height * width:
            return cached
        embed = sincos_position_embedding(width, height, self.hidden_dim, self.pe_temperature)
        return embed.to(like.device)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"HybridEncoder expects {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [project(feat) for project, feat in zip(self.input_proj, feats)]  # each (B, hidden, h_i, w_i)

        # AIFI
        if self.num_encoder_layers > 0:
            for encoder, level in zip(self.encoder, self.use_encoder_idx):
                height, width = proj[level].shape[2:]
                tokens = proj[level].flatten(2).permute(0, 2, 1)  # (B, h*w, hidden)
                memory = encoder(tokens, self._position_embedding(level, height, width, tokens))
                proj[level] = memory.permute(0, 2, 1).reshape(-1, self.hidden_dim, height, width).contiguous()

        # CCFM top-down: coarse -> fine. top_down[0] is always the finest map processed so far.
        top_down = [proj[-1]]
        for step, level in enumerate(range(len(proj) - 1, 0, -1)):
            coarse = self.lateral_convs[step](top_down[0])
            top_down[0] = coarse
            upsampled = F.interpolate(coarse, scale_factor=2.0, mode="nearest")
            top_down.insert(0, self.fpn_blocks[step](torch.cat([upsampled, proj[level - 1]], dim=1)))

        # CCFM bottom-up: fine -> coarse.
        outs = [top_down[0]]
        for step in range(len(proj) - 1):
            downsampled = self.downsample_convs[step](outs[-1])
            outs.append(self.pan_blocks[step](torch.cat([downsampled, top_down[step + 1]], dim=1)))
        return outs  # strides of `feat_strides`, each (B, hidden, h_i, w_i)
