"""Every backend available here agrees with the PyTorch reference on the held-out images.

Tolerances come from the arithmetic, not from what passes:
- fp32 (any backend, channels_last): the design's fp32 parity gate, max |Δlogit| <= 1e-3 and
  identical top-1.
- fp16 / bf16: the first-order worst-case rounding bound gamma_n = n*u / (1 - n*u), relative to the
  logit scale, where u is the format's unit roundoff (2^-11 fp16, 2^-8 bf16) and n the number of
  rounding layers (conv, batch-norm, linear) on the path. If every logit is within that bound, top-1
  can only change where the reference's top-1 margin is below twice the bound, so every image
  with a wider margin must agree.
"""
import os

import pytest
import torch
from torch import nn

from cnnbench import export
from cnnbench import runtime
from cnnbench.runtime.ort_backend import cuda_provider_problem
from cnnbench.runtime.pipeline import run_files
from cnnbench.runtime.trt_backend import tensorrt_problem
from runtime_testlib import reference, run, tampered_copy  # noqa: F401 (shared fixtures)

UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    """{"crops_outside": dir, "ten_crop_in_graph": dir}, each with fp32 and fp16 graphs."""
    out = tmp_path_factory.mktemp("runtime-exports")
    folders = {}
    for ten_crop in (False, True):
        kind = "ten_crop_in_graph" if ten_crop else "crops_outside"
        # The crops-outside graph also returns the CAM feature map: the runtime asks for the logits only.
        # TensorRT engines where TensorRT and a GPU exist, for at most 4 images a call: the runs below
        # feed 6, so they go through the engine in chunks (split views of one batch).
        result = export.export_checkpoints([run["checkpoint"]], fp16=True, ten_crop="graph" if ten_crop else "host",
                                           cam_output=not ten_crop, tensorrt="auto", max_batch=4,
                                           out=str(out / kind), parity_images=8, progress=False)
        folders[kind] = result["exports"][0]["export_dir"]
    return folders


def rounding_layers(checkpoint: str) -> int:
    from cnnbench.models import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    return sum(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) for m in model.modules())


def assert_agrees(logits: torch.Tensor, reference: torch.Tensor, precision: str, layers: int) -> None:
    if precision == "fp32":
        assert (logits - reference).abs().max() <= 1e-3
        assert torch.equal(logits.argmax(1), reference.argmax(1))
        return
    n_u = layers * UNIT_ROUNDOFF[precision]
    bound = n_u / (1 - n_u) * reference.abs().max()
    assert (logits - reference).abs().max() <= bound
    top2 = reference.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * bound
    assert decided.any()  # otherwise this test would check nothing
    assert torch.equal(logits.argmax(1)[decided], reference.argmax(1)[decided])


CONFIGS = [
    # (artifact, backend, precision, channels_last, device)
    ("checkpoint", "torch", "fp32", False, "auto"),
    ("checkpoint", "torch", "fp32", True, "auto"),
    ("checkpoint", "torch", "bf16", False, "auto"),
    ("checkpoint", "torch", "bf16", True, "auto"),
    ("crops_outside", "onnxruntime", "fp32", False, "cpu"),
    ("crops_outside", "onnxruntime", "fp16", False, "cpu"),
    ("ten_crop_in_graph", "onnxruntime", "fp32", False, "cpu"),
    ("ten_crop_in_graph", "onnxruntime", "fp16", False, "cpu"),
    ("crops_outside", "onnxruntime", "fp32", False, "cuda"),
    ("ten_crop_in_graph", "onnxruntime", "fp16", False, "cuda"),
    ("crops_outside", "tensorrt", "fp32", False, "cuda"),
    ("crops_outside", "tensorrt", "fp16", False, "cuda"),
    ("ten_crop_in_graph", "tensorrt", "fp32", False, "cuda"),
    ("ten_crop_in_graph", "tensorrt", "fp16", False, "cuda"),
]


@pytest.mark.parametrize("artifact,backend,precision,channels_last,device", CONFIGS)
def test_backend_agrees_with_the_reference(run, reference, exports, artifact, backend, precision, channels_last,
                                           device):
    if backend == "tensorrt" and tensorrt_problem():
        pytest.skip(f"TensorRT: {tensorrt_problem()}")
    if backend == "onnxruntime" and device == "cuda" and cuda_provider_problem():
        pytest.skip(f"onnxruntime on CUDA: {cuda_provider_problem()}")
    paths, _, expected = reference
    path = run["checkpoint"] if artifact == "checkpoint" else exports[artifact]
    predictor = runtime.load(path, backend=backend, precision=precision, channels_last=channels_last, device=device)
    assert (predictor.backend, predictor.precision) == (backend, precision)
    assert predictor.ten_crop_in_graph == (artifact == "ten_crop_in_graph")
    if backend == "tensorrt":
        assert predictor.max_batch == (4 if artifact == "ten_crop_in_graph" else 40)  # the profile's largest batch
    # Host (PIL) preprocessing on every device: this checks the model's precision; GPU decoding and
    # resizing have their own bound (test_gpu_preprocessing.py).
    result = run_files(predictor, paths, batch=6, workers=0, preprocess="host")
    assert result.positions == list(range(len(paths))) and not result.failures
    assert_agrees(result.logits, expected, precision, rounding_layers(run["checkpoint"]))


