"""What the backbones share: frozen BatchNorm, freezing, and returning the maps of chosen stages."""

from __future__ import annotations

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (all buffers, nothing trains).

    Same state-dict keys as nn.BatchNorm2d minus `num_batches_tracked` (dropped when loading a checkpoint
    saved with ordinary BatchNorm).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norms(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d inside `module` (or `module` itself) by a FrozenBatchNorm2d.

    The new layers start at identity statistics; load weights afterwards.
    """
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d(module.num_features, module.eps)
    for name, child in module.named_children():
        frozen = freeze_batch_norms(child)
        if frozen is not child:
            setattr(module, name, frozen)
    return module


class StagedBackbone(nn.Module):
    """A backbone whose `stage_outputs(x)` gives every stage's map; forward returns those in return_idx."""

    return_idx: tuple[int, ...]

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = self.stage_outputs(x)
        return [stages[i] for i in self.return_idx]

    def _freeze(self, parts: list[nn.Module], freeze_norm: bool) -> None:
        """No gradient for `parts`; freeze_norm: every BatchNorm becomes a FrozenBatchNorm2d."""
        for part in parts:
            part.requires_grad_(False)
        if freeze_norm:
            freeze_batch_norms(self)
