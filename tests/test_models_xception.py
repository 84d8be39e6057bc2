import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from cnnbench.models import count_parameters, create_model


def _randomise_batchnorm(model):
    # Non-trivial statistics, so a layer wired to the wrong BatchNorm would change the output.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)


@pytest.fixture(scope="module")
def imagenet_xception(tmp_path_factory):
    """A randomly initialised timm legacy_xception and its state_dict saved as .pth and .safetensors."""
    torch.manual_seed(0)
    reference = timm.create_model("legacy_xception", pretrained=False, num_classes=1000)
    _randomise_batchnorm(reference)
    reference.eval()
    folder = tmp_path_factory.mktemp("xception-weights")
    state = reference.state_dict()
    torch.save(state, folder / "xception.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "xception.safetensors"))
    return reference, folder


@pytest.mark.parametrize("name,target", [("xception_small", 1.9e6), ("xception_medium", 5.9e6)])
def test_parameter_counts_match_the_seed(name, target):
    count = count_parameters(create_model(name, 256))
    assert abs(count - target) / target < 0.05, count


@pytest.mark.parametrize("name", ["xception_small", "xception_medium"])
def test_small_inputs_and_interface(name):
    torch.manual_seed(0)
    model = create_model(name, 11).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, model.classifier.in_features, 2, 2)
    assert (features >= 0).all()  # rectified map enters the pooling
    torch.testing.assert_close(model(x), model.classifier(features.mean(dim=(2, 3))))


def test_architecture_equals_timm_legacy_xception(imagenet_xception):
    reference, _ = imagenet_xception
    ours = create_model("xception_pretrained", 1000).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 71, 71)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), reference.forward_features(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("filename", ["xception.pth", "xception.safetensors"])
def test_pretrained_loads_local_weights_and_trains_only_the_classifier(imagenet_xception, filename):
    reference, folder = imagenet_xception
    torch.manual_seed(1)
    model = create_model("xception_pretrained", 5, weights=str(folder / filename))
    reference_state = reference.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            assert value.shape[0] == 5
        else:
            assert torch.equal(value, reference_state[key]), key
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert count_parameters(model, trainable_only=True) == 2048 * 5 + 5

    model.train()
    x = torch.randn(2, 3, 71, 71)
    logits = model(x)
    assert logits.shape == (2, 5)
    # The frozen backbone keeps ImageNet BatchNorm statistics even in training mode.
    assert torch.equal(model.bn1.running_mean, reference_state["bn1.running_mean"])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), rtol=1e-4, atol=1e-4)
    logits.sum().backward()
    assert model.fc.weight.grad is not None and model.conv1.weight.grad is None


def test_pretrained_weights_errors(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth: weights file not found"):
        create_model("xception_pretrained", 5, weights=str(missing))

    wrong = tmp_path / "resnet.pth"
    torch.save(create_model("resnet18", 1000, width_mult=0.125).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"resnet.pth: not an ImageNet Xception .* missing: .*unexpected: "):
        create_model("xception_pretrained", 5, weights=str(wrong))

    shapes = tmp_path / "narrow.pth"
    state = create_model("xception_pretrained", 1000).state_dict()
    state["conv1.weight"] = state["conv1.weight"][:16]
    torch.save(state, shapes)
    with pytest.raises(ValueError, match=r"1 wrong shape: conv1.weight \(16, 3, 3, 3\) != \(32, 3, 3, 3\)"):
        create_model("xception_pretrained", 5, weights=str(shapes))

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors: not a readable safetensors file"):
        create_model("xception_pretrained", 5, weights=str(garbage))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo ran > /dev/null",))


def test_pretrained_weights_file_with_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode()}, evil)
    with pytest.raises(ValueError, match="evil.pth: refused"):
        create_model("xception_pretrained", 5, weights=str(evil))