def test_evaluate_an_export_finds_the_split_of_its_source_checkpoint(run, exports):
    reference = runtime.evaluate(run["checkpoint"], backend="torch", device="cpu", workers=0, progress=False)
    for folder in exports.values():
        result = runtime.evaluate(folder, backend="onnxruntime", device="cpu", workers=0, progress=False)
        assert result["split"] == run["split"] and result["backend"] == "onnxruntime"
        for key in ("images", "top1", "top5", "mean_per_class"):
            assert result[key] == reference[key], key


def test_auto_backend_and_device(run, exports):
    predictor = runtime.load(run["checkpoint"])
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert predictor.backend == "torch" and predictor.device == expected_device
    exported = runtime.load(exports["crops_outside"])
    if torch.cuda.is_available():
        assert exported.backend in ("tensorrt", "onnxruntime")
    else:
        assert (exported.backend, exported.device) == ("onnxruntime", "cpu")
    # The manifest path works as well as the folder.
    via_manifest = runtime.load(os.path.join(exports["crops_outside"], "manifest.json"))
    assert via_manifest.classes == exported.classes == predictor.classes


def test_in_graph_ten_crop_export_takes_images_only(exports):
    predictor = runtime.load(exports["ten_crop_in_graph"], backend="onnxruntime", device="cpu")
    images = torch.zeros(2, 3, predictor.spec.resize, predictor.spec.resize, dtype=torch.uint8)
    assert predictor.logits_from_images(images).shape == (2, len(predictor.classes))
    with pytest.raises(runtime.BackendError, match="ten crops inside its graph"):
        predictor.logits_from_images(images, crops=1)
    with pytest.raises(runtime.BackendError, match="logits_from_images"):
        predictor.logits_from_crops(torch.zeros(2, 3, predictor.spec.crop, predictor.spec.crop))


def test_crops_outside_export_single_crop_matches_the_torch_backend(run, exports, reference):
    paths = reference[0]
    torch_logits = run_files(runtime.load(run["checkpoint"], device="cpu"), paths, crops=1, workers=0).logits
    ort_logits = run_files(runtime.load(exports["crops_outside"], device="cpu"), paths, crops=1, workers=0).logits
    assert (ort_logits - torch_logits).abs().max() <= 1e-3


def test_export_misuse_gets_clear_errors(run, exports, tmp_path):
    folder = exports["crops_outside"]
    with pytest.raises(runtime.BackendError, match="give the export folder"):
        runtime.load(os.path.join(folder, "model.onnx"))
    with pytest.raises(runtime.BackendError, match="torch backend runs the source checkpoint"):
        runtime.load(folder, backend="torch")
    with pytest.raises(ValueError, match="channels_last and compile apply to the torch backend"):
        runtime.load(folder, channels_last=True)
    with pytest.raises(runtime.BackendError, match="no onnx artifact in bf16"):
        runtime.load(folder, backend="onnxruntime", precision="bf16")
    if tensorrt_problem():
        with pytest.raises(runtime.BackendError, match="tensorrt backend unavailable"):
            runtime.load(folder, backend="tensorrt")


def test_a_modified_graph_is_refused_before_it_is_loaded(exports, tmp_path):
    copy, _ = tampered_copy(exports["crops_outside"], "model.onnx", tmp_path)
    with pytest.raises(export.ExportError, match="sha256"):
        runtime.load(copy, backend="onnxruntime", device="cpu")


def test_torch_compile_path(run, reference, monkeypatch):
    # Inductor needs minutes on this machine; the eager dynamo backend checks the wiring (the compiled
    # module is the one that runs, the name says so); cuda_check.py runs the real compiler on a GPU.
    calls = []
    real_compile = torch.compile

    def eager_compile(model, mode=None):
        calls.append(mode)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    predictor = runtime.load(run["checkpoint"], device="cpu", compile="reduce-overhead")
    assert calls == ["reduce-overhead"] and "compiled" in predictor.name
    paths, _, expected = reference
    result = run_files(predictor, paths[:4], workers=0)
    assert (result.logits - expected[:4]).abs().max() <= 1e-3
