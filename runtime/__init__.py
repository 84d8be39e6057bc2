"""Inference on any checkpoint or export through any backend (torch, onnxruntime, openvino, tensorrt).

`load` gives a Predictor; `evaluate` measures accuracy on the test split; `predict_files`
classifies image files and folders. cuda_check.py exercises the GPU paths.
"""
from cnnbench.runtime.backends import BACKEND_CHOICES, BACKENDS
from cnnbench.runtime.evaluate import evaluate
from cnnbench.runtime.loader import load
from cnnbench.runtime.pipeline import PipelineResult, run_files
from cnnbench.runtime.predict import predict_files
from cnnbench.runtime.predictor import BackendError, Predictor

__all__ = ["BACKEND_CHOICES", "BACKENDS", "BackendError", "PipelineResult", "Predictor", "evaluate", "load", "predict_files",
           "run_files"]
