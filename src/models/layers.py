"""Small building blocks every family shares: activations, the MLP head, logit helpers, conv + norm.

Parameter names follow the reference implementations so their checkpoints load directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def activation_layer(name: str | None) -> nn.Module:
    """'relu' | 'silu' | 'gelu' | None -> module."""
    layers = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU}
    if name is None:
        return nn.Identity()
    if name.lower() not in layers:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(layers)}")
    return layers[name.lower()]()


def prior_bias(prob: float = 0.01) -> float:
    """Bias giving sigmoid(bias) = prob (focal-loss style initialisation of class heads)."""
    return -math.log((1 - prob) / prob)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clipped to [0, 1] and both numerator and denominator kept >= eps."""
    x = x.clip(min=0.0, max=1.0)
    return torch.log(x.clip(min=eps) / (1 - x).clip(min=eps))


class MLP(nn.Module):
    """num_layers linear layers with `act` between them (box and query heads)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, act: str = "relu"):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = activation_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


def fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
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
        kernel, bias = fold_batch_norm(conv, self.norm)
        fused.weight.data, fused.bias.data = kernel.detach(), bias.detach()
        self.conv_bn_fused = fused
        del self.conv, self.norm


def fold_for_deploy(model: nn.Module) -> nn.Module:
    """Eval mode, then every sub-module's `convert_to_deploy()` (BN / RepVGG folding, dropping what eval
    does not run): the outputs do not change. Returns the model."""
    model.eval()
    for module in model.modules():
        if hasattr(module, "convert_to_deploy"):
            module.convert_to_deploy()
    return model
