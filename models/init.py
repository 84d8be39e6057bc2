"""Weight initialisation shared by the from-scratch residual networks (ResNet, Xception)."""
from __future__ import annotations

from typing import Iterable

from torch import nn


def init_residual_network(model: nn.Module, last_branch_norms: Iterable[nn.BatchNorm2d]) -> None:
    """He init for convolutions, BatchNorm as the identity (Linear keeps its default), and each residual
    branch's last BatchNorm at zero (timm's zero_init_last), so every block starts as its shortcut.
    Without the zeros, from-scratch training diverged here (ResNet26: loss 2.8 -> 35 in ten SGD steps at
    lr 0.025; Xception: 2.9 -> 10.6); with them the same steps stayed near 3."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for norm in last_branch_norms:
        nn.init.zeros_(norm.weight)
