"""Reference Grad-CAM on tiny models with fixed weights; expected maps computed by hand."""
import pytest
import torch
from torch import nn

from cnnbench.gradcam.core import ClassifierCAM, GradCAM, upsample
from cnnbench.models.ensemble import Ensemble
from cnnbench.models.registry import create_model


class GapLinear(nn.Module):
    """forward_features = a fixed module (identity by default); head = global average pool + Linear."""

    def __init__(self, weight, bias, features: nn.Module | None = None):
        super().__init__()
        self.body = features if features is not None else nn.Identity()
        weight = torch.tensor(weight, dtype=torch.float32)
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(torch.tensor(bias, dtype=torch.float32))

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, features):
        return self.classifier(features.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# Two 2x2 "images" whose two channels are the feature maps A_0, A_1 themselves.
IMAGE_1 = [[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, -2.0]]]
IMAGE_2 = [[[0.0, 1.0], [0.0, 1.0]], [[2.0, 2.0], [0.0, 0.0]]]
W = [[1.0, -1.0], [0.5, 2.0]]
B = [0.0, 0.1]


def hand_model():
    return GapLinear(W, B)


def test_gradcam_matches_hand_computed_maps_one_target_per_image():
    # Image 1: GAP = (2.5, 0.5) -> logits (2.0, 2.35), predicted class 1.
    # Class 1 weights alpha = W[1] / 4 = (0.125, 0.5):
    #   0.125*A0 + 0.5*A1 = [[2.125, 0.25], [0.375, -0.5]] -> ReLU [[2.125, 0.25], [0.375, 0]]
    # Image 2, explained for class 0: alpha = W[0] / 4 = (0.25, -0.25):
    #   0.25*A0 - 0.25*A1 = [[-0.5, -0.25], [0, 0.25]] -> ReLU [[0, 0], [0, 0.25]]
    x = torch.tensor([IMAGE_1, IMAGE_2])
    result = GradCAM(hand_model())(x, torch.tensor([1, 0]))
    expected = torch.tensor([[[2.125, 0.25], [0.375, 0.0]], [[0.0, 0.0], [0.0, 0.25]]])
    torch.testing.assert_close(result.map, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.logits, torch.tensor([[2.0, 2.35], [-0.5, 2.35]]), rtol=0, atol=1e-6)
    assert result.targets.tolist() == [1, 0]


def test_gradcam_default_target_is_the_predicted_class_and_targets_the_raw_logit():
    # Image 1 class 0: alpha = (0.25, -0.25): [[-0.75, 0.5], [0.75, 1.5]] -> ReLU [[0, 0.5], [0.75, 1.5]].
    # A softmax target would give alpha proportional to W[0] - W[1] (p1 weighted), a different map.
    x = torch.tensor([IMAGE_1])
    predicted = GradCAM(hand_model())(x)
    assert predicted.targets.tolist() == [1]
    class0 = GradCAM(hand_model())(x, torch.tensor([0]))
    torch.testing.assert_close(class0.map, torch.tensor([[[0.0, 0.5], [0.75, 1.5]]]), rtol=0, atol=1e-6)


def test_fixed_conv_features():
    # forward_features = ReLU(1x1 conv) with channel 0 = x, channel 1 = 1 - x (bias 1).
    # x = [[0, 1, 2, 3]] (1x4). A0 = [0, 1, 2, 3], A1 = ReLU(1 - x) = [1, 0, 0, 0].
    # W[0] = (1, 4) over 4 positions: alpha = (0.25, 1): [1, 0.25, 0.5, 0.75].
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, 1.0]))
    model = GapLinear([[1.0, 4.0], [-1.0, 0.0]], [0.0, 0.0], features=nn.Sequential(conv, nn.ReLU()))
    result = GradCAM(model)(torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]]))
    assert result.targets.tolist() == [0]  # logits (1.5 + 0.25*4 = 2.5, -1.5)
    torch.testing.assert_close(result.map, torch.tensor([[[1.0, 0.25, 0.5, 0.75]]]), rtol=0, atol=1e-6)


