"""Transforms: test-time path equals torchvision's Resize + CenterCrop/TenCrop + Normalize."""
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from cnnbench.data.spec import HALF, IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from cnnbench.data.crops import eval_transform
from cnnbench.data.transforms import normalize, resize_uint8, train_transform

SPECS = [
    PreprocessSpec(73, 64, IMAGENET_MEAN, IMAGENET_STD),
    PreprocessSpec(40, 33, HALF, HALF, "bicubic"),
]


@pytest.fixture
def data_photo():
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    return Image.fromarray(smooth).resize((90, 60), Image.BICUBIC)  # not square, not the resize size


def _torchvision_eval(spec, crops):
    mode = T.InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    to_input = T.Compose([T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    resize = T.Resize((spec.resize, spec.resize), interpolation=mode, antialias=True)
    if crops == 1:
        return T.Compose([resize, T.CenterCrop(spec.crop), to_input])
    return T.Compose([resize, T.TenCrop(spec.crop), T.Lambda(lambda cs: torch.stack([to_input(c) for c in cs]))])


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("crops", [1, 10])
def test_eval_transform_equals_torchvision(data_photo, spec, crops):
    ours = eval_transform(spec, crops)(data_photo)
    expected = _torchvision_eval(spec, crops)(data_photo)
    assert ours.dtype == torch.float32
    assert ours.shape == expected.shape == ((3,) if crops == 1 else (10, 3)) + (spec.crop, spec.crop)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_eval_transform_rejects_other_crop_counts():
    with pytest.raises(ValueError, match="crops must be 1, 10 or dense"):
        eval_transform(SPECS[0], 5)


def test_resize_uint8(data_photo):
    spec = SPECS[0]
    x = resize_uint8(data_photo, spec)
    assert x.dtype == torch.uint8 and x.shape == (3, spec.resize, spec.resize)
    expected = np.asarray(data_photo.resize((spec.resize, spec.resize), Image.BILINEAR))
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), expected)


def test_normalize_uint8_and_float_and_broadcasting():
    spec = SPECS[0]
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 10, 3, 4, 5), dtype=torch.uint8)
    out = normalize(x, spec)
    assert out.dtype == torch.float32 and out.shape == x.shape
    mean, std = np.array(spec.mean)[:, None, None], np.array(spec.std)[:, None, None]
    expected = (x.numpy().astype(np.float64) / 255.0 - mean) / std
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    torch.testing.assert_close(normalize(x.float(), spec), out)
    with pytest.raises(ValueError, match="3, H, W"):
        normalize(torch.zeros(4, 8, 8), spec)


def test_train_transform_output_and_augmentation_directions():
    spec = PreprocessSpec(40, 32, HALF, HALF)
    transform = train_transform(spec)
    # top half white, bottom black; the left third red, so a horizontal flip is visible
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[:20] = 255
    img[:, :13, 1:] = 0
    img = Image.fromarray(img)
    torch.manual_seed(0)
    flips = []
    for _ in range(24):
        x = transform(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # HALF normalisation
        brightness = x[2]  # blue channel: 1 on the white part only
        assert brightness[:8].mean() > brightness[-8:].mean()  # never flipped vertically
        red_only = (x[0] > 0.5) & (x[1] < -0.5)
        flips.append(bool(red_only[:, 16:].sum() > red_only[:, :16].sum()))
    assert 0 < sum(flips) < len(flips)  # horizontal flips happen, but not always


def test_train_transform_components():
    names = [type(t).__name__ for t in train_transform(SPECS[0]).transforms]
    assert names == ["Resize", "RandomAffine", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    affine = train_transform(SPECS[0]).transforms[1]
    assert affine.degrees == [-15.0, 15.0] and affine.translate == (0.1, 0.1) and affine.scale == (0.9, 1.1)


def test_transforms_pickle_for_worker_processes(data_photo):
    for transform in (eval_transform(SPECS[0], 10), train_transform(SPECS[0])):
        pickle.loads(pickle.dumps(transform))
    again = pickle.loads(pickle.dumps(eval_transform(SPECS[0], 10)))
    torch.testing.assert_close(again(data_photo), eval_transform(SPECS[0], 10)(data_photo))
