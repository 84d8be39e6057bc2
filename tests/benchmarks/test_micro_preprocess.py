"""Micro-benchmarks of the test-time preprocessing hot path (pytest-benchmark).

Timed only with `pytest tests/benchmarks --benchmark-only --benchmark-enable`; in the normal test
run (--benchmark-disable) each body runs once and only its result is checked.
"""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from cnnbench.data.geometry import ten_crop
from cnnbench.data.spec import spec_for_crop
from cnnbench.data.transforms import normalize, resize_uint8

SPEC = spec_for_crop(224)


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8), "RGB")


def test_resize_uint8(benchmark, photo):
    resized = benchmark(resize_uint8, photo, SPEC)
    assert resized.dtype == torch.uint8 and tuple(resized.shape) == (3, SPEC.resize, SPEC.resize)
    reference = T.Resize((SPEC.resize, SPEC.resize), antialias=True)(T.PILToTensor()(photo))
    assert (resized.int() - reference.int()).abs().max() <= 1


def test_normalise_and_ten_crop(benchmark):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, SPEC.resize, SPEC.resize), dtype=torch.uint8)

    def crops_of(batch):
        return ten_crop(normalize(batch, SPEC), SPEC.crop).flatten(0, 1).contiguous()

    crops = benchmark(crops_of, images)
    assert tuple(crops.shape) == (80, 3, SPEC.crop, SPEC.crop) and crops.dtype == torch.float32
    # Independent reference: torchvision's TenCrop of the normalised first image.
    first = T.Normalize(SPEC.mean, SPEC.std)(images[0].float() / 255)
    expected = torch.stack(T.TenCrop(SPEC.crop)(first))
    torch.testing.assert_close(crops[:10], expected, rtol=1e-5, atol=1e-5)
