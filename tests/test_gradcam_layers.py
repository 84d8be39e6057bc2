"""Layer names that mean the same thing for every architecture, resolved per model and per ensemble member."""
import pytest
import torch

from cnnbench.common.errors import InputError
from cnnbench.gradcam.core import GradCAM
from cnnbench.gradcam.layers import map_sides, resolve_layer, stage_paths
from cnnbench.models.ensemble import Ensemble
from cnnbench.models.registry import create_model


def tiny(arch):
    return create_model(arch, num_classes=3, width_mult=0.125).eval()


@pytest.mark.parametrize("arch, before_last, two_before", [("resnet18", "layer3", "layer2"), ("resnet26", "layer3", "layer2"),
                                                           ("xception_small", "block8", "block2"),
                                                           ("xception_medium", "block8", "block2")])
def test_relative_names_are_the_stages(arch, before_last, two_before):
    model = tiny(arch)
    assert resolve_layer(model, "last").paths == (None,)
    assert resolve_layer(model, "last-1").paths == (before_last,)
    assert resolve_layer(model, "last-2").paths == (two_before,)
    assert stage_paths(model)[-1] in ("layer4", "act_exit")  # the map entering pooling closes the list
    # One step back doubles the map's side (96 px crops: 3x3 -> 6x6 -> 12x12).
    assert [map_sides(model, resolve_layer(model, n), 96) for n in ("last", "last-1", "last-2")] == [[3], [6], [12]]
    assert resolve_layer(model, before_last).paths == (before_last,)  # the module path itself


def test_module_paths_and_nested_modules_resolve():
    model = tiny("resnet26")
    assert resolve_layer(model, "layer3.1").paths == ("layer3.1",)
    result = GradCAM(model, "layer3.1")(torch.randn(1, 3, 64, 64))
    assert result.map.shape == (1, 4, 4)


def test_an_ensemble_resolves_each_members_own_layer():
    ensemble = Ensemble([tiny("resnet18"), tiny("xception_small")])
    layer = resolve_layer(ensemble, "last-1")
    assert layer.paths == ("layer3", "block8")
    assert layer.describe() == "last-1 (layer3 | block8)"
    with pytest.raises(InputError, match=r"unknown layer 'layer3' for ensemble member 1 \(Xception\)"):
        resolve_layer(ensemble, "layer3")


def test_bad_names_list_the_valid_ones():
    model = tiny("resnet18")
    with pytest.raises(InputError) as caught:
        resolve_layer(model, "layer9")
    message = str(caught.value)
    assert "unknown layer 'layer9' for ResNet" in message
    assert "last, last-1 (layer3), last-2 (layer2)" in message
    assert "layer4" in message and "e.g. layer3.0" in message
    with pytest.raises(InputError, match="has only 5 stages"):
        resolve_layer(model, "last-5")
    with pytest.raises(InputError, match="unknown layer 'last-0'"):
        resolve_layer(model, "last-0")


def test_layers_without_one_map_per_pass_are_refused():
    model = tiny("resnet26")
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(InputError, match="ran 3 times in one forward pass"):  # a Bottleneck's ReLU
        GradCAM(model, "layer3.1.relu")(x)
    with pytest.raises(InputError, match="not a \\[B, C, h, w\\] map"):
        GradCAM(model, "fc")(x)
