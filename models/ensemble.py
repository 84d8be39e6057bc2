"""Logit-sum ensemble of classifiers that share a label set (members may be different architectures)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Ensemble(nn.Module):
    """forward(x) = sum of the members' logits; features are per member, as a list."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        sizes = [m.classifier.out_features for m in members]
        if len(set(sizes)) != 1:
            raise ValueError(f"ensemble members disagree on the number of classes: {sizes}")
        self.members = nn.ModuleList(members)

    @property
    def classifiers(self) -> list[nn.Linear]:
        return [m.classifier for m in self.members]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        return [m.forward_features(x) for m in self.members]

    def forward_head(self, features: list[Tensor]) -> Tensor:
        if len(features) != len(self.members):
            raise ValueError(f"expected {len(self.members)} feature maps (one per member), got {len(features)}")
        return torch.stack([m.forward_head(f) for m, f in zip(self.members, features)]).sum(dim=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
