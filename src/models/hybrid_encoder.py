"""The hybrid encoder of RT-DETR and D-FINE: AIFI (attention on the coarsest map) + CCFM (top-down FPN,
bottom-up PAN).

1. 1x1 conv + BN projects every backbone map to `hidden_dim` channels.
2. AIFI: a post-norm transformer encoder layer with a 2-D sin-cos position embedding runs on the maps
   listed in `use_encoder_idx` (the stride-32 one).
3. CCFM: top-down, each map is refined by a lateral conv, upsampled x2 and fused with the next finer map
   by a fusion block; bottom-up, a stride-2 block brings it back and a second fusion block fuses it with
   the top-down result. RT-DETR fuses with CSP blocks (this module), D-FINE with GELAN blocks
   (src/models/dfine/encoder.py).

On `deploy()` every ConvNormLayer folds its BN into its conv and every VGGBlock (RepVGG) folds both of
its branches into one 3x3 conv. Names follow the reference implementations so their checkpoints load.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from src.models.layers import ConvNormLayer, activation_layer, fold_batch_norm


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
        kernel3, bias3 = fold_batch_norm(self.conv1.conv, self.conv1.norm)
        kernel1, bias1 = fold_batch_norm(self.conv2.conv, self.conv2.norm)
        fused = nn.Conv2d(self.conv1.conv.in_channels, self.conv1.conv.out_channels, 3, 1, padding=1)
        fused = fused.to(kernel3)
        fused.weight.data = (kernel3 + F.pad(kernel1, [1, 1, 1, 1])).detach()
        fused.bias.data = (bias3 + bias1).detach()
        self.conv = fused
        del self.conv1, self.conv2


class CSPLayer(nn.Module):
    """Two 1x1 branches of `expansion` x out_channels; one goes through `num_blocks` VGG blocks; their sum
    is the output (projected back to out_channels by `conv3` when the branches are narrower)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, expansion: float = 1.0, act: str = "silu"
    ):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, act=act)
        self.bottlenecks = nn.Sequential(*[VGGBlock(hidden, hidden, act=act) for _ in range(num_blocks)])
        self.conv3 = (
            ConvNormLayer(hidden, out_channels, 1, 1, act=act) if hidden != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


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
    """Backbone maps -> `len(in_channels)` maps of hidden_dim channels at the same strides.

    The CCFM blocks are RT-DETR's: a lateral 1x1 conv + act, CSP fusion blocks of VGG blocks, and
    stride-2 3x3 conv + act downsampling. D-FINE's encoder (src/models/dfine/encoder.py) overrides the
    three `_..._block` methods.
    """

    @classmethod
    def from_size(cls, size, img_size: tuple[int, int] | None) -> HybridEncoder:
        """The encoder of a size-table entry (D-FINE's ModelSize or RT-DETRv2's RTDETRSize share these
        fields); img_size (h, w) precomputes the position embedding for that input."""
        return cls(
            in_channels=list(size.encoder_in_channels),
            feat_strides=list(size.feat_strides),
            hidden_dim=size.hidden_dim,
            nhead=size.nhead,
            dim_feedforward=size.encoder_ffn_dim,
            use_encoder_idx=size.use_encoder_idx,
            expansion=size.expansion,
            depth_mult=size.depth_mult,
            eval_spatial_size=img_size,
        )

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
        act: str = "silu",
        eval_spatial_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.expansion, self.depth_mult, self.act = expansion, depth_mult, act
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

        num_fusions = len(in_channels) - 1
        self.lateral_convs = nn.ModuleList(self._lateral_block() for _ in range(num_fusions))
        self.fpn_blocks = nn.ModuleList(self._fusion_block() for _ in range(num_fusions))
        self.downsample_convs = nn.ModuleList(self._downsample_block() for _ in range(num_fusions))
        self.pan_blocks = nn.ModuleList(self._fusion_block() for _ in range(num_fusions))

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

    def _lateral_block(self) -> nn.Module:
        return ConvNormLayer(self.hidden_dim, self.hidden_dim, 1, 1, act=self.act)

    def _fusion_block(self) -> nn.Module:
        """Fuses the concatenation of two maps (2 x hidden_dim channels) into hidden_dim channels."""
        depth = round(3 * self.depth_mult)
        return CSPLayer(2 * self.hidden_dim, self.hidden_dim, depth, expansion=self.expansion, act=self.act)

    def _downsample_block(self) -> nn.Module:
        return ConvNormLayer(self.hidden_dim, self.hidden_dim, 3, 2, act=self.act)

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
