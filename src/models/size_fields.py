"""The size-table fields that D-FINE and RT-DETRv2 share: what their common hybrid encoder
(`HybridEncoder.from_size`) and query-selection decoders (`decoder_size_kwargs`) are built from. Each family's
size dataclass adds its backbone and decoder specifics."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True, kw_only=True)
class HybridDetectorSize:
    # backbone: stages whose maps feed the encoder, and freezing
    return_idx: tuple[int, ...] = (1, 2, 3)
    freeze_at: int
    freeze_norm: bool
    # hybrid encoder
    encoder_in_channels: tuple[int, ...]
    feat_strides: tuple[int, ...] = (8, 16, 32)
    hidden_dim: int
    use_encoder_idx: tuple[int, ...] = (2,)
    encoder_ffn_dim: int
    expansion: float
    depth_mult: float = 1.0
    nhead: int = 8
    # decoder
    decoder_feat_channels: tuple[int, ...]
    decoder_hidden_dim: int = 256
    num_layers: int
    num_points: tuple[int, ...]
    decoder_ffn_dim: int = 1024
    eval_idx: int = -1
    activation: str = "relu"  # decoder FFN (DEIM: SiLU)
    mlp_act: str = "relu"  # box, encoder-box and query-position MLPs (DEIM: SiLU)

    def with_overrides(self, overrides: dict | None):
        """A copy with `overrides` (field -> value, e.g. read from a checkpoint); ValueError naming any
        field this size table does not have."""
        if not overrides:
            return self
        allowed = {f.name for f in fields(self)}
        unknown = set(overrides) - allowed
        if unknown:
            raise ValueError(f"Unknown architecture override(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return replace(self, **overrides)
