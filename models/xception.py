"""Xception (Chollet 2017) built from depthwise-separable convolution blocks.

One configurable network serves three registry entries. Module names follow timm's
``legacy_xception`` (conv1/bn1, conv2/bn2, block1..blockN with ``rep``/``skip``/``skipbn``,
conv3/bn3, conv4/bn4, fc), so at the full ImageNet configuration a state_dict published by timm
loads unchanged.

Layout: a valid-padding stem (3x3/2 conv, 3x3 conv), an entry flow of stride-2 blocks (two
ReLU-SepConv-BN each, max-pool, 1x1/2 conv shortcut), a middle flow of residual blocks of three
ReLU-SepConv-BN at constant width, one stride-2 exit block (its first separable conv keeps the
width, the second grows it), optional further SepConv-BN-ReLU layers, global average pool,
dropout, linear.

Configurations (parameter counts at 256 classes, 224 px input gives a 7x7 final map):

=================  ==========  ==============  ===============  ===========  ==========  ==========
name               stem        entry blocks    middle flow      exit block   exit convs  params
=================  ==========  ==============  ===============  ===========  ==========  ==========
xception_small     32, 64      128, 256, 256   5 x 256          256 -> 512   none        1,885,024
xception_medium    32, 64      128, 256, 512   5 x 512          512 -> 728   none        5,949,120
legacy (ImageNet)  32, 64      128, 256, 728   8 x 728          728 -> 1024  1536, 2048  (timm's)
=================  ==========  ==============  ===============  ===========  ==========  ==========

xception_small is the seed report's "5 middle flows of 256 channels instead of 8 of 728" with the
exit flow cut to its first block; xception_medium is the same with a 512-channel middle flow and
its exit block widened to 728 (the original's middle width) to land on the seed's 5.9M. When there
are no exit convs a ReLU follows the exit block, so the map entering global pooling is rectified
as in the full network.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from torch import Tensor, nn

from cnnbench.common.errors import InputError
from cnnbench.models.init import init_residual_network
from cnnbench.models.registry import register_model
from cnnbench.models.resnet import scaled
from cnnbench.models.weights import read_state_dict, state_dict_mismatch


@dataclass(frozen=True)
class XceptionConfig:
    stem: tuple[int, int]            # output channels of conv1 and conv2
    entry: tuple[int, ...]           # output channels of each stride-2 entry block
    middle_blocks: int               # residual blocks at width entry[-1]
    exit_width: int                  # output channels of the stride-2 exit block
    exit_convs: tuple[int, ...] = ()  # SepConv-BN-ReLU layers after the exit block (named conv3, conv4, ...)

    def scaled(self, width_mult: float) -> "XceptionConfig":
        def s(channels: int) -> int:
            return scaled(channels, width_mult)

        return XceptionConfig(
            stem=(s(self.stem[0]), s(self.stem[1])),
            entry=tuple(s(c) for c in self.entry),
            middle_blocks=self.middle_blocks,
            exit_width=s(self.exit_width),
            exit_convs=tuple(s(c) for c in self.exit_convs),
        )


SMALL = XceptionConfig(stem=(32, 64), entry=(128, 256, 256), middle_blocks=5, exit_width=512)
MEDIUM = XceptionConfig(stem=(32, 64), entry=(128, 256, 512), middle_blocks=5, exit_width=728)
LEGACY_IMAGENET = XceptionConfig(
    stem=(32, 64), entry=(128, 256, 728), middle_blocks=8, exit_width=1024, exit_convs=(1536, 2048)
)


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 followed by pointwise 1x1, no bias (a BatchNorm follows)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.conv1(x))


class Block(nn.Module):
    """Residual unit: ``reps`` x (ReLU, SepConv, BN), max-pool when strided, projected shortcut when needed.

    ``grow_first`` widens on the first separable conv (entry/middle) or the last one (exit).
    """

    def __init__(self, in_ch: int, out_ch: int, reps: int, stride: int, start_with_relu: bool = True,
                 grow_first: bool = True):
        super().__init__()
        if in_ch != out_ch or stride != 1:
            self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_ch)
        else:
            self.skip = None
            self.skipbn = None
        layers: list[nn.Module] = []
        for i in range(reps):
            if grow_first:
                conv_in, conv_out = (in_ch if i == 0 else out_ch), out_ch
            else:
                conv_in, conv_out = in_ch, (in_ch if i < reps - 1 else out_ch)
            # Not in-place: the first ReLU would otherwise overwrite the shortcut's input.
            layers += [nn.ReLU(), SeparableConv2d(conv_in, conv_out), nn.BatchNorm2d(conv_out)]
        if not start_with_relu:
            layers = layers[1:]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, padding=1))
        self.rep = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.skip is None else self.skipbn(self.skip(x))
        return self.rep(x) + shortcut


class Xception(nn.Module):
    """Xception with the project's model interface (forward_features / forward_head / classifier)."""

    def __init__(self, config: XceptionConfig, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.config = config
        c1, c2 = config.stem
        self.conv1 = nn.Conv2d(3, c1, 3, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.act2 = nn.ReLU()
        self._flow: list[str] = []  # attribute names run in order after the stem
        in_ch = c2
        for i, out_ch in enumerate(config.entry):
            self._add(Block(in_ch, out_ch, reps=2, stride=2, start_with_relu=i > 0))
            in_ch = out_ch
        for _ in range(config.middle_blocks):
            self._add(Block(in_ch, in_ch, reps=3, stride=1))
        self._add(Block(in_ch, config.exit_width, reps=2, stride=2, grow_first=False))
        in_ch = config.exit_width
        for index, out_ch in enumerate(config.exit_convs, start=3):
            for prefix, module in (("conv", SeparableConv2d(in_ch, out_ch)), ("bn", nn.BatchNorm2d(out_ch)),
                                   ("act", nn.ReLU())):
                setattr(self, f"{prefix}{index}", module)
                self._flow.append(f"{prefix}{index}")
            in_ch = out_ch
        if not config.exit_convs:
            self.act_exit = nn.ReLU()
            self._flow.append("act_exit")
        self.num_features = in_ch
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_ch, num_classes)
        self.frozen_backbone = False
        self._init_weights()

    def _add(self, block: Block) -> None:
        name = f"block{sum(n.startswith('block') for n in self._flow) + 1}"
        setattr(self, name, block)
        self._flow.append(name)

    def _init_weights(self) -> None:
        init_residual_network(self, [[m for m in block.rep if isinstance(m, nn.BatchNorm2d)][-1]
                                     for block in self.modules() if isinstance(block, Block)])

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def freeze_backbone(self) -> None:
        """Train only the classifier: other parameters stop needing gradients, BatchNorms stay in eval."""
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith("fc.")
        self.frozen_backbone = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "Xception":
        super().train(mode)
        if self.frozen_backbone:
            # A frozen backbone must keep its ImageNet BatchNorm statistics, not re-estimate them.
            for name, module in self.named_children():
                if name not in ("dropout", "fc"):
                    module.eval()
        return self

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        for name in self._flow:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, features: Tensor) -> Tensor:
        pooled = features.mean(dim=(2, 3))
        return self.fc(self.dropout(pooled))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model()
