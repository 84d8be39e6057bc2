"""Every architecture kind, ensembled and wrapped for in-graph ten-crop, exports to ONNX with a dynamic batch."""
import numpy as np
import onnxruntime as ort
import torch

from cnnbench.data.spec import spec_for_crop
from cnnbench.models import Ensemble, TenCropModel, create_model

# xception_medium is the same module as xception_small with other widths.
ARCHS = ("resnet18", "resnet26", "xception_small")


def test_tencrop_ensemble_of_every_scalable_arch_exports_with_feature_maps(tmp_path):
    torch.manual_seed(0)
    members = [create_model(name, 5, width_mult=0.125).eval() for name in ARCHS]
    spec = spec_for_crop(56)
    wrapped = TenCropModel(Ensemble(members), spec, return_features=True).eval()
    example = torch.randint(0, 256, (2, 3, spec.resize, spec.resize), dtype=torch.uint8)
    path = tmp_path / "model.onnx"
    feature_names = [f"features_{name}" for name in ARCHS]
    torch.onnx.export(wrapped, (example,), str(path), dynamo=True, input_names=["image"],
                      output_names=["logits", *feature_names], dynamic_shapes=({0: torch.export.Dim("batch")},))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randint(0, 256, (3, 3, spec.resize, spec.resize), dtype=torch.uint8)  # another batch size
    logits, *features = session.run(None, {"image": images.numpy()})
    with torch.no_grad():
        expected_logits, expected_features = wrapped(images)
    assert logits.dtype == np.float32 and logits.shape == (3, 5)
    np.testing.assert_allclose(logits, expected_logits.numpy(), rtol=1e-4, atol=1e-4)
    for got, expected in zip(features, expected_features):
        assert got.shape[:2] == (3, 10)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
