"""Inference on any checkpoint or export through any backend (torch, onnxruntime, tensorrt).

`load` gives a Predictor; `evaluate` measures accuracy on the test split; `predict_files`
classifies image files and folders. cuda_check.py exercises the GPU paths.
"""
from runtime.evaluate import evaluate
from runtime.loader import BACKENDS, load
from runtime.pipeline import PipelineResult, run_files
from runtime.predict import predict_files
from runtime.predictor import BackendError, Predictor

__all__ = ["BACKENDS", "BackendError", "PipelineResult", "Predictor", "evaluate", "load", "predict_files",
           "run_files"]
