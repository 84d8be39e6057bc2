import pytest
import torch
from torch import nn

from cnnbench.models import Ensemble, count_parameters, create_model, model_flops


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)                  # 4x8x8 outputs, 3*3*3 MACs each
        self.depthwise = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)  # 4x4x4 outputs, 9 MACs each
        self.fc = nn.Linear(4 * 4 * 4, 5)                          # 64 x 5 MACs

    def forward(self, x):
        return self.fc(torch.flatten(self.depthwise(self.conv(x)), 1))


def test_flops_of_a_tiny_net_by_hand():
    macs = 4 * 8 * 8 * 27 + 4 * 4 * 4 * 9 + 64 * 5
    assert model_flops(_Tiny(), 8) == 2 * macs
    assert model_flops(_Tiny(), (8, 8)) == 2 * macs


def test_parameters_by_hand():
    expected = (4 * 27 + 4) + (4 * 9 + 4) + (64 * 5 + 5)
    assert count_parameters(_Tiny()) == expected
    model = _Tiny()
    model.conv.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == expected - (4 * 27 + 4)


def test_resnet18_flops_match_the_published_figure():
    # torchvision and timm publish 1.82 GMACs for resnet18 at 224 px (1000 classes).
    flops = model_flops(create_model("resnet18", 1000), 224)
    assert flops / 2 == pytest.approx(1.82e9, rel=0.01)


def test_flops_leave_the_model_as_it_was():
    model = _Tiny().train()
    before = len(model.conv._forward_hooks)
    model_flops(model, 8)
    assert model.training and len(model.conv._forward_hooks) == before


def test_ensemble_flops_are_the_sum_of_its_members():
    a, b = create_model("resnet18", 3, width_mult=0.125), create_model("xception_small", 3, width_mult=0.125)
    assert model_flops(Ensemble([a, b]), 64) == model_flops(a, 64) + model_flops(b, 64)
