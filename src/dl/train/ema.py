"""Exponential moving average of a model's weights (what best.pt keeps and what validation runs).

Same schedule as the official D-FINE ModelEMA: the decay ramps up as decay * (1 - exp(-updates / warmups)),
so the first updates follow the freshly fine-tuned weights closely instead of an average dominated by the
initial (often random-headed) model.
"""

from __future__ import annotations

import math
from copy import deepcopy

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel (or DataParallel) wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


class ModelEMA:
    """A frozen eval-mode copy of the model whose floating-point state follows the trained weights."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 1000) -> None:
        self.module = deepcopy(unwrap_model(model)).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = float(decay)
        self.warmups = int(warmups)
        self.updates = 0

    def current_decay(self) -> float:
        if self.warmups <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.updates / self.warmups))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        live_state = unwrap_model(model).state_dict()
        for key, ema_value in self.module.state_dict().items():
            # Integer buffers (BatchNorm's num_batches_tracked) are copied, not averaged.
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(decay).add_(live_state[key].detach().to(ema_value.dtype), alpha=1.0 - decay)
            else:
                ema_value.copy_(live_state[key])

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state.get("updates", 0))
