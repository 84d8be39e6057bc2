"""GPU preprocessing (nvJPEG decode, antialiased resize on the device) against the PIL reference path,
with bounds derived from the arithmetic, separately from the model-precision gates.

Resize (bilinear, antialiased): PIL resamples in two passes and rounds the first pass to uint8
(error <= 0.5), the second pass averages with non-negative weights summing to 1 (the error stays
<= 0.5) and rounds again (<= 0.5 more); torch on the GPU resamples in float and rounds once (<= 0.5).
PIL's fixed-point weights add far less than one grey level, so the two differ by < 1.5, and being
integers, by at most 1.

JPEG decode: both decoders' IDCTs are within 1 of the exact one (IEEE 1180 accuracy), so they differ
by <= 2 per component; RGB = Y + 1.402 Cr (R), Y - 0.344 Cb - 0.714 Cr (G), Y + 1.772 Cb (B) turns that
into <= 2 + 1.772 * 2 = 5.5, plus each decoder's own rounding (0.5 + 0.5): <= 6 grey levels. Chroma
subsampling would add the decoders' different upsampling filters, which no such bound covers, so the
files here are 4:4:4. After the resize (weights summing to 1, one more rounding): <= 7.

End to end the decisions must not move: the fitted test model's margins are far above the logit
change a grey level or two makes.
"""
import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from cnnbench.data.spec import spec_for_crop
from cnnbench.data.transforms import resize_uint8
from cnnbench.runtime.pipeline import _torchvision_decode, nvjpeg_works, resize_on_device, run_files

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RESIZE_BOUND = 1
DECODE_BOUND = 6
DECODE_AND_RESIZE_BOUND = 7


def _images(count=6, seed=0):
    """Smooth random RGB images of odd sizes (down- and upscaled by the resize)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        h, w = (int(v) for v in rng.integers(20, 140, 2))
        base = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3)).astype(np.uint8)
        images.append(Image.fromarray(base).resize((w, h), Image.BILINEAR))
    return images


def test_gpu_resize_is_within_one_grey_level_of_pil():
    spec = spec_for_crop(32)
    assert spec.interpolation == "bilinear"
    worst = 0
    for img in _images():
        host = resize_uint8(img, spec).int()
        device = resize_on_device(TF.pil_to_tensor(img).cuda(), spec).cpu().int()
        worst = max(worst, int((host - device).abs().max()))
    assert worst <= RESIZE_BOUND


@pytest.mark.skipif(torch.cuda.is_available() and not nvjpeg_works("cuda"), reason="torchvision here has no nvJPEG")
def test_nvjpeg_decode_is_within_the_idct_bound_of_pil():
    spec = spec_for_crop(32)
    decode_worst = resize_worst = 0
    for img in _images(seed=1):
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=90, subsampling=0)  # 4:4:4
        data = buffer.getvalue()
        reference = Image.open(io.BytesIO(data)).convert("RGB")
        (decoded,) = _torchvision_decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)], "cuda")
        decode_worst = max(decode_worst, int((decoded.cpu().int() - TF.pil_to_tensor(reference).int()).abs().max()))
        resized = resize_on_device(decoded, spec).cpu().int()
        resize_worst = max(resize_worst, int((resized - resize_uint8(reference, spec).int()).abs().max()))
    assert decode_worst <= DECODE_BOUND and resize_worst <= DECODE_AND_RESIZE_BOUND


def test_gpu_preprocessing_keeps_every_decision(tmp_path_factory):
    from cnnbench import runtime
    from runtime_testlib import held_out_images, tiny_run

    run = tiny_run(tmp_path_factory.getbasetemp())
    predictor = runtime.load(run["checkpoint"], backend="torch", device="cuda")
    paths, _ = held_out_images(run)
    host = run_files(predictor, paths, batch=8, workers=0, preprocess="host")
    for mode in ("device", "device-jpeg") if nvjpeg_works("cuda") else ("device",):
        device = run_files(predictor, paths, batch=8, workers=0, preprocess=mode)
        assert device.positions == host.positions and device.preprocess == mode
        assert torch.equal(device.logits.argmax(1), host.logits.argmax(1)), mode
