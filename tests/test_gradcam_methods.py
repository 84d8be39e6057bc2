"""The CAM family against pytorch-grad-cam (same model, layer and target class), by hand where it is
exact, and the ten-crop paste-back of a non-default method."""
import pytest
import torch
from pytorch_grad_cam import EigenCAM as PackageEigenCAM
from pytorch_grad_cam import GradCAM as PackageGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as PackageGradCAMPlusPlus
from pytorch_grad_cam import HiResCAM as PackageHiResCAM
from pytorch_grad_cam import LayerCAM as PackageLayerCAM
from pytorch_grad_cam import XGradCAM as PackageXGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cnnbench.common.errors import InputError
from cnnbench.data.crops import TEN
from cnnbench.data.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from cnnbench.gradcam.core import (FALLBACK_CAM, METHODS, ClassifierCAM, EigenCAM, GradCAM, HiResCAM,
                                   LayerCAM, default_cam, default_layer, default_method, method_class, upsample)
from cnnbench.gradcam.exported import pearson
from cnnbench.gradcam.tencrop import image_cam, image_cams, layer_method_cams, method_cams, paste_back
from cnnbench.models.ensemble import Ensemble
from cnnbench.models.registry import create_model

PACKAGE = {"gradcam": PackageGradCAM, "hirescam": PackageHiResCAM, "gradcam++": PackageGradCAMPlusPlus,
           "xgradcam": PackageXGradCAM, "layercam": PackageLayerCAM, "eigencam": PackageEigenCAM}
SIZE = 64


def tiny(arch: str, seed: int = 0) -> nn.Module:
    """A tiny model with random BatchNorm statistics (a fresh one's zero-initialised residual branches
    would make every stage a copy of its shortcut)."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=5, width_mult=0.125)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def package_maps(model: nn.Module, module: nn.Module, name: str, x, targets) -> torch.Tensor:
    with PACKAGE[name](model=model, target_layers=[module]) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return torch.from_numpy(out)


@pytest.mark.parametrize("arch, layer, module_path", [("resnet18", "last", "layer4"), ("resnet18", "last-1", "layer3"),
                                                      ("xception_small", "last", "act_exit"),
                                                      ("xception_small", "last-1", "block8")])
@pytest.mark.parametrize("name", list(PACKAGE))
def test_each_method_matches_pytorch_grad_cam(arch, layer, module_path, name):
    model = tiny(arch)
    torch.manual_seed(1)
    x = torch.randn(3, 3, SIZE, SIZE)
    targets = torch.tensor([0, 3, 1])  # not the predictions: a different class per image
    ours = method_class(name)(model, layer)(x, targets)
    assert ours.map.shape[-1] < SIZE  # weighed at the layer's resolution, upsampled like the package's
    expected = package_maps(model, model.get_submodule(module_path), name, x, targets)
    for got, want in zip(upsample(ours.map, SIZE), expected):
        assert pearson(got, want) >= 0.999


def test_hirescam_equals_gradcam_at_the_last_layer_by_hand():
    # A global-average-pool + linear head has the spatially constant gradient W[c] / (h*w), so the
    # pixel-wise sum of gradient x activation is the channel-weighted sum with the mean gradient.
    model = tiny("resnet18")
    x = torch.randn(2, 3, SIZE, SIZE)
    targets = torch.tensor([2, 4])
    grad = GradCAM(model)(x, targets)
    hires = HiResCAM(model)(x, targets)
    cam = ClassifierCAM(model)(x, targets)
    side = grad.map.shape[-1]
    torch.testing.assert_close(hires.map, grad.map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.map * side * side, cam.map, rtol=1e-5, atol=1e-5)


def test_layercam_by_hand_drops_negative_gradients():
    class TwoChannels(nn.Module):
        """features = the input's two channels; logit = 1 * mean(A0) - 1 * mean(A1)."""

        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(2, 1, bias=False)
            with torch.no_grad():
                self.classifier.weight.copy_(torch.tensor([[1.0, -1.0]]))

        def forward_features(self, x):
            return x

        def forward_head(self, features):
            return self.classifier(features.mean(dim=(2, 3)))

    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, 8.0]]]])
    # G = (1/4, -1/4) everywhere: LayerCAM keeps A0 / 4, HiResCAM A0/4 - A1/4 (ReLU'd).
    torch.testing.assert_close(LayerCAM(TwoChannels())(x, torch.tensor([0])).map, x[:, 0] / 4)
    torch.testing.assert_close(HiResCAM(TwoChannels())(x, torch.tensor([0])).map,
                               torch.relu(x[:, 0] - x[:, 1]) / 4)


def test_eigencam_is_class_free_and_scaled_to_one():
    model = tiny("resnet18")
    x = torch.randn(2, 3, SIZE, SIZE)
    a = EigenCAM(model, "last-1")(x, torch.tensor([0, 0]))
    b = EigenCAM(model, "last-1")(x, torch.tensor([4, 2]))
    torch.testing.assert_close(a.map, b.map)
    assert torch.allclose(a.map.flatten(1).amax(dim=1), torch.ones(2))


