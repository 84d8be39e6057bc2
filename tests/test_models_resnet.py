import pytest
import timm
import torch
import torchvision

from cnnbench.models import count_parameters, create_model


def test_resnet26_parameter_count_equals_timm_exactly():
    ours = count_parameters(create_model("resnet26", 256))
    assert ours == count_parameters(timm.create_model("resnet26", pretrained=False, num_classes=256))
    assert ours == 14_470_720


def test_resnet18_parameter_count_equals_torchvision():
    ours = count_parameters(create_model("resnet18", 256))
    assert ours == count_parameters(torchvision.models.resnet18(weights=None, num_classes=256))


def _reference(name):
    if name == "resnet18":
        return torchvision.models.resnet18(weights=None, num_classes=10)
    if name == "resnet26_torchvision":
        return torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [2, 2, 2, 2], num_classes=10)
    return timm.create_model("resnet26", pretrained=False, num_classes=10)


def _layer4_output(ref, x):
    stem_act = ref.act1 if hasattr(ref, "act1") else ref.relu  # timm names it act1, torchvision relu
    x = ref.maxpool(stem_act(ref.bn1(ref.conv1(x))))
    return ref.layer4(ref.layer3(ref.layer2(ref.layer1(x))))


@pytest.mark.parametrize("name,reference", [
    ("resnet18", "resnet18"), ("resnet26", "resnet26_torchvision"), ("resnet26", "resnet26_timm"),
])
def test_reference_weights_load_unchanged_and_give_the_same_outputs(name, reference):
    torch.manual_seed(0)
    ref = _reference(reference)
    # Non-trivial BatchNorm statistics so a mis-wired norm layer would show.
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    ref.eval()
    ours = create_model(name, 10).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), _layer4_output(ref, x), rtol=1e-4, atol=1e-5)
    assert ours.classifier is ours.fc


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    model = create_model("resnet18", 5, dropout=0.5, width_mult=0.25)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    features = model.forward_features(x).detach()
    assert not torch.equal(model.forward_head(features), model.forward_head(features))
    model.eval()
    torch.testing.assert_close(model.forward_head(features), model.forward_head(features))


def test_width_mult_scales_every_stage():
    model = create_model("resnet26", 3, width_mult=0.25)
    assert model.conv1.out_channels == 16
    assert model.layer4[0].conv3.out_channels == 512  # 128 planes x expansion 4
    assert model.classifier.in_features == 512
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
