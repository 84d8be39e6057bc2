"""runtime with the torch backend: evaluate equals torchvision's TenCrop by hand, every
preprocessing path gives the reference's logits, and misuse gets clear errors."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from cnnbench import runtime
from cnnbench.common import accuracy_report
from cnnbench.common.device import DeviceError
from cnnbench.data.images import load_rgb
from cnnbench.data.transforms import resize_uint8
from cnnbench.runtime.pipeline import resize_on_device, run_files
from runtime_testlib import reference, run, torchvision_ten_crop_logits  # noqa: F401 (shared fixtures)


def test_evaluate_equals_torchvision_ten_crop_by_hand(run, reference):
    paths, labels, logits = reference
    expected = accuracy_report(logits.numpy(), np.array(labels), num_classes=4)
    result = runtime.evaluate(run["checkpoint"], backend="torch", device="cpu", batch=5, workers=0, progress=False)
    assert result["split"] == run["split"]
    assert result["test_images"] == len(paths) == result["images"]
    assert result["failed"] == 0 and result["failures"] == []
    for key in ("top1", "top5", "mean_per_class"):
        assert result[key] == pytest.approx(expected[key]), key
    assert (result["backend"], result["device"], result["precision"], result["crops"]) == ("torch", "cpu", "fp32", 10)
    assert expected["top1"] > 25.0  # better than chance on 4 classes: the model is real, so is the comparison


def test_pipeline_logits_equal_torchvision_ten_crop(run, reference):
    paths, _, logits = reference
    predictor = runtime.load(run["checkpoint"], backend="torch", device="cpu")
    result = run_files(predictor, paths, batch=3, workers=0)  # batches of 3: uneven last batch too
    assert result.positions == list(range(len(paths)))
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-4)


def test_single_crop_equals_torchvision_center_crop(run, reference):
    paths = reference[0]
    expected = torchvision_ten_crop_logits(run["checkpoint"], paths, crops=1)
    predictor = runtime.load(run["checkpoint"], backend="torch", device="cpu")
    result = run_files(predictor, paths, crops=1, batch=8, workers=0)
    torch.testing.assert_close(result.logits, expected, rtol=1e-4, atol=1e-4)


def test_logits_from_crops_is_the_model_on_those_crops(run):
    predictor = runtime.load(run["checkpoint"], backend="torch", device="cpu")
    torch.manual_seed(0)
    crops = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = predictor.model(crops)
    torch.testing.assert_close(predictor.logits_from_crops(crops), expected)
    assert predictor.classes == sorted(predictor.classes) and len(predictor.classes) == 4
    assert predictor.spec.crop == 32 and not predictor.ten_crop_in_graph


def test_device_resize_matches_the_pil_resize(run, reference):
    predictor = runtime.load(run["checkpoint"], backend="torch", device="cpu")
    for path in reference[0][:4]:
        img = load_rgb(path)
        on_device = resize_on_device(TF.pil_to_tensor(img), predictor.spec).int()
        assert (on_device - resize_uint8(img, predictor.spec).int()).abs().max() <= 1


@pytest.mark.parametrize("preprocess", ["device", "device-jpeg"])
def test_device_preprocessing_paths_agree_with_the_reference(run, reference, preprocess):
    # On a GPU these run the resize (and the JPEG decode) on the device; here they run the same code on the CPU.
    paths, _, logits = reference
    predictor = runtime.load(run["checkpoint"], backend="torch", device="cpu")
    result = run_files(predictor, paths, batch=4, workers=0, preprocess=preprocess)
    assert result.preprocess == preprocess and result.positions == list(range(len(paths)))
    assert torch.equal(result.logits.argmax(1), logits.argmax(1))
    assert (result.logits - logits).abs().max() < 0.05 * logits.abs().max()


def test_jpegs_the_decoder_refuses_fall_back_to_load_rgb(run, reference, monkeypatch):
    import cnnbench.runtime.pipeline as pipeline

    calls = []

    def refusing_decoder(data, device):
        calls.append(len(data))
        raise RuntimeError("nvJPEG: unsupported JPEG")

    paths, _, logits = reference
    predictor = runtime.load(run["checkpoint"], backend="torch", device="cpu")
    expected = run_files(predictor, paths, batch=4, workers=0, preprocess="device")
    monkeypatch.setattr(pipeline, "_torchvision_decode", refusing_decoder)
    result = run_files(predictor, paths, batch=4, workers=0, preprocess="device-jpeg")
    # Each batch was tried whole, then file by file, then decoded by load_rgb like the "device" path.
    assert calls[:5] == [4, 1, 1, 1, 1]
    assert result.positions == expected.positions and not result.failures
    torch.testing.assert_close(result.logits, expected.logits)


def test_worker_processes_give_the_same_logits(run, reference):
    paths, _, logits = reference
    predictor = runtime.load(run["checkpoint"], backend="torch", device="cpu")
    result = run_files(predictor, paths, batch=4, workers=2)
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-4)


def test_evaluate_on_another_data_root_makes_the_seed0_split(run, reference):
    result = runtime.evaluate(run["checkpoint"], data=run["data"], backend="torch", device="cpu", crops=1,
                              workers=0, progress=False)
    # The tiny run saved a 25 % split; --data makes the default 20 % seed-0 split of the same folder.
    assert result["split"].startswith("seed-0 split of")
    assert result["test_images"] == 4 * round(16 * 0.2)


def test_clear_errors(run, tmp_path):
    with pytest.raises(runtime.BackendError, match="unknown backend"):
        runtime.load(run["checkpoint"], backend="tensorflow")
    with pytest.raises(runtime.BackendError, match="PyTorch checkpoint.*export"):
        runtime.load(run["checkpoint"], backend="onnxruntime")
    with pytest.raises(ValueError, match="precision"):
        runtime.load(run["checkpoint"], backend="torch", precision="int4")
    with pytest.raises(FileNotFoundError, match="model not found"):
        runtime.load(tmp_path / "missing.pt")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            runtime.load(run["checkpoint"], device="cuda")
    predictor = runtime.load(run["checkpoint"], device="cpu")
    images = torch.zeros(2, 3, 37, 37, dtype=torch.uint8)
    with pytest.raises(ValueError, match="crops must be 1, 10 or dense"):
        predictor.logits_from_images(images, crops=5)
    with pytest.raises(ValueError, match=r"uint8 images \[B,3,37,37\]"):
        predictor.logits_from_images(images.float())
    with pytest.raises(ValueError, match=r"uint8 images \[B,3,37,37\]"):
        predictor.logits_from_images(torch.zeros(2, 3, 40, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no split recorded"):
        no_split = tmp_path / "no_split.pt"
        from cnnbench.models import load_checkpoint, save_checkpoint
        model, meta = load_checkpoint(run["checkpoint"])
        save_checkpoint(no_split, model, arch=meta["arch"], classes=meta["classes"], spec=meta["spec"], record={})
        runtime.evaluate(no_split, device="cpu", progress=False)
