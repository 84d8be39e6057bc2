"""cnnbench: train, export, verify, benchmark and explain CNN image classifiers.

Everything installs under this one name (``cnnbench.train``, ``cnnbench.runtime``, …): the folders at the
repository's top level are this package's subpackages (pyproject's ``package-dir`` maps ``cnnbench`` to
the repository root). The names below are what a Python user reaches for first; they load on first use,
so ``import cnnbench`` stays cheap (no torch until something needs it).
"""
from importlib import import_module

__version__ = "0.2.0"

# public name -> the subpackage that defines it
_PUBLIC = {
    "Predictor": "runtime", "load": "runtime", "predict_files": "runtime", "evaluate": "runtime",
    "create_model": "models", "load_checkpoint": "models", "save_checkpoint": "models", "list_models": "models",
    "PreprocessSpec": "data", "TrainConfig": "train", "train_model": "train",
    "export_checkpoints": "export", "load_manifest": "export", "run_bench": "bench",
    "gradcam_images": "gradcam", "run_demo": "demo", "UserError": "common.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
