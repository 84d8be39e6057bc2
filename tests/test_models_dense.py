import copy
import dataclasses
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision.transforms as T
from torch import nn

from cnnbench.data.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from cnnbench.data.transforms import normalize
from cnnbench.models import Ensemble, TenCropModel, create_model
from cnnbench.models.dense import (SMALL_WINDOW_CELLS, DenseGeometryError, DenseTenCropModel, SmallDenseWindowWarning,
                                   dense_geometry)

# Stride-32 trunks: crop 64 gives 2x2 maps, resize 96 gives 3x3; the corner offset is one cell and
# the centre crop (offset 16 px) sits half a cell off the grid, as at the standard 256/224.
SPEC = PreprocessSpec(resize=96, crop=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
TINY = {"width_mult": 0.125}


def _images(side, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return create_model("resnet18", 5, **TINY).eval()


class PaddingFreeNet(nn.Module):
    """Valid convolutions only (output stride 4): a crop's feature map is exactly a window of the image's."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 2, stride=2), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 2, stride=2), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)

    def forward_features(self, x):
        return self.trunk(x)

    def forward_head(self, features):
        return self.fc(features.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _torchvision_crop_logits(model, images, spec):
    """torchvision's TenCrop of each normalised image, the model on each crop: [B, 10, K]."""
    ten_crop = T.TenCrop(spec.crop)
    with torch.no_grad():
        return torch.stack([torch.stack([model(c.unsqueeze(0))[0] for c in ten_crop(normalize(image, spec))])
                            for image in images])


def test_geometry_is_measured_from_the_trunk(resnet):
    [geometry] = dense_geometry(resnet, SPEC)
    assert (geometry.stride, geometry.crop_cells, geometry.image_cells) == (32, 2, 3)
    assert geometry.corner_offsets == (0, 1) and geometry.centre_offset == 0.5
    # Xception's valid-padding stem shrinks the map differently; the stride is still measured as 32.
    [xception] = dense_geometry(create_model("xception_small", 5, **TINY), PreprocessSpec(
        resize=331, crop=299, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    assert (xception.stride, xception.crop_cells, xception.image_cells) == (32, 10, 11)
    [padding_free] = dense_geometry(PaddingFreeNet(), dataclasses.replace(SPEC, resize=28, crop=20))
    assert (padding_free.stride, padding_free.crop_cells, padding_free.image_cells) == (4, 3, 5)


def test_small_windows_warn_and_large_ones_do_not(resnet):
    with pytest.warns(SmallDenseWindowWarning, match="2x2 feature cells"):
        dense_geometry(resnet, SPEC)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallDenseWindowWarning)
        [geometry] = dense_geometry(resnet, PreprocessSpec(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    assert geometry.crop_cells == 7 >= SMALL_WINDOW_CELLS


def test_windows_equal_slices_of_the_image_and_mirror_maps_by_hand(resnet):
    images = _images(SPEC.resize)
    with torch.no_grad():
        maps = resnet.forward_features(normalize(images, SPEC))
        mirror_maps = resnet.forward_features(torch.flip(normalize(images, SPEC), dims=[-1]))

        def head(window):  # global average pool of a [B, C, h, w] window, then the classifier
            return resnet.fc(window.mean(dim=(2, 3)))

        corners = [lambda m: m[..., :2, :2], lambda m: m[..., :2, 1:], lambda m: m[..., 1:, :2],
                   lambda m: m[..., 1:, 1:]]
        # Centre at half a cell: the 3 cells of each axis weigh 1/2, 1, 1/2 (a 2-cell-wide window).
        axis = torch.tensor([0.5, 1.0, 0.5])
        centre_weights = torch.outer(axis, axis) / 4

        def centre(m):
            return resnet.fc((m * centre_weights).sum(dim=(2, 3)))

        expected = torch.stack([head(c(maps)) for c in corners] + [centre(maps)]
                               + [head(c(mirror_maps)) for c in corners] + [centre(mirror_maps)], dim=1)
        dense = DenseTenCropModel(resnet, SPEC, centre="interpolate")
        torch.testing.assert_close(dense.crop_logits(images), expected, rtol=1e-5, atol=1e-6)
        dropped_model = DenseTenCropModel(resnet, SPEC, centre="drop")
        dropped = dropped_model.crop_logits(images)
        assert dense.num_windows == 10 and dropped_model.num_windows == dropped.shape[1] == 8
        torch.testing.assert_close(dropped, expected[:, [0, 1, 2, 3, 5, 6, 7, 8]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dense(images), expected.mean(dim=1), rtol=1e-5, atol=1e-6)


def test_centre_pass_runs_the_network_on_the_centre_crops(resnet):
    images = _images(SPEC.resize)
    with torch.no_grad():
        crop_logits = DenseTenCropModel(resnet, SPEC, centre="pass").crop_logits(images)
    exact = _torchvision_crop_logits(resnet, images, SPEC)
    torch.testing.assert_close(crop_logits[:, [4, 9]], exact[:, [4, 9]], rtol=1e-4, atol=1e-5)
    # The corners are windows of the full map: close to the crops' logits, but not equal (padding).
    assert not torch.allclose(crop_logits[:, :4], exact[:, :4], atol=1e-4)


@pytest.mark.parametrize("resize, centre", [(28, "interpolate"), (24, "pass")])
def test_padding_free_trunk_gives_exactly_the_ten_crops(resize, centre):
    """resize 28: centre offset 4 px = one whole cell; resize 24: half a cell, so only its own pass is exact."""
    torch.manual_seed(0)
    model = PaddingFreeNet().eval()
    spec = dataclasses.replace(SPEC, resize=resize, crop=20)
    images = _images(resize, batch=3)
    with torch.no_grad():
        dense = DenseTenCropModel(model, spec, centre=centre)
        torch.testing.assert_close(dense.crop_logits(images), _torchvision_crop_logits(model, images, spec),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dense(images), TenCropModel(model, spec)(images), rtol=1e-5, atol=1e-6)


def test_misaligned_corner_offset_names_the_sizes_that_align(resnet):
    spec = dataclasses.replace(SPEC, resize=73)
    with pytest.raises(DenseGeometryError, match=r"multiple of the output stride 32, got 73 - 64 = 9; "
                                                 r"resizes that align with crop 64: 96$"):
        DenseTenCropModel(resnet, spec)
    assert issubclass(DenseGeometryError, ValueError)
    with pytest.raises(DenseGeometryError, match=r"342 - 299 = 43; resizes that align with crop 299: 331 or 363"):
        dense_geometry(resnet, PreprocessSpec(resize=342, crop=299, mean=IMAGENET_MEAN, std=IMAGENET_STD))


def test_trunk_that_does_not_grow_with_its_input_is_refused():
    class GlobalPoolTrunk(PaddingFreeNet):
        def forward_features(self, x):
            return nn.functional.adaptive_avg_pool2d(self.trunk(x), 2)

    with pytest.raises(DenseGeometryError, match="fully convolutional trunk"):
        DenseTenCropModel(GlobalPoolTrunk(), dataclasses.replace(SPEC, resize=28, crop=20))


def test_bad_centre_mode_and_input_size_are_clear_errors(resnet):
    with pytest.raises(ValueError, match=r"centre must be one of \('pass', 'interpolate', 'drop'\), got 'middle'"):
        DenseTenCropModel(resnet, SPEC, centre="middle")
    with pytest.raises(ValueError, match=r"expects \[B, 3, 96, 96\] input, got \(1, 3, 64, 64\)"):
        DenseTenCropModel(resnet, SPEC)(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize("arch", ["resnet18", "resnet26", "xception_small", "xception_medium",
                                  "xception_pretrained"])
def test_every_architecture_runs_dense(arch):
    torch.manual_seed(0)
    model = create_model(arch, 4, **({} if arch == "xception_pretrained" else TINY)).eval()
    images = _images(SPEC.resize, batch=3)
    with torch.no_grad():
        logits = DenseTenCropModel(model, SPEC)(images)
    assert logits.shape == (3, 4) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_window_weights_are_made_where_the_model_is_and_move_with_it(resnet):
    # The torch backend wraps a model that is already on its device (a GPU): the windows must be there too.
    on_meta = DenseTenCropModel(copy.deepcopy(resnet).to("meta"), SPEC)
    assert {buffer.device.type for buffer in on_meta.buffers()} == {"meta"}
    logits = on_meta(torch.empty(2, 3, SPEC.resize, SPEC.resize, device="meta"))
    assert logits.device.type == "meta" and tuple(logits.shape) == (2, 5)
    moved = DenseTenCropModel(copy.deepcopy(resnet), SPEC).to("meta", torch.float64)
    windows = [b for name, b in moved.named_buffers() if name.startswith("_weights_")]
    assert windows and {(b.device.type, b.dtype) for b in windows} == {("meta", torch.float64)}


def test_ensemble_sums_its_members_and_returns_their_full_image_maps(resnet):
    torch.manual_seed(1)
    other = create_model("xception_small", 5, **TINY).eval()
    images = _images(SPEC.resize, batch=3)
    with torch.no_grad():
        logits, features = DenseTenCropModel(Ensemble([resnet, other]), SPEC, return_features=True)(images)
        expected = DenseTenCropModel(resnet, SPEC)(images) + DenseTenCropModel(other, SPEC)(images)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
        assert [f.shape for f in features] == [(3, 2, resnet.num_features, 3, 3), (3, 2, other.num_features, 3, 3)]
        mirror = torch.flip(normalize(images, SPEC), dims=[-1])
        torch.testing.assert_close(features[1][:, 1], other.forward_features(mirror), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("centre", ["pass", "interpolate"])
def test_onnx_export_runs_in_onnxruntime_and_equals_pytorch(resnet, centre, tmp_path):
    dense = DenseTenCropModel(resnet, SPEC, centre=centre).eval()
    path = tmp_path / "dense.onnx"
    with torch.no_grad():
        torch.onnx.export(dense, (_images(SPEC.resize, batch=2),), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        images = _images(SPEC.resize, batch=3, seed=1)  # another batch size than the traced one
        expected = dense(images).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [logits] = session.run(None, {"images": images.numpy()})
    assert logits.shape == (3, 5) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
