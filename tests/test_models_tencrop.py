import pytest
import torch
import torchvision.transforms as T

from cnnbench.data.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from cnnbench.models import Ensemble, TenCropModel, create_model

# Odd margins (37 - 32 = 5) exercise the centre-crop rounding and the mirrored-box arithmetic.
SPEC = PreprocessSpec(resize=37, crop=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _images(batch=3):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, SPEC.resize, SPEC.resize), dtype=torch.uint8, generator=generator)


def _host_side_ten_crop_logits(model, images):
    """torchvision's TenCrop on each normalised image, the model on each crop, logits averaged."""
    normalise = T.Normalize(SPEC.mean, SPEC.std)
    ten_crop = T.TenCrop(SPEC.crop)
    results = []
    with torch.no_grad():
        for image in images:
            crops = ten_crop(normalise(image.float() / 255))
            results.append(torch.stack([model(c.unsqueeze(0))[0] for c in crops]).mean(dim=0))
    return torch.stack(results)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("resnet18", 4, width_mult=0.125).eval()


def test_equals_torchvision_tencrop_by_hand(model):
    images = _images()
    with torch.no_grad():
        logits = TenCropModel(model, SPEC)(images)
    assert logits.dtype == torch.float32 and logits.shape == (3, 4)
    torch.testing.assert_close(logits, _host_side_ten_crop_logits(model, images), rtol=1e-4, atol=1e-5)


def test_float_input_in_0_255_equals_uint8(model):
    images = _images()
    wrapped = TenCropModel(model, SPEC)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(images.float()), wrapped(images))


def test_return_features_gives_the_per_crop_maps(model):
    images = _images(2)
    with torch.no_grad():
        logits, features = TenCropModel(model, SPEC, return_features=True)(images)
        assert features.shape[:3] == (2, 10, model.classifier.in_features)
        crops = T.TenCrop(SPEC.crop)(T.Normalize(SPEC.mean, SPEC.std)(images[1].float() / 255))
        torch.testing.assert_close(features[1, 6], model.forward_features(crops[6].unsqueeze(0))[0],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits, TenCropModel(model, SPEC)(images))


def test_ensemble_inside_gives_summed_logits_and_per_member_features(model):
    torch.manual_seed(1)
    other = create_model("xception_small", 4, width_mult=0.125).eval()
    images = _images(2)
    with torch.no_grad():
        logits, features = TenCropModel(Ensemble([model, other]), SPEC, return_features=True)(images)
        expected = TenCropModel(model, SPEC)(images) + TenCropModel(other, SPEC)(images)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert [f.shape[:3] for f in features] == [(2, 10, model.classifier.in_features),
                                                (2, 10, other.classifier.in_features)]


def test_wrong_input_size_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"expected resized images \[B, 3, 37, 37\], got \(1, 3, 40, 40\)"):
        TenCropModel(model, SPEC)(torch.zeros(1, 3, 40, 40, dtype=torch.uint8))


def test_low_precision_model_still_returns_float32_logits(model):
    images = _images(2)
    with torch.no_grad():
        reference = TenCropModel(model, SPEC)(images)
        low = TenCropModel(create_model("resnet18", 4, width_mult=0.125), SPEC)
        low.model.load_state_dict(model.state_dict())
        low = low.to(torch.bfloat16).eval()
        logits = low(images)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=0.05, atol=0.05)
