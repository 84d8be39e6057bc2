import pytest
import torch

from cnnbench.data.spec import HALF, IMAGENET_MEAN, IMAGENET_STD
from cnnbench.models import create_model, default_spec, list_models

ALL = ["resnet18", "resnet26", "xception_medium", "xception_pretrained", "xception_small"]
SCALABLE = ["resnet18", "resnet26", "xception_small", "xception_medium"]


def test_list_models_names_every_architecture():
    assert list_models() == ALL


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        create_model("resnet50", 10)
    assert "resnet50" in str(err.value)
    for name in ALL:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="known models"):
        default_spec("vgg16")


def test_unknown_kwarg_is_a_clear_error():
    with pytest.raises(ValueError, match="does not take width_mult; it takes: weights, dropout"):
        create_model("xception_pretrained", 10, width_mult=0.5)
    with pytest.raises(ValueError, match="does not take depth"):
        create_model("resnet18", 10, depth=3)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_classes_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", bad, width_mult=0.125)


def test_default_specs():
    for name in SCALABLE:
        spec = default_spec(name)
        assert (spec.resize, spec.crop, spec.mean, spec.std, spec.interpolation) == (
            256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    spec = default_spec("xception_pretrained")
    assert (spec.resize, spec.crop, spec.mean, spec.std, spec.interpolation) == (342, 299, HALF, HALF, "bicubic")


@pytest.mark.parametrize("name", SCALABLE)
def test_every_model_has_the_interface(name):
    torch.manual_seed(0)
    model = create_model(name, 7, width_mult=0.125, dropout=0.1).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.dim() == 4 and features.shape[:2] == (2, model.classifier.in_features)
    logits = model(x)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(model.forward_head(features), logits)
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.out_features == 7
    assert model.arch == name and model.model_kwargs == {"width_mult": 0.125, "dropout": 0.1}


def test_width_mult_shrinks_the_model():
    full = sum(p.numel() for p in create_model("xception_small", 10).parameters())
    tiny = sum(p.numel() for p in create_model("xception_small", 10, width_mult=0.25).parameters())
    assert tiny < full / 8


def test_weights_path_is_not_recorded_as_an_architecture_kwarg():
    model = create_model("xception_pretrained", 3, weights=None, dropout=0.2)
    assert model.model_kwargs == {"dropout": 0.2}