def test_maps_in_logit_units_average_to_logit_minus_bias():
    # at_size multiplies by h*w = 4: image 1, class 1 -> [[8.5, 1], [1.5, 0]]; the pre-ReLU map
    # [[8.5, 1], [1.5, -2]] averages to 2.25 = logit 2.35 - bias 0.1.
    result = GradCAM(hand_model())(torch.tensor([IMAGE_1]), torch.tensor([1]))
    torch.testing.assert_close(result.at_size(2), torch.tensor([[[8.5, 1.0], [1.5, 0.0]]]), rtol=0, atol=1e-6)


def test_ensemble_map_is_the_sum_of_member_maps():
    # A second member with W = diag(2, 1); the target is the ensemble's (summed-logit) prediction.
    other = GapLinear([[2.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    ensemble = Ensemble([hand_model(), other])
    x = torch.tensor([IMAGE_1])
    # Ensemble logits: (2.0 + 5.0, 2.35 + 0.5) -> class 0. Member maps for class 0 in logit units:
    # member 1: 4 * ReLU(0.25*A0 - 0.25*A1) = [[0, 2], [3, 6]]; member 2: 4 * ReLU(0.5*A0) = 2*A0 = [[2, 4], [6, 8]].
    result = GradCAM(ensemble)(x)
    assert result.targets.tolist() == [0]
    torch.testing.assert_close(result.logits, torch.tensor([[7.0, 2.85]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(result.at_size(2), torch.tensor([[[2.0, 6.0], [9.0, 14.0]]]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="ensemble"):
        _ = result.map


@pytest.mark.parametrize("arch", ["resnet18", "resnet26", "xception_small", "xception_medium"])
def test_gradcam_equals_cam_times_spatial_size_on_reference_models(arch):
    """Grad-CAM paper section 3.1: for GAP + linear heads, Grad-CAM = CAM / (h*w), for every class."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=4, width_mult=0.125, dropout=0.3).eval()
    x = torch.randn(2, 3, 96, 96)
    largest = 0.0
    for target in range(4):
        targets = torch.full((2,), target)
        grad = GradCAM(model)(x, targets)
        cam = ClassifierCAM(model)(x, targets)
        h, w = grad.map.shape[-2:]
        largest = max(largest, float(cam.map.max()))
        torch.testing.assert_close(grad.map * (h * w), cam.map, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.at_size(96), cam.at_size(96), rtol=1e-5, atol=1e-6)  # same logit units
        torch.testing.assert_close(grad.logits, model(x), rtol=1e-5, atol=1e-5)
    assert largest > 0  # the comparison was not between all-zero maps


def test_gradcam_batch_equals_one_image_at_a_time():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=5, width_mult=0.125).eval()
    x = torch.randn(3, 3, 64, 64)
    targets = torch.tensor([4, 0, 2])
    batched = GradCAM(model)(x, targets).map
    single = torch.cat([GradCAM(model)(x[i:i + 1], targets[i:i + 1]).map for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_frozen_backbone_still_gets_maps():
    torch.manual_seed(0)
    model = create_model("xception_small", num_classes=3, width_mult=0.125).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    result = GradCAM(model)(torch.randn(1, 3, 64, 64))
    assert result.map.shape[0] == 1 and result.map.max() > 0


def test_bad_targets_and_dtype_are_refused():
    x = torch.tensor([IMAGE_1])
    with pytest.raises(ValueError, match="out of range"):
        GradCAM(hand_model())(x, torch.tensor([2]))
    with pytest.raises(ValueError, match="one target per image"):
        GradCAM(hand_model())(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="fp32"):
        GradCAM(hand_model().half())


def test_upsample_keeps_a_constant_map_and_resizes():
    maps = torch.full((2, 3, 3), 2.0)
    out = upsample(maps, 7)
    assert out.shape == (2, 7, 7)
    torch.testing.assert_close(out, torch.full((2, 7, 7), 2.0))
