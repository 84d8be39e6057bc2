"""Exponential moving average of a model's weights (and BatchNorm statistics).

The average is what gets validated and saved: it smooths the last, noisy steps of a short run.
The decay warms up as min(decay, (1 + t) / (10 + t)) so that after few steps the average is not
dominated by the random initialisation.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from cnnbench.common.errors import InputError


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise InputError(f"EMA decay must be between 0 and 1 (exclusive), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        current = model.state_dict()
        for name, average in self.model.state_dict().items():
            value = current[name].detach()
            if average.is_floating_point():
                average.lerp_(value, 1.0 - decay)
            else:  # counters such as BatchNorm's num_batches_tracked
                average.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.model.load_state_dict(state["weights"])
