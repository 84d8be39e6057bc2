"""Ten-crop paste-back on a model whose CAM is a known function of the pixels: the red channel."""
import pytest
import torch
import torchvision.transforms as T
from torch import nn

from cnnbench.data.geometry import ten_crop_boxes
from cnnbench.data.spec import PreprocessSpec
from cnnbench.gradcam.tencrop import image_cam, image_cams, paste_back, peak
from cnnbench.models.ensemble import Ensemble

# mean 0 / std 1: the model sees pixel / 255. resize 9, crop 6: odd margins, so the mirrored
# centre crop (left 1) is not the centre crop (left 2) - a wrong un-mirroring cannot hide.
SPEC = PreprocessSpec(resize=9, crop=6, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class RedChannel(nn.Module):
    """features = the red channel at full resolution; classes: logit_k = W[k] * mean(red) + b[k].

    Class 0 (weight 1): its CAM in logit units is red/255 itself on every crop, so the pasted-back
    map must reproduce the resized image's red channel exactly.
    """

    def __init__(self, weight=(1.0, -1.0), bias=(0.0, 0.0)):
        super().__init__()
        self.classifier = nn.Linear(1, len(weight))
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor(weight).view(-1, 1))
            self.classifier.bias.copy_(torch.tensor(bias))

    def forward_features(self, x):
        return x[:, :1]

    def forward_head(self, features):
        return self.classifier(features.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def random_images(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (batch, 3, SPEC.resize, SPEC.resize), dtype=torch.uint8, generator=generator)


def test_ten_crop_paste_back_reproduces_the_red_channel():
    images = random_images()
    result = image_cam(RedChannel(), images, SPEC, crops=10, targets=torch.tensor([0, 0]))
    torch.testing.assert_close(result.maps, images[:, 0].float() / 255, rtol=0, atol=1e-6)


def test_a_map_that_is_not_mirror_symmetric_catches_a_wrong_unflip():
    # Pasting the mirrored crops' maps without un-mirroring them would give another map.
    images = random_images()
    boxes = ten_crop_boxes(SPEC.resize, SPEC.crop)
    crops = T.TenCrop(SPEC.crop)(images[:, 0].float() / 255)  # torchvision's own ten crops
    wrong = torch.stack([c if not b.flipped else torch.flip(c, dims=[-1]) for c, b in zip(crops, boxes)], dim=1)
    correct = paste_back(torch.stack(crops, dim=1), boxes, SPEC.resize)
    mirrored_wrongly = paste_back(wrong, boxes, SPEC.resize)
    torch.testing.assert_close(correct, images[:, 0].float() / 255, rtol=0, atol=1e-6)
    assert (mirrored_wrongly - correct).abs().max() > 0.05


def test_centre_crop_is_pasted_at_its_box_and_zero_elsewhere():
    images = random_images(batch=1)
    result = image_cam(RedChannel(), images, SPEC, crops=1, targets=torch.tensor([0]))
    top = left = round((SPEC.resize - SPEC.crop) / 2)  # 2 for 9 / 6
    expected = torch.zeros(1, SPEC.resize, SPEC.resize)
    expected[:, top:top + 6, left:left + 6] = images[:, 0, top:top + 6, left:left + 6].float() / 255
    torch.testing.assert_close(result.maps, expected, rtol=0, atol=1e-6)


def test_class_with_negative_weight_has_an_empty_map():
    result = image_cam(RedChannel(), random_images(), SPEC, crops=10, targets=torch.tensor([1, 1]))
    assert result.maps.abs().max() == 0


def test_prediction_is_the_mean_of_the_ten_crops_logits():
    # class 0: mean red; class 1: a constant. Bright left half, dark right half: some crops
    # predict class 0, others class 1; the decision is torchvision TenCrop's mean logit.
    images = torch.zeros(4, 3, SPEC.resize, SPEC.resize, dtype=torch.uint8)
    for i, cut in enumerate((3, 4, 5, 6)):
        images[i, 0, :, :cut] = 255
    model = RedChannel(weight=(1.0, 0.0), bias=(0.0, 0.5))
    expected_logits = []
    for image in images:
        crops = torch.stack(T.TenCrop(SPEC.crop)(image.float() / 255))
        expected_logits.append(model(crops).mean(dim=0))
    expected_logits = torch.stack(expected_logits)
    result = image_cam(model, images, SPEC, crops=10)
    torch.testing.assert_close(result.logits, expected_logits, rtol=0, atol=1e-6)
    assert result.targets.tolist() == expected_logits.argmax(dim=1).tolist()
    assert len(set(result.targets.tolist())) == 2  # the test image set exercises both outcomes


def test_several_target_sets_from_one_pass_and_ensemble_sum():
    images = random_images()
    model = Ensemble([RedChannel(), RedChannel(weight=(2.0, -1.0))])
    predicted, class1 = image_cams(model, images, SPEC, crops=10, target_sets=[None, torch.tensor([1, 1])])
    assert predicted.targets.tolist() == [0, 0]
    # Member maps in logit units: 1*red and 2*red; their sum is 3*red.
    torch.testing.assert_close(predicted.maps, 3 * images[:, 0].float() / 255, rtol=0, atol=1e-5)
    assert class1.targets.tolist() == [1, 1] and class1.maps.abs().max() == 0


def test_peak_and_bad_inputs():
    maps = torch.zeros(2, 5, 7)
    maps[0, 3, 6] = 1.0
    maps[1, 0, 2] = 2.0
    assert peak(maps) == [(6, 3), (2, 0)]
    with pytest.raises(ValueError, match="crops must be 1, 10 or dense"):
        image_cam(RedChannel(), random_images(), SPEC, crops=5)
    with pytest.raises(ValueError, match="resized images"):
        image_cam(RedChannel(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), SPEC)
    with pytest.raises(ValueError, match="one target per image"):
        image_cam(RedChannel(), random_images(), SPEC, targets=torch.tensor([0]))
