"""Ten-crop geometry equals torchvision's TenCrop, crop by crop, and exports to ONNX."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T

from cnnbench.data.geometry import CropBox, center_crop_box, ten_crop, ten_crop_boxes
from cnnbench.data.spec import HALF, IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, spec_for_crop

# (resize, crop): even and odd margins, including the ones where Python's round-half-to-even
# matters (margin 1 -> offset 0, margin 3 -> 2, margin 5 -> 2, margin 9 -> 4) and crop == resize.
SIZES = [(256, 224), (73, 64), (12, 9), (11, 6), (9, 4), (10, 5), (7, 7), (6, 1), (16, 11)]


@pytest.mark.parametrize("resize,crop", SIZES)
def test_ten_crop_equals_torchvision_tencrop(resize, crop):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 3, resize, resize), dtype=torch.uint8)
    ours = ten_crop(x, crop)
    assert ours.shape == (3, 10, 3, crop, crop) and ours.dtype == torch.uint8
    for b in range(x.shape[0]):
        reference = T.TenCrop(crop)(x[b])
        assert len(reference) == 10
        for k in range(10):
            assert torch.equal(ours[b, k], reference[k]), f"crop {k} differs for resize={resize} crop={crop}"


@pytest.mark.parametrize("resize,crop", SIZES)
def test_boxes_describe_the_crops_taken(resize, crop):
    torch.manual_seed(1)
    image = torch.rand(3, resize, resize)
    reference = T.TenCrop(crop)(image)
    boxes = ten_crop_boxes(resize, crop)
    assert [b.flipped for b in boxes] == [False] * 5 + [True] * 5
    for box, expected in zip(boxes, reference):
        assert box.size == crop
        assert 0 <= box.top <= resize - crop and 0 <= box.left <= resize - crop
        cut = image[:, box.top:box.top + crop, box.left:box.left + crop]
        if box.flipped:
            cut = torch.flip(cut, dims=[-1])
        assert torch.equal(cut, expected)


def test_odd_margin_centre_and_mirrored_centre_are_distinct_boxes():
    # margin 3: torchvision's centre offset is round(1.5) = 2; the mirrored centre then covers
    # columns starting at 3 - 2 = 1 of the original image.
    boxes = ten_crop_boxes(10, 7)
    assert boxes[4] == CropBox(2, 2, 7, False)
    assert boxes[9] == CropBox(2, 1, 7, True)
    assert boxes[5] == CropBox(0, 3, 7, True)  # mirrored top-left comes from the top-right corner


@pytest.mark.parametrize("resize,crop", SIZES)
def test_center_crop_box_matches_torchvision_center_crop(resize, crop):
    image = torch.arange(resize * resize, dtype=torch.float32).view(1, resize, resize)
    box = center_crop_box(resize, crop)
    assert torch.equal(image[:, box.top:box.top + crop, box.left:box.left + crop], T.CenterCrop(crop)(image))
    assert box == ten_crop_boxes(resize, crop)[4]


def test_ten_crop_non_square_input_matches_torchvision():
    x = torch.randn(2, 3, 13, 10)
    ours = ten_crop(x, 6)
    for b in range(2):
        for k, expected in enumerate(T.TenCrop(6)(x[b])):
            assert torch.equal(ours[b, k], expected)


def test_ten_crop_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ten_crop(torch.zeros(3, 8, 8), 4)
    with pytest.raises(ValueError, match="larger than the image"):
        ten_crop(torch.zeros(1, 3, 8, 8), 9)
    with pytest.raises(ValueError, match="larger than the image"):
        ten_crop_boxes(8, 9)


def test_ten_crop_exports_to_onnx_with_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")

    class TenCropOnly(torch.nn.Module):
        def forward(self, x):
            return ten_crop(x, 5)

    path = tmp_path / "ten_crop.onnx"
    example = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    torch.onnx.export(TenCropOnly().eval(), (example,), str(path), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)  # a batch size not seen at export
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_array_equal(out, ten_crop(x, 5).numpy())


# ---- PreprocessSpec --------------------------------------------------------------------------

def test_spec_for_crop_keeps_imagenet_ratio_and_norms():
    spec = spec_for_crop(224)
    assert (spec.resize, spec.crop, spec.mean, spec.std) == (256, 224, IMAGENET_MEAN, IMAGENET_STD)
    assert spec_for_crop(299, norm="half").resize == 342 and spec_for_crop(299, norm="half").std == HALF
    assert spec_for_crop(64).resize == 73
    with pytest.raises(ValueError, match="normalisation"):
        spec_for_crop(224, norm="zscore")


def test_spec_round_trips_through_dict_and_json():
    import json
    spec = PreprocessSpec(146, 128, IMAGENET_MEAN, HALF, "bicubic")
    again = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and isinstance(again.mean, tuple)


@pytest.mark.parametrize("change,message", [
    ({"crop": None}, "missing key.*crop"),
    ({"extra": 1}, "unknown key.*extra"),
    ({"crop": 300}, "larger than resize"),
    ({"resize": 0}, "resize must be a positive integer"),
    ({"mean": [0.5, 0.5]}, "mean must have 3 values"),
    ({"std": [0.5, 0.0, 0.5]}, "std must be positive"),
    ({"interpolation": "nearest"}, "interpolation"),
])
def test_spec_from_dict_names_the_bad_key(change, message):
    d = spec_for_crop(224).to_dict()
    for key, value in change.items():
        if value is None:
            d.pop(key)
        else:
            d[key] = value
    with pytest.raises(ValueError, match=message):
        PreprocessSpec.from_dict(d)
