"""ResNet v1.5 (stride on the 3x3 conv of the bottleneck), torchvision's layout and parameter names.

Written here rather than taken from torchvision so that every channel count can be scaled by
``width_mult`` (tests build tiny models); at ``width_mult=1`` the module tree and state_dict keys
are exactly torchvision's, so a torchvision or timm ResNet state_dict loads unchanged (the tests
prove equal outputs).

- resnet18: BasicBlock, layers 2-2-2-2 (torchvision.models.resnet18).
- resnet26: Bottleneck, layers 2-2-2-2 (timm's resnet26: 14,470,720 parameters at 256 classes).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnbench.models.init import init_residual_network
from cnnbench.models.registry import register_model


def scaled(channels: int, width_mult: float) -> int:
    """Channel count after width scaling; never below one channel."""
    return max(1, int(round(channels * width_mult)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet with the project's model interface (forward_features / forward_head / classifier)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int,
        dropout: float = 0.0,
        width_mult: float = 1.0,
    ):
        super().__init__()
        stem = scaled(64, width_mult)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = stem
        stages = []
        for index, (base_planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            planes = scaled(base_planes, width_mult)
            stages.append(self._make_stage(block, in_ch, planes, depth, stride=1 if index == 0 else 2))
            in_ch = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        self._init_weights()

    @staticmethod
    def _make_stage(block, in_ch: int, planes: int, depth: int, stride: int) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
        blocks = [block(in_ch, planes, stride, downsample)]
        blocks += [block(out_ch, planes) for _ in range(depth - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        init_residual_network(self, [block.bn2 if isinstance(block, BasicBlock) else block.bn3
                                     for block in self.modules() if isinstance(block, (BasicBlock, Bottleneck))])

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, features: Tensor) -> Tensor:
        pooled = torch.flatten(self.avgpool(features), 1)
        return self.fc(self.dropout(pooled))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model()
def resnet18(num_classes: int, dropout: float = 0.0, width_mult: float = 1.0) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, dropout=dropout, width_mult=width_mult)


@register_model()
def resnet26(num_classes: int, dropout: float = 0.0, width_mult: float = 1.0) -> ResNet:
    return ResNet(Bottleneck, (2, 2, 2, 2), num_classes, dropout=dropout, width_mult=width_mult)
