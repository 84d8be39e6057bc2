"""Checkpoint format: a plain dict of tensors and JSON-like values, loadable with ``weights_only=True``.

Keys: format_version, arch, num_classes, classes, spec (PreprocessSpec.to_dict()), model_kwargs
(what create_model needs besides arch and num_classes to rebuild the same network), state_dict,
record (training record: data root, split path, epochs, metrics...), extra (optional, e.g. the
optimiser state for resuming). No pickled modules or classes, so loading never runs code.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnbench.common import atomic_write
from cnnbench.common.errors import UserError
from cnnbench.data.spec import PreprocessSpec
from cnnbench.models.registry import INIT_ONLY_KWARGS, create_model, list_models
from cnnbench.models.weights import state_dict_mismatch, torch_load_weights_only

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "arch", "num_classes", "classes", "spec", "model_kwargs", "state_dict", "record")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    arch: str,
    classes: list[str],
    spec: PreprocessSpec | dict,
    record: dict,
    extra: dict | None = None,
    model_kwargs: dict | None = None,
) -> None:
    """Write ``model``'s checkpoint atomically (temp file + rename).

    ``model`` may be wrapped in DistributedDataParallel or torch.compile; the bare model is saved.
    ``model_kwargs`` defaults to what create_model recorded on the model; initial-weights kwargs
    (``weights``) are never stored. ``record`` and ``extra`` may hold tensors and plain values;
    numpy scalars and paths are converted, anything else is a TypeError (a weights_only load would
    refuse it).
    """
    model = unwrap_model(model)
    if arch not in list_models():
        raise ValueError(f"unknown arch {arch!r}; known models: {', '.join(list_models())}")
    num_classes = model.classifier.out_features
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for a {num_classes}-class model")
    if model_kwargs is None:
        model_kwargs = getattr(model, "model_kwargs", {})
    model_kwargs = {k: v for k, v in model_kwargs.items() if k not in INIT_ONLY_KWARGS}
    spec_dict = spec.to_dict() if isinstance(spec, PreprocessSpec) else PreprocessSpec.from_dict(spec).to_dict()
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "num_classes": num_classes,
        "classes": [str(c) for c in classes],
        "spec": spec_dict,
        "model_kwargs": to_plain(model_kwargs, "model_kwargs"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "record": to_plain(record, "record"),
        "extra": to_plain(extra, "extra"),
    }
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def to_plain(value: Any, where: str) -> Any:
    """``value`` with numpy scalars and paths turned into Python values, so a weights_only load accepts it.

    Anything else that is not a tensor or a plain container/scalar is a TypeError naming where it is.
    """
    if isinstance(value, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, (torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint holds only tensors and plain values")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel/DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """Everything but the weights, validated; raises CheckpointError."""
    checkpoint = _read_checkpoint(path)
    return {k: v for k, v in checkpoint.items() if k != "state_dict"}


def recorded_split_files(record: dict | None = None, checkpoints=(), manifest: dict | None = None) -> list[str]:
    """The split files a model names, most direct first (data.heldout.held_out takes the first that exists):
    a training record's ``split``, each checkpoint's (an export's: each source checkpoint's) recorded
    split, then the test split an export's parity check read."""
    files = [(record or {}).get("split")]
    sources = list(checkpoints) + [s.get("path") for s in (manifest or {}).get("sources") or []]
    for path in sources:
        if path and os.path.isfile(path):
            try:
                files.append(read_checkpoint_meta(path).get("record", {}).get("split"))
            except CheckpointError:
                continue
    parity_images = (manifest or {}).get("parity", {}).get("images", {})
    if parity_images.get("source") == "test split":
        files.append(parity_images.get("path"))
    return [f for f in files if f]


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", expect_arch: str | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint; returns ``(model.eval(), meta)`` with meta = the dict without state_dict.

    ``expect_arch`` makes a checkpoint of another architecture an error. Raises CheckpointError.
    """
    checkpoint = _read_checkpoint(path)
    arch = checkpoint["arch"]
    if expect_arch is not None and arch != expect_arch:
        raise CheckpointError(f"{path}: checkpoint is a {arch!r} model, expected {expect_arch!r}")
    # model_kwargs never name initial weights (e.g. xception_pretrained's ImageNet file): the
    # checkpoint's state_dict holds every weight.
    kwargs = checkpoint["model_kwargs"]
    try:
        model = create_model(arch, checkpoint["num_classes"], **kwargs)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: cannot build {arch!r} with the checkpoint's model_kwargs {kwargs}: {exc}"
        ) from exc
    _load_weights(path, model, arch, checkpoint["state_dict"])
    model.to(map_location)
    meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    return model.eval(), meta


def _load_weights(path, model: nn.Module, arch: str, state_dict: dict) -> None:
    mismatch = state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"{path}: checkpoint says arch {arch!r} but its weights do not fit {arch!r}: {mismatch}")
    model.load_state_dict(state_dict)


def _read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        checkpoint = torch_load_weights_only(path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    _validate(path, checkpoint)
    return checkpoint


def _validate(path: str, checkpoint: Any) -> None:
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a checkpoint: expected a dict, found {type(checkpoint).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this project: missing key(s) {', '.join(missing)}")
    version = checkpoint["format_version"]
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this program reads (up to {FORMAT_VERSION}); upgrade"
        )
    arch = checkpoint["arch"]
    if arch not in list_models():
        raise CheckpointError(f"{path}: unknown arch {arch!r}; known models: {', '.join(list_models())}")
    num_classes, classes = checkpoint["num_classes"], checkpoint["classes"]
    if not isinstance(num_classes, int) or num_classes < 1:
        raise CheckpointError(f"{path}: bad num_classes {num_classes!r}")
    if not isinstance(classes, list) or len(classes) != num_classes:
        count = len(classes) if isinstance(classes, list) else type(classes).__name__
        raise CheckpointError(f"{path}: has {count} class names for num_classes={num_classes}")
    try:
        PreprocessSpec.from_dict(checkpoint["spec"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad preprocessing spec: {exc}") from exc
    for key in ("model_kwargs", "state_dict", "record"):
        if not isinstance(checkpoint[key], dict):
            raise CheckpointError(f"{path}: {key} must be a dict, found {type(checkpoint[key]).__name__}")
