"""Reading weight files without executing code, and explaining why a state_dict does not fit a model."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from cnnbench.common.errors import InputError, MissingFileError


_REFUSAL_MARK = "Weights only load failed"


def torch_load_weights_only(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` on CPU; any failure becomes a ValueError naming the file and reason."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError... for bad files
        raise InputError(f"{os.fspath(path)}: {describe_load_failure(exc)}") from exc


def describe_load_failure(exc: Exception) -> str:
    message = str(exc)
    if _REFUSAL_MARK in message:
        # The unpickler met a global it will not import: the file carries pickled objects or code.
        detail = next((line.strip() for line in message.splitlines() if "Unsupported global" in line), "")
        return "refused: the file holds pickled objects or code, which a weights-only load never runs" + (
            f" ({detail})" if detail else ""
        )
    first_line = message.splitlines()[0] if message else ""
    return f"not a readable torch file (corrupt, truncated, or another format): {type(exc).__name__}: {first_line}"


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A flat name -> tensor mapping from a ``.safetensors`` or torch file; raises FileNotFoundError/ValueError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: weights file not found (nothing is downloaded; pass a local file)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
            raise InputError(f"{path}: not a readable safetensors file: {exc}") from exc
    else:
        state = torch_load_weights_only(path)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state_dict (expected a mapping of parameter names to tensors)")
    return state


def state_dict_mismatch(expected: dict[str, Tensor], given: dict[str, Any], show: int = 5) -> str:
    """Why ``given`` does not load into a model whose state_dict is ``expected``; "" when it fits exactly."""
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    wrong_shape = [
        f"{k} {tuple(given[k].shape) if isinstance(given[k], Tensor) else type(given[k]).__name__}"
        f" != {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & given.keys())
        if not isinstance(given[k], Tensor) or given[k].shape != expected[k].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            more = f" (+{len(items) - show} more)" if len(items) > show else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:show])}{more}")
    return "; ".join(parts)
