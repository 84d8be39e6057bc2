"""Micro-benchmarks: one ten-crop forward pass per backend on a small model (pytest-benchmark).

Timed only with `pytest tests/benchmarks --benchmark-only --benchmark-enable`; in the normal test
run (--benchmark-disable) each backend runs once and its logits are checked against PyTorch fp32.
"""
import pytest
import torch

from cnnbench import export
from cnnbench import runtime
from cnnbench.data.folder import scan_folder
from cnnbench.data.spec import spec_for_crop
from cnnbench.data.split import make_split, save_split
from cnnbench.data.synth import synthesize
from cnnbench.models.checkpoint import save_checkpoint
from cnnbench.models.registry import create_model
from cnnbench.bench.targets import backend_problem

SPEC = spec_for_crop(64)
BATCH = 2  # images, ten crops each


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    data = synthesize(root / "data", classes=2, per_class=2, size=48, progress=False)
    split = make_split(scan_folder(data), test_fraction=0.5, seed=0)
    save_split(split, root / "split.json")
    torch.manual_seed(0)
    model = create_model("resnet26", num_classes=len(split.classes), width_mult=0.25).eval()
    save_checkpoint(root / "train" / "small" / "best.pt", model, arch="resnet26", classes=split.classes, spec=SPEC,
                    record={"split": str(root / "split.json")})
    export.export_checkpoints(None, fp16=True, out=root / "export", train_dir=root / "train", parity_images=2,
                              tensorrt="auto", progress=False)
    images = torch.randint(0, 256, (BATCH, 3, SPEC.resize, SPEC.resize), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    reference = runtime.load(root / "train" / "small" / "best.pt", backend="torch").logits_from_images(images)
    return {"checkpoint": str(root / "train" / "small" / "best.pt"), "export": str(root / "export" / "small"),
            "images": images, "reference": reference}


CASES = [
    ("torch", "fp32", False, 1e-5),
    ("torch", "bf16", True, 0.1),
    ("onnxruntime", "fp32", False, 1e-3),
    ("onnxruntime", "fp16", False, 0.05),
    ("tensorrt", "fp32", False, 1e-2),
]


@pytest.mark.parametrize("backend, precision, channels_last, tolerance", CASES,
                         ids=[f"{b}-{p}" for b, p, _, _ in CASES])
def test_forward(benchmark, small_model, backend, precision, channels_last, tolerance):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = backend_problem(backend, device)
    if problem:
        pytest.skip(f"{backend} on {device}: {problem}")
    if backend == "torch" and precision == "bf16" and device == "cuda":
        precision = "fp16"
    path = small_model["checkpoint"] if backend == "torch" else small_model["export"]
    predictor = runtime.load(path, backend=backend, device=device, precision=precision, channels_last=channels_last)
    images = small_model["images"].to(predictor.device)
    logits = benchmark(lambda: predictor.device_logits_from_images(images).cpu())
    torch.testing.assert_close(logits, small_model["reference"], rtol=tolerance, atol=tolerance)
