"""Small building blocks every family shares: activations, the MLP head, logit helpers.

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
