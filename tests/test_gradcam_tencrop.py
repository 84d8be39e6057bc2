"""Ten-crop paste-back on a model whose CAM is a known function of the pixels: the red channel; the
seamless display paste."""
import math

import pytest
import torch
import torchvision.transforms as T
from torch import nn

from cnnbench.data.geometry import ten_crop_boxes
from cnnbench.data.spec import PreprocessSpec
from cnnbench.gradcam.tencrop import DISPLAY_TAPER, crop_window, image_cam, image_cams, paste_back, peak
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


# The paste-back tests explain Grad-CAM at last: there the red channel IS the map (the defaults may move).
GRADCAM_LAST = {"method": "gradcam", "layer": "last"}


def random_images(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (batch, 3, SPEC.resize, SPEC.resize), dtype=torch.uint8, generator=generator)


def test_ten_crop_paste_back_reproduces_the_red_channel():
    images = random_images()
    result = image_cam(RedChannel(), images, SPEC, crops=10, targets=torch.tensor([0, 0]), **GRADCAM_LAST)
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
    result = image_cam(RedChannel(), images, SPEC, crops=1, targets=torch.tensor([0]), **GRADCAM_LAST)
    top = left = round((SPEC.resize - SPEC.crop) / 2)  # 2 for 9 / 6
    expected = torch.zeros(1, SPEC.resize, SPEC.resize)
    expected[:, top:top + 6, left:left + 6] = images[:, 0, top:top + 6, left:left + 6].float() / 255
    torch.testing.assert_close(result.maps, expected, rtol=0, atol=1e-6)


def test_class_with_negative_weight_has_an_empty_map():
    result = image_cam(RedChannel(), random_images(), SPEC, crops=10, targets=torch.tensor([1, 1]), **GRADCAM_LAST)
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
    result = image_cam(model, images, SPEC, crops=10, **GRADCAM_LAST)
    torch.testing.assert_close(result.logits, expected_logits, rtol=0, atol=1e-6)
    assert result.targets.tolist() == expected_logits.argmax(dim=1).tolist()
    assert len(set(result.targets.tolist())) == 2  # the test image set exercises both outcomes


def test_several_target_sets_from_one_pass_and_ensemble_sum():
    images = random_images()
    model = Ensemble([RedChannel(), RedChannel(weight=(2.0, -1.0))])
    predicted, class1 = image_cams(model, images, SPEC, crops=10, target_sets=[None, torch.tensor([1, 1])],
                                   **GRADCAM_LAST)
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
        image_cam(RedChannel(), random_images(), SPEC, crops=5, **GRADCAM_LAST)
    with pytest.raises(ValueError, match="resized images"):
        image_cam(RedChannel(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), SPEC, **GRADCAM_LAST)
    with pytest.raises(ValueError, match="one target per image"):
        image_cam(RedChannel(), random_images(), SPEC, targets=torch.tensor([0]), **GRADCAM_LAST)


def test_display_paste_of_a_constant_map_is_that_constant_everywhere():
    """By hand: every crop's map is 3.0, so each pixel is sum(w * 3) / sum(w) = 3 whatever the windows -
    no step where the number of covering crops changes, no frame at the image edge. The plain mean does
    the same for a constant; the windows only matter for maps that differ between crops."""
    spec = PreprocessSpec(resize=40, crop=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    boxes = ten_crop_boxes(spec.resize, spec.crop)
    constant = torch.full((1, len(boxes), spec.crop, spec.crop), 3.0)
    shown = paste_back(constant, boxes, spec.resize, taper=DISPLAY_TAPER)
    assert torch.allclose(shown, torch.full((1, spec.resize, spec.resize), 3.0), atol=1e-5)


def test_crop_window_tapers_at_the_borders_and_is_flat_inside():
    window = crop_window(32, 0.125)  # a 4-pixel raised-cosine ramp at each border
    profile = window[16]
    assert torch.allclose(window, window.T) and torch.allclose(window, window.flip(1))  # separable, symmetric
    assert 0 < profile[0] < profile[1] < profile[2] < profile[3] < 1 and torch.all(profile[4:28] == 1)
    assert float(profile[0]) == pytest.approx(0.5 - 0.5 * math.cos(math.pi / 5))
    assert torch.equal(crop_window(32, 0.0), torch.ones(32, 32))
    with pytest.raises(ValueError, match="no flat middle"):
        crop_window(8, 0.6)


def test_display_map_has_no_seams_where_the_pointing_map_steps():
    """Crop maps that differ only by a per-crop constant: the plain mean (the pointing map) jumps where a
    crop's border enters; the tapered paste changes by small steps only. The pointing map is the plain mean."""
    spec = PreprocessSpec(resize=40, crop=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    boxes = ten_crop_boxes(spec.resize, spec.crop)
    levels = torch.arange(len(boxes), dtype=torch.float32).view(1, -1, 1, 1)
    crop_maps = levels.expand(1, len(boxes), spec.crop, spec.crop).contiguous()
    plain, shown = paste_back(crop_maps, boxes, spec.resize), paste_back(crop_maps, boxes, spec.resize, DISPLAY_TAPER)
    row_jump = lambda m: (m[0, :, 1:] - m[0, :, :-1]).abs().max()  # noqa: E731
    assert row_jump(plain) > 1.0 and row_jump(shown) < 0.5 * row_jump(plain)


def test_panels_show_the_display_map_and_peaks_use_the_plain_mean():
    images = random_images()
    result = image_cam(RedChannel(), images, SPEC, crops=10, targets=torch.tensor([0, 0]), **GRADCAM_LAST)
    red = images[:, 0].float() / 255
    assert torch.allclose(result.maps, red, atol=1e-5)  # the documented map: unchanged by the display paste
    assert torch.allclose(result.display, red, atol=1e-5)  # crops that agree paste to the same map either way
    centre = image_cam(RedChannel(), images, SPEC, crops=1, targets=torch.tensor([0, 0]), **GRADCAM_LAST)
    assert centre.display is centre.maps  # one crop: nothing to blend
