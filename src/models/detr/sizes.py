"""The DETR size table: R50 / R101 backbones, each plain (stride 32) or DC5 (dilated last stage, stride 16).

Numbers are the official defaults (facebookresearch/detr main.py): hidden 256, 8 heads, 6 encoder and 6
decoder layers, FFN 2048, dropout 0.1, post-norm, 100 queries, auxiliary losses on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DetrSize:
    backbone: str  # resnet50 | resnet101 (src/models/backbones/resnet.py)
    dilation: bool  # DC5: the last stage dilated instead of strided
    hidden_dim: int = 256
    nhead: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1


SIZES: dict[str, DetrSize] = {
    "r50": DetrSize("resnet50", dilation=False),
    "r101": DetrSize("resnet101", dilation=False),
    "r50_dc5": DetrSize("resnet50", dilation=True),
    "r101_dc5": DetrSize("resnet101", dilation=True),
}
DEFAULT_NUM_QUERIES = 100


def get_size(name: str) -> DetrSize:
    if name not in SIZES:
        raise ValueError(f"Unknown DETR size {name!r}; choose one of {' '.join(SIZES)}")
    return SIZES[name]