def xception_small(num_classes: int, dropout: float = 0.0, width_mult: float = 1.0) -> Xception:
    return Xception(SMALL.scaled(width_mult), num_classes, dropout=dropout)


@register_model()
def xception_medium(num_classes: int, dropout: float = 0.0, width_mult: float = 1.0) -> Xception:
    return Xception(MEDIUM.scaled(width_mult), num_classes, dropout=dropout)


# timm's legacy_xception preprocessing: 299 px, mean = std = 0.5, bicubic (resized by the 256/224 rule).
@register_model(crop=299, norm="half", interpolation="bicubic")
def xception_pretrained(num_classes: int, weights: str | os.PathLike | None = None, dropout: float = 0.0) -> Xception:
    """ImageNet Xception (timm ``legacy_xception`` layout) with a fresh ``num_classes`` head, backbone frozen.

    ``weights`` is a local state_dict file as timm publishes it (``.safetensors`` or a torch
    ``.pth``/``.pt``/``.bin``); its 1000-way ``fc`` is discarded. ``weights=None`` builds the
    architecture only, for loading a checkpoint of this model over it. Nothing is downloaded.
    """
    model = Xception(LEGACY_IMAGENET, num_classes, dropout=dropout)
    if weights is not None:
        load_backbone_weights(model, weights)
    model.freeze_backbone()
    return model


def load_backbone_weights(model: Xception, path: str | os.PathLike) -> None:
    """Load every tensor except the classifier from a state_dict file; any mismatch is an error."""
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    mismatch = state_dict_mismatch(expected, state)
    if mismatch:
        raise InputError(f"{os.fspath(path)}: not an ImageNet Xception (timm legacy_xception) state_dict: {mismatch}")
    model.load_state_dict(state, strict=False)
