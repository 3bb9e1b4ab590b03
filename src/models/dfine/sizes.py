"""The D-FINE size table (n, s, m, l, x) and the two variants (official D-FINE, DEIM-D-FINE).

Numbers come from the official COCO configs (`configs/dfine/dfine_hgnetv2_{size}_coco.yml` plus
`include/dfine_hgnetv2.yml`) as the parity fixtures in tests/fixtures/parity/ pin them down.

Two fields need care, because the fixtures were produced the way the official config loader behaves when
several size configs are loaded in one process: its `load_config(path, cfg=dict())` default argument keeps
keys from the previously loaded file, so the n config's `DFINETransformer.dim_feedforward: 512` and
`HGNetv2.use_lab: True` carry over to s, m, l, x. A fresh process loading only the s (or m, l, x) config
instead gets decoder FFN 1024 (and no LAB for l, x), which is what the released COCO checkpoints have.
`decoder_ffn_dim` and `use_lab` are therefore explicit fields here; `arch_overrides_from_state_dict`
reads them off a checkpoint so it can be built and loaded without shape errors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from src.models.size_fields import HybridDetectorSize

VARIANTS = ("dfine", "deim")


@dataclass(frozen=True, kw_only=True)
class ModelSize(HybridDetectorSize):
    # HGNetv2 backbone
    backbone: str
    use_lab: bool
    freeze_stem_only: bool = True
    # decoder: extra stride-2 levels beyond the encoder maps, and FDR's bins
    num_levels: int
    reg_scale: float
    layer_scale: float = 1
    reg_max: int = 32


_THREE_LEVELS = dict(
    return_idx=(1, 2, 3),
    feat_strides=(8, 16, 32),
    use_encoder_idx=(2,),
    num_levels=3,
    num_points=(3, 6, 3),
    decoder_ffn_dim=512,  # see the module docstring
    use_lab=True,  # see the module docstring
)

SIZES: dict[str, ModelSize] = {
    "n": ModelSize(
        backbone="B0",
        return_idx=(2, 3),
        freeze_at=-1,
        freeze_norm=False,
        use_lab=True,
        encoder_in_channels=(512, 1024),
        feat_strides=(16, 32),
        hidden_dim=128,
        use_encoder_idx=(1,),
        encoder_ffn_dim=512,
        expansion=0.34,
        depth_mult=0.5,
        decoder_feat_channels=(128, 128),
        decoder_hidden_dim=128,
        num_levels=2,
        num_layers=3,
        num_points=(6, 6),
        decoder_ffn_dim=512,
        reg_scale=4.0,
    ),
    "s": ModelSize(
        **_THREE_LEVELS,
        backbone="B0",
        freeze_at=-1,
        freeze_norm=False,
        encoder_in_channels=(256, 512, 1024),
        hidden_dim=256,
        encoder_ffn_dim=1024,
        expansion=0.5,
        depth_mult=0.34,
        decoder_feat_channels=(256, 256, 256),
        decoder_hidden_dim=256,
        num_layers=3,
        reg_scale=4.0,
    ),
    "m": ModelSize(
        **_THREE_LEVELS,
        backbone="B2",
        freeze_at=-1,
        freeze_norm=False,
        encoder_in_channels=(384, 768, 1536),
        hidden_dim=256,
        encoder_ffn_dim=1024,
        expansion=1.0,
        depth_mult=0.67,
        decoder_feat_channels=(256, 256, 256),
        decoder_hidden_dim=256,
        num_layers=4,
        reg_scale=4.0,
    ),
    "l": ModelSize(
        **_THREE_LEVELS,
        backbone="B4",
        freeze_at=0,
        freeze_norm=True,
        encoder_in_channels=(512, 1024, 2048),
        hidden_dim=256,
        encoder_ffn_dim=1024,
        expansion=1.0,
        depth_mult=1.0,
        decoder_feat_channels=(256, 256, 256),
        decoder_hidden_dim=256,
        num_layers=6,
        reg_scale=4.0,
    ),
    "x": ModelSize(
        **_THREE_LEVELS,
        backbone="B5",
        freeze_at=0,
        freeze_norm=True,
        encoder_in_channels=(512, 1024, 2048),
        hidden_dim=384,
        encoder_ffn_dim=2048,
        expansion=1.0,
        depth_mult=1.0,
        decoder_feat_channels=(384, 384, 384),
        decoder_hidden_dim=256,
        num_layers=6,
        reg_scale=8.0,
    ),
}

# What DEIM-D-FINE (configs/deim_dfine/deim_hgnetv2_{size}_coco.yml, base/deim.yml) changes.
_DEIM_CHANGES = dict(freeze_at=-1, freeze_norm=False, activation="silu", mlp_act="silu")

# Fields a caller may override (e.g. from a checkpoint); anything structural that the table holds.


def get_size(name: str, variant: str = "dfine", overrides: dict | None = None) -> ModelSize:
    """The architecture of size `name` ('n'..'x') in `variant` ('dfine' | 'deim'), with optional overrides."""
    if name not in SIZES:
        raise ValueError(f"Unknown D-FINE size {name!r}; choose one of {list(SIZES)}")
    if variant not in VARIANTS:
        raise ValueError(f"Unknown model variant {variant!r}; choose one of {list(VARIANTS)}")
    size = SIZES[name]
    if variant == "deim":
        size = replace(size, **_DEIM_CHANGES)
    return size.with_overrides(overrides)


def arch_overrides_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """Architecture fields that can differ between checkpoints of one size: decoder FFN width, LAB blocks,
    frozen vs ordinary backbone BatchNorm. Returns only what the state dict determines."""
    overrides = {}
    ffn = state.get("decoder.decoder.layers.0.linear1.weight")
    if ffn is not None:
        overrides["decoder_ffn_dim"] = int(ffn.shape[0])
    backbone_keys = [k for k in state if k.startswith("backbone.")]
    if backbone_keys:
        overrides["use_lab"] = any(".lab." in k for k in backbone_keys)
        if any(k.endswith("running_mean") for k in backbone_keys):
            overrides["freeze_norm"] = not any(k.endswith("num_batches_tracked") for k in backbone_keys)
    return overrides
