"""The RT-DETRv2 size table (r18, r34, r50m, r50, r101) and what DEIM-RT-DETRv2 changes.

Numbers come from the official configs (Intellindust-AI-Lab/DEIM `configs/deim_rtdetrv2/rtdetrv2_*.yml`
on top of `configs/base/rtdetrv2_r50vd.yml`; DEIM: `deim_*.yml` + `configs/base/rt_deim.yml`), as the
parity fixtures in tests/fixtures/parity/rtdetrv2/ pin them down. r50m is DEIM's "R50-m": ResNet50-vd
with a half-width encoder (expansion 0.5) whose eval output is decoder layer 3.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from src.models.size_fields import HybridDetectorSize

ARCHS = ("rtdetrv2", "deim_rtdetrv2")


@dataclass(frozen=True, kw_only=True)
class RTDETRSize(HybridDetectorSize):
    # ResNet-vd backbone
    depth: int
    # decoder
    num_points: tuple[int, ...] = (4, 4, 4)
    cross_attn_method: str = "default"  # "discrete": nearest-cell sampling instead of bilinear
    query_pos_method: str = "default"  # "as_reg": DEIM's 3-layer query-position MLP

    @property
    def num_levels(self) -> int:  # one decoder level per encoder map (no extra stride-2 levels)
        return len(self.feat_strides)


_SMALL_ENCODER = dict(
    encoder_in_channels=(128, 256, 512), hidden_dim=256, encoder_ffn_dim=1024, expansion=0.5
)
_TRAINABLE_NORMS = dict(freeze_at=-1, freeze_norm=False)
_FROZEN_NORMS = dict(freeze_at=0, freeze_norm=True)
_BIG_ENCODER = dict(encoder_in_channels=(512, 1024, 2048), hidden_dim=256, encoder_ffn_dim=1024)

SIZES: dict[str, RTDETRSize] = {
    "r18": RTDETRSize(
        depth=18, **_TRAINABLE_NORMS, **_SMALL_ENCODER, decoder_feat_channels=(256,) * 3, num_layers=3
    ),
    "r34": RTDETRSize(
        depth=34, **_TRAINABLE_NORMS, **_SMALL_ENCODER, decoder_feat_channels=(256,) * 3, num_layers=4
    ),
    "r50m": RTDETRSize(
        depth=50,
        **_FROZEN_NORMS,
        **_BIG_ENCODER,
        expansion=0.5,
        decoder_feat_channels=(256,) * 3,
        num_layers=6,
        eval_idx=2,
    ),
    "r50": RTDETRSize(
        depth=50,
        **_FROZEN_NORMS,
        **_BIG_ENCODER,
        expansion=1.0,
        decoder_feat_channels=(256,) * 3,
        num_layers=6,
    ),
    "r101": RTDETRSize(
        depth=101,
        **_FROZEN_NORMS,
        encoder_in_channels=(512, 1024, 2048),
        hidden_dim=384,
        encoder_ffn_dim=2048,
        expansion=1.0,
        decoder_feat_channels=(384,) * 3,
        num_layers=6,
    ),
}

# What DEIM-RT-DETRv2 (base/rt_deim.yml) changes: trainable backbone norms, SiLU decoder, as_reg queries.
_DEIM_CHANGES = dict(**_TRAINABLE_NORMS, activation="silu", mlp_act="silu", query_pos_method="as_reg")
# DEIM's R50-m trains 3 decoder layers (RT-DETRv2's trains 6 and evaluates the third).
_DEIM_SIZE_CHANGES = {"r50m": dict(num_layers=3)}



def get_size(arch: str, name: str, overrides: dict | None = None) -> RTDETRSize:
    """The architecture of size `name` of `arch` ('rtdetrv2' | 'deim_rtdetrv2'), with optional overrides."""
    if arch not in ARCHS:
        raise ValueError(f"Unknown RT-DETR arch {arch!r}; choose one of {list(ARCHS)}")
    if name not in SIZES:
        raise ValueError(f"Unknown RT-DETRv2 size {name!r}; choose one of {list(SIZES)}")
    size = SIZES[name]
    if arch == "deim_rtdetrv2":
        size = replace(size, **_DEIM_CHANGES, **_DEIM_SIZE_CHANGES.get(name, {}))
    return size.with_overrides(overrides)