def test_methods_share_one_pass_and_match_their_single_runs():
    model = tiny("resnet26")
    spec = PreprocessSpec(resize=72, crop=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    images = torch.randint(0, 256, (2, 3, 72, 72), dtype=torch.uint8)
    labels = torch.tensor([1, 3])
    together = method_cams(model, images, spec, 1, [None, labels], list(METHODS), "last-1")
    for name, per_target in zip(METHODS, together):
        alone = image_cams(model, images, spec, 1, [None, labels], name, "last-1")
        for a, b in zip(per_target, alone):
            torch.testing.assert_close(a.maps, b.maps)
            assert torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("arch", ["resnet26", "ensemble"])
def test_layers_share_one_forward_pass_and_match_their_single_runs(arch):
    """last-1 is the leaf, last is kept inside the graph that runs from it: each layer's maps (and the
    logits) are those of a pass for that layer alone, for every method."""
    model = tiny("resnet26") if arch == "resnet26" else Ensemble([tiny("resnet18"), tiny("xception_small", seed=1)])
    spec = PreprocessSpec(resize=72, crop=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    images = torch.randint(0, 256, (2, 3, 72, 72), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 3])
    together = layer_method_cams(model, images, spec, 10, [None, labels], list(METHODS), ["last", "last-1"])
    for layer, per_layer in zip(["last", "last-1"], together):
        for per_target, alone in zip(per_layer, method_cams(model, images, spec, 10, [None, labels], list(METHODS),
                                                            layer)):
            for a, b in zip(per_target, alone):
                torch.testing.assert_close(a.maps, b.maps)
                torch.testing.assert_close(a.logits, b.logits)
                assert torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("name", ["gradcam++", "layercam"])
def test_ten_crop_map_is_the_paste_back_of_the_crop_maps(name):
    model = tiny("resnet18")
    spec = PreprocessSpec(resize=72, crop=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    images = torch.randint(0, 256, (2, 3, 72, 72), dtype=torch.uint8)
    labels = torch.tensor([4, 0])
    got = image_cam(model, images, spec, crops=10, targets=labels, method=name, layer="last-1")
    crops = TEN.cut(images, spec)  # [B, 10, 3, c, c], the crop mode's boxes and mirroring
    per_crop = method_class(name)(model, "last-1")(crops.flatten(0, 1), labels.repeat_interleave(10))
    expected = paste_back(per_crop.at_size(SIZE).reshape(2, 10, SIZE, SIZE), TEN.boxes(spec), 72)
    torch.testing.assert_close(got.maps, expected)
    assert torch.equal(got.targets, labels)


def test_an_ensemble_map_is_the_sum_of_its_members_maps_at_each_members_layer():
    resnet, xception = tiny("resnet18"), tiny("xception_small", seed=1)
    ensemble = Ensemble([resnet, xception]).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    targets = torch.tensor([1, 2])
    both = method_class("gradcam++")(ensemble, "last-1")(x, targets)
    assert [m.shape[-1] for m in both.maps] == [4, 4]  # layer3 of the ResNet, block8 of the Xception
    alone = [method_class("gradcam++")(m, "last-1")(x, targets).maps[0] for m in (resnet, xception)]
    for got, want in zip(both.maps, alone):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(both.logits, resnet(x) + xception(x))


def test_dense_maps_refuse_earlier_layers():
    model = tiny("resnet18")
    spec = PreprocessSpec(resize=96, crop=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # a whole stride (32) apart
    images = torch.randint(0, 256, (1, 3, 96, 96), dtype=torch.uint8)
    assert image_cam(model, images, spec, crops="dense", method="layercam").maps.shape == (1, 96, 96)
    # No layer named: dense mode falls back to 'last', every other mode takes the architecture's layer.
    assert [default_layer(model, crops) for crops in ("dense", 10, 1)] == ["last", "last-2", "last-2"]
    torch.testing.assert_close(image_cam(model, images, spec, crops="dense").maps,
                               image_cam(model, images, spec, crops="dense", layer="last").maps)
    with pytest.raises(InputError, match="dense maps exist at layer 'last' only"):
        image_cam(model, images, spec, crops="dense", layer="last-1")


def test_the_default_cam_follows_the_architecture_and_an_image_cam_without_one_uses_it():
    resnet, xception = tiny("resnet18"), tiny("xception_small", seed=1)
    # docs/GRADCAM.md's tables: XGrad-CAM at last-2 points best on the ResNets, Grad-CAM at last-1 on the Xceptions
    assert (default_cam(resnet), default_cam(xception)) == (("xgradcam", "last-2"), ("gradcam", "last-1"))
    assert (default_method(resnet), default_layer(xception, 10)) == ("xgradcam", "last-1")
    assert default_cam(Ensemble([resnet, tiny("resnet18", seed=2)])) == ("xgradcam", "last-2")
    assert default_cam(Ensemble([resnet, xception])) == FALLBACK_CAM  # one method at one name for the summed map
    assert default_cam(nn.Sequential()) == FALLBACK_CAM == ("gradcam", "last-1")  # no measured default
    spec = PreprocessSpec(resize=SIZE + 8, crop=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    images = torch.randint(0, 256, (2, 3, SIZE + 8, SIZE + 8), dtype=torch.uint8)
    for model in (resnet, xception):
        method, layer = default_cam(model)
        torch.testing.assert_close(image_cam(model, images, spec, crops=1).maps,
                                   image_cam(model, images, spec, crops=1, method=method, layer=layer).maps)
    assert not torch.equal(image_cam(resnet, images, spec, crops=1).maps,
                           image_cam(resnet, images, spec, crops=1, method="xgradcam", layer="last-1").maps)
    assert not torch.equal(image_cam(xception, images, spec, crops=1).maps,
                           image_cam(xception, images, spec, crops=1, method="hirescam").maps)


def test_unknown_method_names_the_choices():
    with pytest.raises(InputError, match="gradcam, hirescam, gradcam\\+\\+, xgradcam, layercam, eigencam"):
        method_class("scorecam")
