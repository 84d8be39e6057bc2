"""The runtime's CUDA paths in one run, for a session with a GPU:

    python -m runtime.cuda_check CHECKPOINT [--export DIR] [--images 256] [--out cuda_check.json]

Reference: the torch backend in fp32 on the CPU with host preprocessing (the path the tests pin to
torchvision's TenCrop). Then, on CUDA: torch fp32 with TF32 off (host, then device preprocessing:
resize on the GPU and nvJPEG decode where torchvision has it), fp16 and bf16 with channels_last,
fp16 + torch.compile ("reduce-overhead": CUDA graphs), and, given an export, onnxruntime (CUDA
provider, IOBinding) and tensorrt. Each reports top-1 agreement with the reference, max |Δlogit|,
accuracy, end-to-end images/s (files to logits) and model-only images/s (resident uint8 batch,
ten crops). Without a GPU it returns {"skipped": true, "reason": ...}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from cnnbench.common import accuracy_report, atomic_write_json
from cnnbench.data.split import spread_evenly
from cnnbench.runtime.evaluate import held_out_split
from cnnbench.runtime.loader import load
from cnnbench.runtime.pipeline import nvjpeg_works, run_files

CONFIGS = [
    # (label, backend, precision, channels_last, compile, preprocess)
    ("torch fp32 (TF32 off), host preprocessing", "torch", "fp32", False, False, "host"),
    ("torch fp32 (TF32 off), GPU preprocessing", "torch", "fp32", False, False, "auto"),
    ("torch fp16 channels_last", "torch", "fp16", True, False, "auto"),
    ("torch bf16 channels_last", "torch", "bf16", True, False, "auto"),
    ("torch fp16 channels_last + compile (CUDA graphs)", "torch", "fp16", True, "reduce-overhead", "auto"),
]
EXPORT_CONFIGS = [
    ("onnxruntime CUDA fp32", "onnxruntime", "fp32"),
    ("onnxruntime CUDA fp16", "onnxruntime", "fp16"),
    ("tensorrt fp32", "tensorrt", "fp32"),
    ("tensorrt fp16", "tensorrt", "fp16"),
]


def cuda_check(checkpoint, *, export_dir=None, data=None, images: int = 256, batch: int = 64,
               workers: int | None = None, compile: bool = True, repeats: int = 20) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": True, "reason": f"torch sees no CUDA GPU (torch {torch.__version__}, "
                                           f"CUDA build {torch.version.cuda})"}
    reference_predictor = load(checkpoint, backend="torch", device="cpu")
    split, split_source = held_out_split(reference_predictor, data)
    samples = spread_evenly(split.test, images)
    paths = [s.path for s in samples]
    reference = run_files(reference_predictor, paths, batch=batch, workers=workers, preprocess="host")
    labels = np.array([samples[p].label for p in reference.positions])

    report = {
        "skipped": False, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "cuda": torch.version.cuda, "nvjpeg": nvjpeg_works("cuda"), "checkpoint": str(checkpoint),
        "split": split_source, "images": len(paths), "batch": batch,
        "reference": {"name": "torch fp32 cpu, host preprocessing", "images_per_s": len(paths) / reference.seconds,
                      **accuracy_report(reference.logits.numpy(), labels, len(reference_predictor.classes))},
        "results": [],
    }
    targets = [(label, checkpoint, backend, precision, channels_last, compiled, preprocess)
               for label, backend, precision, channels_last, compiled, preprocess in CONFIGS
               if compile or not compiled]
    if export_dir is not None:
        targets += [(label, export_dir, backend, precision, False, False, "auto")
                    for label, backend, precision in EXPORT_CONFIGS]
    for label, path, backend, precision, channels_last, compiled, preprocess in targets:
        problem = _backend_problem(backend)
        if problem:  # e.g. no onnxruntime-gpu or no TensorRT on this machine: say so, it is not a failure
            result = {"skipped": problem}
        else:
            try:
                result = _check_one(path, backend, precision, channels_last, compiled, preprocess, paths,
                                    reference, labels, batch, workers, repeats)
            except Exception as e:  # one failing path (e.g. no such plan) must not hide the others
                result = {"error": f"{type(e).__name__}: {e}"}
        report["results"].append({"config": label, **result})
        print(json.dumps({"config": label, **result}), file=sys.stderr, flush=True)
    return report


def _backend_problem(backend: str) -> str | None:
    """Why ``backend`` cannot run on this GPU (None: it can)."""
    if backend == "onnxruntime":
        from cnnbench.runtime.ort_backend import cuda_provider_problem

        return cuda_provider_problem()
    if backend == "tensorrt":
        from cnnbench.runtime.trt_backend import tensorrt_problem

        return tensorrt_problem()
    return None


def _check_one(path, backend, precision, channels_last, compiled, preprocess, paths, reference, labels, batch,
               workers, repeats) -> dict:
    started = time.perf_counter()
    predictor = load(path, backend=backend, device="cuda", precision=precision, channels_last=channels_last,
                     compile=compiled)
    run_files(predictor, paths[:batch], batch=batch, workers=0, preprocess=preprocess)  # warm-up (and compile)
    warm_seconds = time.perf_counter() - started
    run = run_files(predictor, paths, batch=batch, workers=workers, preprocess=preprocess)
    if run.positions != reference.positions:
        raise RuntimeError(f"read {len(run.positions)} images, the reference read {len(reference.positions)}")
    diff = (run.logits - reference.logits).abs()
    return {
        "predictor": predictor.name,
        "preprocess": run.preprocess,
        "top1_agreement": float((run.logits.argmax(1) == reference.logits.argmax(1)).float().mean() * 100),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        **accuracy_report(run.logits.numpy(), labels, len(predictor.classes)),
        "end_to_end_images_per_s": len(paths) / run.seconds,
        "model_images_per_s": _model_throughput(predictor, batch, repeats),
        "load_and_warmup_s": warm_seconds,
    }


def _model_throughput(predictor, batch: int, repeats: int) -> float:
    """Ten-crop images/s from a uint8 batch already on the GPU: normalise, crop, model, average."""
    side = predictor.spec.resize
    generator = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device="cuda", generator=generator)
    for _ in range(3):
        predictor.device_logits_from_images(images)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        predictor.device_logits_from_images(images)
    torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--export", dest="export_dir", default=None, help="export folder for onnxruntime/tensorrt")
    parser.add_argument("--data", default=None, help="data folder (default: the checkpoint's saved split)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", default=None, help="also write the report here (JSON)")
    args = parser.parse_args(argv)
    report = cuda_check(args.checkpoint, export_dir=args.export_dir, data=args.data, images=args.images,
                        batch=args.batch, workers=args.workers, compile=args.compile)
    if args.out:
        atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
