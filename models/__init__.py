"""Architectures, the registry that builds them by name, ensembles, ten-crop wrappers (exact, dense), checkpoints."""
from cnnbench.models.registry import create_model, default_spec, list_models, register_model
from cnnbench.models import resnet, xception  # noqa: F401  (importing registers the architectures)
from cnnbench.models.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from cnnbench.models.complexity import count_parameters, model_flops
from cnnbench.models.ensemble import Ensemble
from cnnbench.models.tencrop import TenCropModel
from cnnbench.models.dense import DenseGeometryError, DenseTenCropModel

__all__ = [
    "create_model", "default_spec", "list_models", "register_model",
    "FORMAT_VERSION", "CheckpointError", "load_checkpoint", "read_checkpoint_meta", "save_checkpoint",
    "count_parameters", "model_flops", "Ensemble", "TenCropModel",
    "DenseGeometryError", "DenseTenCropModel",
]
