"""Export: checkpoints and their ensemble to ONNX (fp32/fp16) and TensorRT, verified against PyTorch.

See docs/ARCHITECTURE.md for the graph contract (input/output names, dtypes, shapes) and the manifest.
"""
from cnnbench.export.errors import ExportError, ParityError
from cnnbench.export.manifest import (artifact_path, load_cam_weights, load_manifest, verified_bytes)
from cnnbench.export.onnx_export import export_onnx
from cnnbench.export.ort import make_ort_session
from cnnbench.export.parity import format_parity_table, run_parity
from cnnbench.export.pipeline import export_checkpoints
from cnnbench.export.tensorrt import TensorRTEngine, build_tensorrt_engine, profile_shapes, tensorrt_status

__all__ = [
    "ExportError", "ParityError", "export_checkpoints", "export_onnx", "load_manifest", "artifact_path",
    "verified_bytes", "load_cam_weights", "make_ort_session", "run_parity", "format_parity_table",
    "build_tensorrt_engine", "tensorrt_status", "profile_shapes", "TensorRTEngine",
]
